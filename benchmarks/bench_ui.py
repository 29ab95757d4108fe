"""Render time of the UI's Dependencies view with a 5,000-pipeline graph, in a real headless
Chromium (target: under 2 s from navigation to the graph drawn).

The graph is the synthetic layered one of benchmarks/synthetic.py (layers of 100, about 3
upstreams each: 5,000 nodes, ~14,700 edges), owners spread over 10 teams, every pipeline
with a status in the cycle. Two figures:

- server: building the page's JSON (reconciler/plugin/ui/view.py: layout, statuses,
  filtering by the readable set) and serialising it, in this process;
- browser: the page (reconciler/plugin/ui/static: page.html, ui.js, Cytoscape.js) served
  from loopback with that JSON as /reconciler/api/graph, opened in Debian's `chromium`
  through Selenium and `chromium-driver`; the time from navigation start until the page
  says it is ready and two animation frames have been painted, median and worst of the
  repeats (a fresh page each time).

Airflow and etcd are left out on purpose: the question is whether the drawing stays
usable; reading etcd is one range and one graph read (tests/integration/test_ui_app.py).
Usage: python benchmarks/bench_ui.py [--pipelines N] [--repeat R]
"""

from __future__ import annotations

import argparse
import http.server
import json
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synthetic import layered_graph

from reconciler.plugin.ui import view

STATIC = Path(view.__file__).parent / "static"
STATES = [("done", "Done", "run succeeded"), ("running", "Running", "run running"),
          ("waiting", "WaitingFor", "waiting for upstreams"),
          ("failed", "Failed", "run failed"), ("blocked", "BlockedBy", "blocked by a failure")]
CYCLE = "2026-01-01T00:00:00+00:00"
NEIGHBOURHOOD = 250
"""ui.js draws at most this many pipelines first when the graph has over 1,500."""


def graph_json(n: int) -> tuple[bytes, float]:
    graph = layered_graph(n)
    pipelines = {d: {"dag_id": d, "owner": f"team-{i % 10}", "depends_on": ups}
                 for i, (d, ups) in enumerate(graph.items())}
    records = {d: {"dag_id": d, "cycle": CYCLE, "state": s, "reason": r, "message": m,
                   "run_id": f"reconciler__{CYCLE}", "waiting_for": [], "blocked_by": [],
                   "commit": "c" * 40}
               for i, d in enumerate(graph) for s, r, m in [STATES[i % len(STATES)]]}
    head = {"commit": "c" * 40, "synced_at": CYCLE, "source": "bench"}
    times = []
    for _ in range(5):
        started = time.perf_counter()
        data = view.graph_view(head, pipelines, records, cycle=CYCLE, cycles=[CYCLE],
                               suspended={}, beat=None, readable=set(pipelines),
                               links=view.Links())
        body = json.dumps(data).encode()
        times.append(time.perf_counter() - started)
    return body, statistics.median(times)


def serve(body: bytes) -> tuple[http.server.ThreadingHTTPServer, str]:
    page = (STATIC / "page.html").read_text()
    page = (page.replace("{{kind}}", "graph").replace("{{dag_id}}", "")
            .replace("{{root}}", "/reconciler").replace("{{airflow}}", ""))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path == "/reconciler/":
                self._send(page.encode(), "text/html")
            elif path == "/reconciler/api/graph":
                self._send(body, "application/json")
            elif path.startswith("/reconciler/static/"):
                file = (STATIC / path[len("/reconciler/static/"):]).resolve()
                if STATIC.resolve() not in file.parents or not file.is_file():
                    self.send_error(404)
                    return
                kind = {".js": "text/javascript", ".css": "text/css"}.get(file.suffix,
                                                                          "text/plain")
                self._send(file.read_bytes(), kind)
            else:
                self.send_error(404)

        def _send(self, data: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/reconciler/"


def browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        sys.exit("no chromium / chromedriver: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1500,1000"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


PAINTED = """
const done = arguments[arguments.length - 1];
const check = () => {
  if (document.body.dataset.state === "ready") {
    requestAnimationFrame(() => requestAnimationFrame(() =>
      done([performance.now(), window.reconcilerUI.cy.nodes().length])));
  } else if (document.body.dataset.state === "error") {
    done([-1, document.getElementById("error").textContent]);
  } else { setTimeout(check, 10); }
};
check();
"""


ALL = """
const done = arguments[arguments.length - 1];
const started = performance.now();
document.getElementById("all").click();
requestAnimationFrame(() => requestAnimationFrame(() =>
  done([performance.now() - started, window.reconcilerUI.cy.nodes().length])));
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    body, server_time = graph_json(args.pipelines)
    print(f"graph: {args.pipelines} pipelines, JSON {len(body) / 1e6:.1f} MB, "
          f"built and serialised in {server_time * 1000:.0f} ms (median of 5)")
    server, url = serve(body)
    driver = browser()
    try:
        driver.set_script_timeout(300)
        first, whole = [], []
        for _ in range(args.repeat):
            driver.get(url)
            painted, drawn = driver.execute_async_script(PAINTED)
            if painted < 0:
                sys.exit(f"the page failed: {drawn}")
            first.append(painted / 1000)
            if drawn < args.pipelines:  # a neighbourhood first: then everything, on demand
                took, drawn = driver.execute_async_script(ALL)
                assert drawn == args.pipelines, drawn
                whole.append(took / 1000)
    finally:
        driver.quit()
        server.shutdown()
    print(f"browser: first drawing in {statistics.median(first):.2f} s median, "
          f"{max(first):.2f} s worst of {args.repeat} (target under 2 s): "
          + " ".join(f"{t:.2f}" for t in first))
    if whole:
        print(f"  the first drawing is a neighbourhood ({NEIGHBOURHOOD} pipelines at most); "
              f"'Draw all' draws all {args.pipelines} in {statistics.median(whole):.2f} s "
              f"median, {max(whole):.2f} s worst")


if __name__ == "__main__":
    main()
