"""The UI plugin (issue 19) in a real headless Chromium, inside a real `airflow standalone`
3.3, reading a real etcd that a real reconciler loop filled.

One Airflow for the module, started with the wheel's own files on PYTHONPATH (so Airflow
finds both plugins through the wheel's `airflow.plugins` entry points, as `pip install`
would register them) and an etcd of the module's own (the last test stops it). The user
`narrow` may read three DAGs only (tests/e2e/ui_auth_manager.py, in its plugins folder).
The loop runs one cycle until its downstreams are triggered and is then stopped, so the
mirror holds still while the pages and `reconciler status -o json` are compared.

Screenshots of both views go to $RECONCILER_UI_ARTIFACTS (default: the module's tmp dir).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from reconciler.core.state import iso
from tests.e2e.conftest import DAGS, Bench, eventually, make_bench, new_cycle
from tests.fixtures.airflow import airflow_env, airflow_venv
from tests.fixtures.etcd import EtcdServer, _start

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "ui"
NARROW_DAGS = ["01_pipeline_init", "02_pipeline", "06_pipeline"]
COMMIT_URL = "https://git.example.com/pipelines/commit/{commit}"
FILE_URL = "https://git.example.com/pipelines/blob/{commit}/{path}"


def browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("no chromium / chromedriver: `apt-get install -y chromium "
                    "chromium-driver` (.ci/run does)", pytrace=False)
    return chromium, driver


def build_site(out: Path) -> Path:
    """The wheel, built offline and unpacked: a folder for PYTHONPATH with the package
    and its dist-info (entry points), nothing else of the reconciler's."""
    wheels = out / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--disable-pip-version-check", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    [built] = wheels.glob("airflow_dag_reconciler-*.whl")
    site = out / "site"
    with zipfile.ZipFile(built) as zf:
        zf.extractall(site)
    return site


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("RECONCILER_UI_ARTIFACTS") or
                  tmp_path_factory.mktemp("ui-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def ui_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = _start(tmp_path_factory.mktemp("ui-etcd") / "data")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ui_airflow(ui_etcd: EtcdServer, postgres_server: Any,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    venv = airflow_venv()
    if not (venv / "bin" / "airflow").exists():
        pytest.fail(f"no Airflow venv at {venv} (AIRFLOW_VENV): run `make airflow-venv`",
                    pytrace=False)
    base = tmp_path_factory.mktemp("ui-airflow")
    site = build_site(base)
    # Both plugins come from the wheel's entry points; the folder holds only the bench's
    # narrower user (ui_auth_manager.py says why).
    plugins = base / "plugins"
    plugins.mkdir()
    shutil.copy(Path(__file__).parent / "ui_auth_manager.py", plugins)
    env = airflow_env()
    users = {**env.ROLES, "narrow": "viewer"}
    try:
        proc = env.start_airflow(
            base / "home", venv=venv, timeout=300,
            database_url=postgres_server.create_database("airflowui"), extra_env={
                "PYTHONPATH": str(site),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(plugins),
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(
                    f"{n}:{r}" for n, r in users.items()),
                "RECONCILER_E2E_NARROW_DAGS": ",".join(NARROW_DAGS),
                "EXAMPLE_ROOT_SCHEDULE": "none",
                "RECONCILER_ETCD_ENDPOINTS": ui_etcd.endpoint,
                "RECONCILER_ETCD_PREFIX": "e2e",
                "RECONCILER_NAMESPACE": NAMESPACE,
                "RECONCILER_UI_COMMIT_URL": COMMIT_URL,
                "RECONCILER_UI_FILE_URL": FILE_URL,
                "RECONCILER_UI_TIMEOUT": "1",
            })
    except RuntimeError as exc:
        pytest.fail(f"airflow standalone did not start: {exc}", pytrace=False)
    try:
        # Airflow generated the password of `narrow` (not in ROLES) into the file
        proc.users.update(json.loads(proc.passwords_file.read_text()))
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def synced(ui_airflow: Any, ui_etcd: EtcdServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    """The example graph synced into the namespace the plugin reads."""
    benches = make_bench(ui_airflow, ui_etcd, tmp_path_factory.mktemp("ui-bench"),
                         namespace=NAMESPACE)
    try:
        yield next(benches)
    finally:
        benches.close()


@pytest.fixture(scope="module")
def cycle_seen(synced: Bench) -> tuple[Bench, datetime]:
    """One cycle run by the real loop until its root is done and 02_pipeline was triggered,
    as etcd's mirror says; then the loop is stopped (the mirror holds still: the pages and
    `status` are compared on the same records, whatever the machine's speed)."""
    bench, cycle = synced, new_cycle()
    bench.start()
    try:
        bench.open_cycle(cycle)

        def mirrored() -> bool:
            rows = {r["dag_id"]: r for r in status_json(bench, cycle)["statuses"]}
            return len(rows) == len(DAGS) and \
                rows["01_pipeline_init"]["state"] == "done" and \
                bool(rows["02_pipeline"]["run_id"])

        eventually(mirrored, 480, "the root done and 02_pipeline triggered, in the mirror")
    finally:
        bench.stop()
    return bench, cycle


def status_json(bench: Bench, cycle: datetime) -> dict[str, Any]:
    """`reconciler status -o json --from-etcd --cycle <cycle>`, as a user would run it."""
    done = subprocess.run([sys.executable, "-m", "reconciler", "status", "-o", "json",
                           "--from-etcd", "--cycle", iso(cycle)],
                          env=bench.env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver_path = browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--window-size=1500,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def log_in(driver: WebDriver, airflow: Any, user: str) -> None:
    """Airflow's own login: a JWT from /auth/token, set as the UI's `_token` cookie."""
    driver.delete_all_cookies()
    driver.get(airflow.url + "/api/v2/monitor/health")
    driver.add_cookie({"name": "_token", "value": airflow.token(user), "path": "/"})


def wait(driver: WebDriver, timeout: float = 180) -> WebDriverWait[WebDriver]:
    # a busy 2-core machine: Airflow's UI bundle took over a minute to render its nav once
    return WebDriverWait(driver, timeout, poll_frequency=0.25,
                         ignored_exceptions=(WebDriverException,))


def plugin_frame(driver: WebDriver, state: str = "ready") -> None:
    """Into the plugin's frame once its page reached `state` (ready or error)."""
    driver.switch_to.default_content()
    frame = wait(driver).until(lambda d: d.find_element(By.CSS_SELECTOR, "iframe"))
    driver.switch_to.frame(frame)
    wait(driver).until(lambda d: d.find_element(By.TAG_NAME, "body")
                       .get_attribute("data-state") in (state, "error"))
    got = driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")
    assert got == state, driver.find_element(By.ID, "error").text


def link_named(driver: WebDriver, text: str) -> WebElement:
    def find(d: WebDriver) -> WebElement | None:
        for a in d.find_elements(By.CSS_SELECTOR, "a, button"):
            if a.text.strip() == text and a.is_displayed():
                return a
        return None
    found = wait(driver).until(find)
    assert found is not None
    return found


def api(airflow: Any, path: str, token: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(airflow.url + path)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def drawn(driver: WebDriver) -> dict[str, dict[str, Any]]:
    nodes = driver.execute_script(
        "return window.reconcilerUI.cy.nodes().map(n => n.data());")
    return {n["id"]: n for n in nodes}


def test_anonymous_requests_to_the_plugin_get_401(ui_airflow: Any) -> None:
    for path in ("/reconciler/api/graph", "/reconciler/api/dags/02_pipeline",
                 "/reconciler/"):
        status, body = api(ui_airflow, path)
        assert status == 401, (path, body)
    status, _ = api(ui_airflow, "/reconciler/api/graph", token="not-a-jwt")
    assert status == 403
    status, body = api(ui_airflow, "/reconciler/api/graph", token=ui_airflow.token("viewer"))
    assert status == 200, body
    # the scripts are public (no data in them), and served by the plugin: no CDN
    status_js = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        ui_airflow.url + "/reconciler/static/vendor/cytoscape/cytoscape.min.js", timeout=30)
    assert status_js.status == 200


def test_airflow_lists_the_nav_item_and_the_dag_tab(ui_airflow: Any) -> None:
    status, body = api(ui_airflow, "/api/v2/plugins", token=ui_airflow.token())
    assert status == 200, body
    plugins = {p["name"]: p for p in body["plugins"]}
    assert {"reconciler_ui", "reconciler_events"} <= set(plugins)
    views = {v["destination"]: v for v in plugins["reconciler_ui"]["external_views"]}
    assert views["nav"]["href"] == "/reconciler/"
    assert views["dag"]["href"] == "/reconciler/dags/{DAG_ID}"
    assert plugins["reconciler_ui"]["fastapi_apps"][0]["url_prefix"] == "/reconciler"


def test_the_graph_view_shows_every_pipeline_in_the_state_status_gives(
        ui_airflow: Any, cycle_seen: tuple[Bench, datetime], browser: WebDriver,
        artifacts: Path) -> None:
    bench, cycle = cycle_seen
    log_in(browser, ui_airflow, "admin")
    browser.get(ui_airflow.url + "/")
    link_named(browser, "Dependencies").click()  # the nav item, in Airflow's own nav
    wait(browser).until(lambda d: "/plugin/reconciler-dependencies" in d.current_url)
    plugin_frame(browser)
    expected = status_json(bench, cycle)
    assert browser.find_element(By.ID, "cycle").get_attribute("value") == iso(cycle)
    nodes = drawn(browser)
    rows = {r["dag_id"]: r for r in expected["statuses"]}
    assert set(nodes) == set(rows) == set(DAGS)
    for dag_id, row in rows.items():
        got = nodes[dag_id]
        assert (got["state"], got["reason"], got["message"], got["run_id"]) == \
            (row["state"], row["reason"], row["message"], row["run_id"]), dag_id
    header = browser.find_element(By.ID, "synced")
    commit = expected["header"]["commit"]
    assert commit[:12] in header.text
    assert "by e2e" in header.text
    assert header.find_element(By.TAG_NAME, "a").get_attribute("href") == \
        COMMIT_URL.replace("{commit}", commit)
    edges = browser.execute_script(
        "return window.reconcilerUI.cy.edges().map(e => [e.source().id(), e.target().id()]);")
    assert ["05_pipeline", "06_pipeline"] in edges
    assert ["06_pipeline", "07_pipeline"] in edges
    browser.switch_to.default_content()
    browser.save_screenshot(str(artifacts / "dependencies.png"))
    plugin_frame(browser)
    browser.find_element(By.ID, "search").send_keys("06_")
    wait(browser).until(lambda d: "1 match" in d.find_element(By.ID, "count").text)
    assert browser.find_element(By.ID, "pipeline").is_displayed() is False


def test_clicking_a_node_opens_that_dag_in_airflow(
        ui_airflow: Any, cycle_seen: tuple[Bench, datetime], browser: WebDriver) -> None:
    log_in(browser, ui_airflow, "admin")
    browser.get(ui_airflow.url + "/plugin/reconciler-dependencies")
    plugin_frame(browser)
    # a real mouse click where Cytoscape drew the node
    x, y = browser.execute_script(
        "const p = window.reconcilerUI.cy.$id('06_pipeline').renderedPosition();"
        "return [p.x, p.y];")
    canvas = browser.find_element(By.ID, "cy")
    size = canvas.size
    ActionChains(browser).move_to_element_with_offset(
        canvas, int(x - size["width"] / 2), int(y - size["height"] / 2)).click().perform()
    browser.switch_to.default_content()
    wait(browser).until(lambda d: d.current_url.rstrip("/").endswith("/dags/06_pipeline"))
    # Airflow's own page of that DAG rendered (its router followed), with our tab on it
    link_named(browser, "Reconciler")


def test_the_dag_tab_says_why_in_the_words_of_status(
        ui_airflow: Any, cycle_seen: tuple[Bench, datetime], browser: WebDriver,
        artifacts: Path) -> None:
    bench, cycle = cycle_seen
    log_in(browser, ui_airflow, "admin")
    browser.get(ui_airflow.url + "/dags/06_pipeline")
    link_named(browser, "Reconciler").click()  # the DAG tab, in Airflow's DAG page
    wait(browser).until(lambda d: "/plugin/reconciler" in d.current_url)
    plugin_frame(browser)
    row = {r["dag_id"]: r for r in status_json(bench, cycle)["statuses"]}["06_pipeline"]
    line = browser.find_element(By.CSS_SELECTOR, f"tr[data-cycle='{iso(cycle)}']")
    cells = [td.text for td in line.find_elements(By.TAG_NAME, "td")]
    assert cells[1:4] == [row["state"], row["reason"], row["message"]]
    nodes = drawn(browser)  # its transitive upstreams and downstreams, itself
    assert set(nodes) == set(DAGS)
    assert not browser.find_element(By.ID, "graph-controls").is_displayed()  # graph page's
    facts = browser.find_element(By.ID, "pipeline").text
    assert "pipelines/06_pipeline.yaml" in facts
    assert "team-" in facts or "Owner" in facts
    file_link = browser.find_element(By.CSS_SELECTOR, "#pipeline a")
    assert file_link.get_attribute("href").endswith("/pipelines/06_pipeline.yaml")
    browser.switch_to.default_content()
    browser.save_screenshot(str(artifacts / "dag-tab.png"))
    # a downstream that ran: its run is linked to Airflow's run page
    log_in(browser, ui_airflow, "admin")
    browser.get(ui_airflow.url + "/dags/02_pipeline/plugin/reconciler")
    plugin_frame(browser)
    run_id = {r["dag_id"]: r for r in status_json(bench, cycle)["statuses"]}[
        "02_pipeline"]["run_id"]
    run = browser.find_element(By.CSS_SELECTOR, f"tr[data-cycle='{iso(cycle)}'] a")
    assert run_id in run.text
    run.click()
    browser.switch_to.default_content()
    wait(browser).until(lambda d: "/dags/02_pipeline/runs/" in d.current_url)


def test_a_narrower_user_sees_only_the_dags_they_may_read(
        ui_airflow: Any, synced: Bench, browser: WebDriver) -> None:
    token = ui_airflow.token("narrow")
    status, body = api(ui_airflow, "/api/v2/dags", token)
    assert status == 200, body  # Airflow's own answer for that user: the three DAGs
    assert {d["dag_id"] for d in body["dags"]} == set(NARROW_DAGS)
    status, body = api(ui_airflow, "/reconciler/api/graph", token)
    assert status == 200, body
    assert {n["id"] for n in body["nodes"]} == set(NARROW_DAGS)
    log_in(browser, ui_airflow, "narrow")
    browser.get(ui_airflow.url + "/plugin/reconciler-dependencies")
    plugin_frame(browser)
    assert set(drawn(browser)) == set(NARROW_DAGS)
    text = json.dumps(body)
    for hidden in set(DAGS) - set(NARROW_DAGS):
        assert hidden not in text, hidden  # not as a node, not in a message either
    assert api(ui_airflow, "/reconciler/api/dags/03_pipeline", token)[0] == 403
    assert api(ui_airflow, "/reconciler/api/dags/06_pipeline", token)[0] == 200


def test_with_etcd_down_the_page_says_so_in_one_line(
        ui_airflow: Any, ui_etcd: EtcdServer, synced: Bench, browser: WebDriver) -> None:
    log_in(browser, ui_airflow, "admin")
    ui_etcd.stop()
    try:
        started = time.monotonic()
        browser.get(ui_airflow.url + "/plugin/reconciler-dependencies")
        plugin_frame(browser, "error")
        line = browser.find_element(By.ID, "error").text
        assert line.startswith("The reconciler's etcd cannot be read: etcd unreachable")
        assert "\n" not in line
        assert time.monotonic() - started < 30
        browser.switch_to.default_content()
        link_named(browser, "Dependencies")  # Airflow's own UI is whole
        status, _ = api(ui_airflow, "/api/v2/dags", ui_airflow.token())
        assert status == 200
    finally:
        ui_etcd.restart()
