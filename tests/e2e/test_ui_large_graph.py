"""The Dependencies page with a large graph, in a real headless Chromium: it first draws a
neighbourhood (at most 250 pipelines, around those that need attention), a search moves
the neighbourhood to the matches, and "Draw all pipelines" draws every one.

The page and its scripts are the plugin's own files, served from loopback with a synthetic
graph's JSON (built by reconciler/plugin/ui/view.py) the way benchmarks/bench_ui.py serves
them; Airflow is not needed for what is tested here (test_ui_airflow3.py runs the page
inside a real Airflow).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

REPO = Path(__file__).resolve().parents[2]
PIPELINES = 3000


def bench_ui() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_ui", REPO / "benchmarks" / "bench_ui.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_ui"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def page() -> Iterator[tuple[str, dict[str, Any], WebDriver]]:
    bench = bench_ui()
    body, _ = bench.graph_json(PIPELINES)
    server, url = bench.serve(body)
    driver = bench.browser()
    driver.set_script_timeout(120)
    try:
        yield url, json.loads(body), driver
    finally:
        driver.quit()
        server.shutdown()


def ready(driver: WebDriver) -> None:
    WebDriverWait(driver, 120, poll_frequency=0.2).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")


def drawn(driver: WebDriver) -> set[str]:
    return set(driver.execute_script(
        "return window.reconcilerUI.cy.nodes().map(n => n.id());"))


def test_a_large_graph_draws_a_neighbourhood_first_then_all_on_demand(
        page: tuple[str, dict[str, Any], WebDriver]) -> None:
    url, data, driver = page
    driver.get(url)
    ready(driver)
    first = drawn(driver)
    assert 0 < len(first) <= 250
    states = {n["id"]: n["state"] for n in data["nodes"]}
    # around those that need attention: the failed ones are in it
    assert any(states[d] == "failed" for d in first)
    count = driver.find_element(By.ID, "count").text
    assert count.startswith(f"{len(first)} of {PIPELINES} pipelines drawn")
    # a search moves the neighbourhood to a pipeline that was not drawn
    far = sorted(set(states) - first)[-1]
    driver.find_element(By.ID, "search").send_keys(far)
    WebDriverWait(driver, 60, poll_frequency=0.2).until(lambda d: far in drawn(d))
    assert driver.execute_script(
        f"return window.reconcilerUI.cy.$id('{far}').hasClass('match');")
    # every edge drawn joins two drawn nodes that the graph joins
    edges = {tuple(e) for e in data["edges"]}
    shown = driver.execute_script(
        "return window.reconcilerUI.cy.edges().map(e => [e.source().id(), e.target().id()]);")
    assert shown
    assert all(tuple(e) in edges for e in shown)
    button = driver.find_element(By.ID, "all")
    assert button.is_displayed()
    button.click()
    WebDriverWait(driver, 120, poll_frequency=0.2).until(
        lambda d: len(drawn(d)) == PIPELINES)
    assert not driver.find_element(By.ID, "all").is_displayed()


def test_a_small_graph_is_drawn_whole_at_once(page: tuple[str, dict[str, Any], WebDriver],
                                              ) -> None:
    bench = bench_ui()
    body, _ = bench.graph_json(300)
    server, url = bench.serve(body)
    driver = page[2]
    try:
        driver.get(url)
        ready(driver)
        assert len(drawn(driver)) == 300
        assert not driver.find_element(By.ID, "all").is_displayed()
    finally:
        server.shutdown()
