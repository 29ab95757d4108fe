/* The reconciler's two pages inside Airflow's UI: the Dependencies graph (kind "graph")
 * and one pipeline's tab (kind "dag"). Data from the plugin's own API (same origin: the
 * UI's _token cookie goes with every request); the drawing is Cytoscape.js with the
 * positions the server computed (a preset layout: no layout work in the browser).
 * window.reconcilerUI exposes the drawing and the timings to tests and the benchmark. */
(function () {
  "use strict";
  var body = document.body;
  var kind = body.dataset.kind;
  var root = body.dataset.root;
  var airflow = body.dataset.airflow;
  var dagId = body.dataset.dagId;
  var COLOURS = {
    done: "#38a169", failed: "#e53e3e", blocked: "#9b2c2c", running: "#3182ce",
    queued: "#63b3ed", triggering: "#63b3ed", rerunning: "#2b6cb0", waiting: "#d69e2e",
    suspended: "#b83280", disabled: "#a0aec0", not_in_cycle: "#cbd5e0"
  };
  var NO_STATUS = "#edf2f7";
  /* Over LARGE pipelines, the graph page first draws a neighbourhood of at most
   * NEIGHBOURHOOD of them (around a search's matches, else around those that need
   * attention), with a button to draw them all: 5,000 nodes and their edges take
   * Cytoscape seconds to build, a neighbourhood a fraction of one. */
  var LARGE = 1500;
  var NEIGHBOURHOOD = 250;
  var SEVERITY = ["failed", "blocked", "waiting", "running", "rerunning", "triggering",
                  "queued", "suspended", "disabled"];
  var started = performance.now();
  var ui = window.reconcilerUI = { kind: kind, cy: null, data: null, renderMs: null };
  var $ = function (id) { return document.getElementById(id); };

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { node.textContent = attrs[k]; } else { node.setAttribute(k, attrs[k]); }
    });
    (children || []).forEach(function (c) {
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }

  function link(text, href) {
    return href ? el("a", { href: href, target: "_blank", rel: "noopener", text: text })
      : el("span", { text: text });
  }

  function fail(line) {
    var box = $("error");
    box.textContent = line;
    box.hidden = false;
    $("synced").textContent = "";
    body.dataset.state = "error";
  }

  function getJSON(url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        return r.json().catch(function () { return null; }).then(function (data) {
          if (r.ok) { return data; }
          var detail = data && typeof data.detail === "string" ? data.detail : "HTTP " + r.status;
          if (r.status === 401) { detail = "Sign in to Airflow to see this page (" + detail + ")."; }
          throw new Error(detail);
        });
      });
  }

  /* Navigate Airflow's own page (the frame's parent, same origin) the way its router
   * does, so the UI stays one page; outside a frame, this window. */
  function openInAirflow(path) {
    var url = airflow + path;
    try {
      var top = window.top;
      if (top !== window && top.location.origin === window.location.origin) {
        var idx = (top.history.state && top.history.state.idx) || 0;
        top.history.pushState({ usr: null, key: Math.random().toString(36).slice(2, 10),
                                idx: idx + 1 }, "", url);
        top.dispatchEvent(new PopStateEvent("popstate", { state: top.history.state }));
        return;
      }
    } catch (e) { /* another origin: fall through */ }
    window.location.assign(url);
  }
  ui.openInAirflow = openInAirflow;

  function dagPath(id) { return "/dags/" + encodeURIComponent(id); }

  function header(h) {
    var line = $("synced");
    line.textContent = "";
    if (!h.commit) {
      line.textContent = "Nothing synced yet: run `reconciler sync` (or the loop's pull mode).";
      return;
    }
    line.appendChild(document.createTextNode("Synced commit "));
    line.appendChild(link(h.commit.slice(0, 12), h.commit_url));
    line.appendChild(document.createTextNode(
      " at " + (h.synced_at || "?") + " by " + (h.synced_by || "?") +
      (h.forced ? " (forced: a rollback)" : "") +
      (h.last_pass ? " · leader's last pass " + h.last_pass : "")));
    var marks = $("marks");
    marks.textContent = "";
    Object.keys(h.suspended || {}).sort().forEach(function (target) {
      var m = h.suspended[target];
      marks.appendChild(el("div", { class: "mark", text: "Suspended: " +
        (target === "*" ? "the whole namespace" : target) + " by " + (m.by || "?") +
        " at " + (m.at || "?") + (m.reason ? ": " + m.reason : "") }));
    });
  }

  function legend() {
    var box = $("legend");
    box.textContent = "";
    Object.keys(COLOURS).concat(["no status"]).forEach(function (s) {
      var dot = el("i");
      dot.style.background = COLOURS[s] || NO_STATUS;
      box.appendChild(el("span", {}, [dot, s]));
    });
  }

  /* Rows of a part of the graph: each layer's nodes packed in the server's order. */
  function packed(nodes) {
    var layers = {};
    nodes.forEach(function (n) { (layers[n.layer] = layers[n.layer] || []).push(n); });
    var rows = {};
    Object.keys(layers).forEach(function (k) {
      var members = layers[k].sort(function (a, b) { return a.row - b.row; });
      members.forEach(function (n, i) { rows[n.id] = i - (members.length - 1) / 2; });
    });
    return rows;
  }

  function draw(nodes, edges, focus, pack) {
    var big = nodes.length > 150;  // haystack edges, no arrows: cheap to draw by the thousand
    var elements = [];
    var rows = pack ? packed(nodes) : null;
    nodes.forEach(function (n) {
      elements.push({ group: "nodes", position: { x: n.layer * 260, y: (rows ? rows[n.id] : n.row) * 54 },
        data: { id: n.id, label: n.id, colour: COLOURS[n.state] || NO_STATUS,
                state: n.state, reason: n.reason, message: n.message, run_id: n.run_id,
                owner: n.owner, deployment: n.deployment,
                held: n.suspended || !n.enabled ? 1 : 0 },
        classes: n.id === focus ? "focus" : "" });
    });
    edges.forEach(function (e) {
      elements.push({ group: "edges", data: { id: e[0] + "\u2192" + e[1], source: e[0], target: e[1] } });
    });
    if (ui.cy) { ui.cy.destroy(); }
    var cy = ui.cy = cytoscape({
      container: $("cy"), elements: elements, layout: { name: "preset", fit: true, padding: 24 },
      minZoom: 0.01, maxZoom: 3, wheelSensitivity: 0.4, boxSelectionEnabled: false,
      pixelRatio: big ? 1 : "auto",
      textureOnViewport: big, hideEdgesOnViewport: big, motionBlur: false,
      style: [
        { selector: "node", style: {
          shape: "round-rectangle", width: 210, height: 34, label: "data(label)",
          "background-color": "data(colour)", "border-width": 1, "border-color": "#4a5568",
          "text-valign": "center", "text-halign": "center", "font-size": 12,
          "text-max-width": 200, "text-wrap": "ellipsis", "min-zoomed-font-size": 7 } },
        { selector: "node[held = 1]", style: { "border-style": "dashed", "border-width": 3 } },
        { selector: "node.focus", style: { "border-width": 4, "border-color": "#000" } },
        { selector: "node.match", style: { "border-width": 5, "border-color": "#805ad5" } },
        { selector: ".off", style: { display: "none" } },
        { selector: "edge", style: {
          width: 1.5, "curve-style": big ? "haystack" : "bezier", "line-color": "#a0aec0",
          "target-arrow-shape": big ? "none" : "triangle", "target-arrow-color": "#a0aec0" } }
      ]
    });
    cy.on("mouseover", "node", function (e) { showDetail(e.target.data()); });
    cy.on("tap", "node", function (e) {
      var id = e.target.id();
      openInAirflow(kind === "dag" && id !== focus ? dagPath(id) + "/plugin/reconciler"
                                                   : dagPath(id));
    });
    return cy;
  }

  function showDetail(d) {
    var box = $("detail");
    box.hidden = false;
    box.textContent = "";
    box.appendChild(el("strong", { text: d.id + " " }));
    box.appendChild(el("span", { class: "state", text: d.state || "no status in this cycle" }));
    if (d.reason) { box.appendChild(document.createTextNode(" (" + d.reason + ")")); }
    if (d.message) { box.appendChild(el("div", { text: d.message })); }
    box.appendChild(el("div", { text: "owner " + (d.owner || "-") + " · deployment " + d.deployment }));
  }

  function fillSelect(select, values, chosen, label) {
    values.forEach(function (v) {
      var option = el("option", { value: v, text: label ? label(v) : v });
      if (v === chosen) { option.selected = true; }
      select.appendChild(option);
    });
  }

  function wanted(n) {
    var owner = $("owner").value;
    var deployment = $("deployment").value;
    return (!owner || n.owner === owner) && (!deployment || n.deployment === deployment);
  }

  /* The part of a large graph to draw: a breadth-first neighbourhood (edges either way)
   * of the search's matches, else of the pipelines that need attention most. */
  function neighbourhood(data) {
    var text = $("search").value.trim().toLowerCase();
    var byId = {};
    var next = {};
    data.nodes.forEach(function (n) { if (wanted(n)) { byId[n.id] = n; next[n.id] = []; } });
    data.edges.forEach(function (e) {
      if (byId[e[0]] && byId[e[1]]) { next[e[0]].push(e[1]); next[e[1]].push(e[0]); }
    });
    var candidates = Object.keys(byId).map(function (id) { return byId[id]; });
    var matches = text ? candidates.filter(function (n) { return n.id.toLowerCase().indexOf(text) >= 0; }) : [];
    var rank = function (n) { var i = SEVERITY.indexOf(n.state); return i < 0 ? SEVERITY.length : i; };
    var seeds = (matches.length ? matches : candidates.slice().sort(function (a, b) {
      return rank(a) - rank(b) || (a.id < b.id ? -1 : 1);
    })).slice(0, 20);
    var seen = {};
    var order = [];
    var queue = seeds.map(function (n) { return n.id; });
    while (queue.length && order.length < NEIGHBOURHOOD) {
      var id = queue.shift();
      if (seen[id]) { continue; }
      seen[id] = true;
      order.push(byId[id]);
      next[id].forEach(function (m) { if (!seen[m]) { queue.push(m); } });
    }
    return { nodes: order, matches: matches, total: candidates.length,
             edges: data.edges.filter(function (e) { return seen[e[0]] && seen[e[1]]; }) };
  }

  function drawPart() {
    var part = neighbourhood(ui.data);
    draw(part.nodes, part.edges, null, true);
    part.matches.forEach(function (n) { if (ui.cy.$id(n.id).length) { ui.cy.$id(n.id).addClass("match"); } });
    $("count").textContent = part.nodes.length + " of " + part.total + " pipelines drawn: " +
      (part.matches.length ? "around " + part.matches.length + " match" + (part.matches.length === 1 ? "" : "es")
                           : "around those that need attention") + " (search to move)";
    $("all").hidden = false;
  }

  function filter() {
    var cy = ui.cy;
    if (!cy) { return; }
    if (!ui.full) { drawPart(); return; }
    var text = $("search").value.trim().toLowerCase();
    var owner = $("owner").value;
    var deployment = $("deployment").value;
    var shown = 0;
    var matches = [];
    cy.batch(function () {
      cy.nodes().forEach(function (n) {
        var on = (!owner || n.data("owner") === owner) &&
                 (!deployment || n.data("deployment") === deployment);
        n.toggleClass("off", !on);
        var hit = on && text !== "" && n.id().toLowerCase().indexOf(text) >= 0;
        n.toggleClass("match", hit);
        if (hit) { matches.push(n); }
        if (on) { shown += 1; }
      });
    });
    $("count").textContent = shown + " of " + cy.nodes().length + " pipelines" +
      (text ? ", " + matches.length + " match" : "");
    if (matches.length) {
      cy.animate({ fit: { eles: cy.collection(matches.slice(0, 50)), padding: 60 } },
                 { duration: 200 });
    }
  }

  function graphPage(cycle) {
    var url = root + "/api/graph" + (cycle ? "?cycle=" + encodeURIComponent(cycle) : "");
    return getJSON(url).then(function (data) {
      ui.data = data;
      ui.dataMs = performance.now() - started;
      header(data.header);
      var controls = $("graph-controls");
      controls.hidden = false;
      var select = $("cycle");
      select.textContent = "";
      if (!data.cycles.length) { fillSelect(select, [""], "", function () { return "no cycle yet"; }); }
      fillSelect(select, data.cycles, data.cycle);
      if ($("owner").options.length === 1) { fillSelect($("owner"), data.owners); }
      if ($("deployment").options.length === 1) { fillSelect($("deployment"), data.deployments); }
      legend();
      ui.full = data.nodes.length <= LARGE;
      if (ui.full) {
        draw(data.nodes, data.edges, null);
        filter();
      } else {
        drawPart();
      }
      ui.renderMs = performance.now() - started;
      body.dataset.state = "ready";
    });
  }

  function row(cells) {
    return el("tr", {}, cells.map(function (c) { return el("td", {}, [c]); }));
  }

  function dagPage() {
    return getJSON(root + "/api/dags/" + encodeURIComponent(dagId)).then(function (data) {
      ui.data = data;
      header(data.header);
      var p = data.pipeline;
      var box = $("pipeline");
      box.hidden = false;
      box.textContent = "";
      var facts = el("dl");
      var add = function (k, v) { facts.appendChild(el("dt", { text: k })); facts.appendChild(el("dd", {}, [v])); };
      add("Pipeline file", link(p.file, p.file_url));
      add("Owner", p.owner || "-");
      if (p.description) { add("Description", p.description); }
      add("Deployment", p.deployment);
      add("Trigger rule", p.trigger_rule);
      add("Enabled", p.enabled ? "yes" : "no (never triggered; its downstreams wait)");
      if (p.suspended) {
        add("Suspended", "by " + (p.suspended.by || "?") + " at " + (p.suspended.at || "?") +
            (p.suspended.reason ? ": " + p.suspended.reason : ""));
      }
      add("Upstreams", (p.upstreams.join(", ") || "none (a root: Airflow schedules it)"));
      add("Downstreams", p.downstreams.join(", ") || "none");
      add("All upstreams", String(p.ancestors.length) + (p.hidden_neighbours ?
          " (and " + p.hidden_neighbours + " pipelines you may not read, not drawn)" : ""));
      add("All downstreams", String(p.descendants.length));
      box.appendChild(facts);
      legend();
      draw(data.nodes, data.edges, p.id);
      var table = el("table", { id: "cycle-table" }, [el("thead", {}, [el("tr", {},
        ["Cycle", "State", "Reason", "Why", "Run", "Eager"].map(function (h) { return el("th", { text: h }); }))])]);
      var tbody = el("tbody");
      data.cycles.forEach(function (c) {
        var run = c.run_id ? el("a", { href: airflow + dagPath(p.id) + "/runs/" + encodeURIComponent(c.run_id),
                                       text: c.run_id + (c.run && c.run.state ? " (" + c.run.state + ")" : "") })
                           : el("span", { text: "-" });
        if (c.run_id) {
          run.addEventListener("click", function (e) {
            e.preventDefault();
            openInAirflow(dagPath(p.id) + "/runs/" + encodeURIComponent(c.run_id));
          });
        }
        var tr = row([c.cycle, el("span", { class: "state", text: c.state || "no status" }),
                      c.reason || "-", c.message || "-", run,
                      c.eager ? "yes: triggered on the eager path" : "no"]);
        tr.dataset.cycle = c.cycle;
        tbody.appendChild(tr);
      });
      table.appendChild(tbody);
      var cycles = $("cycles");
      cycles.hidden = false;
      cycles.textContent = "";
      cycles.appendChild(el("h3", { text: data.cycles.length ? "Recent cycles" : "No cycle yet" }));
      cycles.appendChild(table);
      ui.renderMs = performance.now() - started;
      body.dataset.state = "ready";
    });
  }

  var typing = null;
  $("search").addEventListener("input", function () {
    clearTimeout(typing);
    typing = setTimeout(filter, ui.full ? 0 : 300);
  });
  $("all").addEventListener("click", function () {
    ui.full = true;
    $("all").hidden = true;
    started = performance.now();
    draw(ui.data.nodes, ui.data.edges, null);
    filter();
    ui.allMs = performance.now() - started;
  });
  $("owner").addEventListener("change", filter);
  $("deployment").addEventListener("change", filter);
  $("cycle").addEventListener("change", function () {
    started = performance.now();
    body.dataset.state = "loading";
    graphPage($("cycle").value).catch(function (e) { fail(e.message); });
  });
  (kind === "dag" ? dagPage() : graphPage(null)).catch(function (e) { fail(e.message); });
}());
