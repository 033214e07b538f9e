"""The dashboard in a real browser: headless Chromium (the system's, driven by Playwright)
against the real server, on runs of the real round engine and ClientApp (in process).

One browser for the whole module. Checked: the hospitals' rows, curves drawn on the canvas,
the metric selector, live updates of a run going on (without a reload), the token, and that
a hospital whose ClientApp names itself with markup, or fails with markup in its message,
is shown as text and runs no code. Screenshots of every page go to
``<pytest's tmp dir>/dashboard-screenshots`` ($FEDCLINIC_SCREENSHOTS if set).

Without a browser these tests skip, except under CI (``CI=true``), where they fail:
``.ci/install-browser`` installs Debian's ``chromium`` first.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message
from harness import FakeClock

from fedclinic import messages as keys
from fedclinic.bench.grid import InProcessGrid, quiet_flower, run_in_process
from fedclinic.dashboard.app import Settings
from fedclinic.dashboard.command import Dashboard
from fedclinic.dashboard.runs import RunsRoot

TOKEN = "browser-test-token-0123456789"
EVIL = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
EVIL_ERROR = "disk <b>full</b><script>window.__pwned=3</script>"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
#: coloured pixels on the chart's canvas: the hospitals' curves (axes and grid are grey)
CURVE_PIXELS = """() => {
  const canvas = document.querySelector('#chart canvas');
  if (!canvas) return 0;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let found = 0;
  for (let i = 0; i < data.length; i += 4) {
    const high = Math.max(data[i], data[i + 1], data[i + 2]);
    const low = Math.min(data[i], data[i + 1], data[i + 2]);
    if (high - low > 80 && data[i + 3] > 200) found++;
  }
  return found;
}"""


def fail_or_skip(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (under CI the browser tests must run: .ci/install-browser)")
    pytest.skip(reason)


def chromium_path() -> str | None:
    given = os.environ.get("FEDCLINIC_CHROMIUM")
    if given:
        return given
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for every test here."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        fail_or_skip("playwright is not installed (pip install -e '.[dev]')")
    executable = chromium_path()
    if executable is None:
        fail_or_skip("no Chromium found (apt-get install chromium, or $FEDCLINIC_CHROMIUM)")
    with sync_playwright() as playwright:
        try:
            launched = playwright.chromium.launch(executable_path=executable)
        except Error as err:
            fail_or_skip(f"Chromium at {executable} does not start: {err}")
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("FEDCLINIC_SCREENSHOTS")
    folder = Path(given) if given else tmp_path_factory.getbasetemp() / "dashboard-screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class StudyGrid(InProcessGrid):
    """The in-process grid whose node 1002 names itself with markup, whose node 1001 fails
    round 2 with markup in its error, and which holds messages of ``gate_round`` on until
    ``gate`` is set (a run going on while the page is open)."""

    def __init__(
        self,
        nodes: dict[int, dict[str, Any]],
        run_config: dict[str, Any],
        gate: threading.Event | None = None,
        gate_round: int = 2,
        tamper: bool = True,
    ) -> None:
        super().__init__(nodes, run_config)
        self.gate, self.gate_round, self.tamper = gate, gate_round, tamper

    def deliver(self, message: Message) -> Message | None:
        records = message.content.config_records
        config = dict(records[keys.CONFIG]) if keys.CONFIG in records else {}
        server_round = int(config.get(keys.SERVER_ROUND, 0))
        if self.gate is not None and server_round >= self.gate_round:
            assert self.gate.wait(120), "the test never let the run go on"
        reply = super().deliver(message)
        node = message.metadata.dst_node_id
        if reply is None or not self.tamper or keys.INFO not in reply.content.config_records:
            return reply
        info = reply.content.config_records[keys.INFO]
        if node == 1002:
            info[keys.HOSPITAL] = EVIL
        if node == 1001 and server_round == 2:
            info[keys.ERROR] = EVIL_ERROR
        return reply


def hospitals(state: Path, sizes: tuple[int, ...]) -> dict[int, dict[str, Any]]:
    return {
        1000 + i: {
            "hospital": f"hospital-{'abc'[i]}", "data-source": "synthetic", "num-samples": size,
            "class-priors": "0.6,0.4", "acquisition-shift": 0.2 * i, "data-seed": i,
            "device": "cpu", "state-dir": str(state / f"hospital-{'abc'[i]}"),
        }
        for i, size in enumerate(sizes)
    }  # fmt: skip


def study_config(algorithm: str) -> dict[str, Any]:
    return {"algorithm": algorithm, "model": "cnn", "rounds": 2, "local-steps": 1,
            "batch-size": 16, "seed": 3, "min-hospitals": 2,
            "data-source": "synthetic"}  # fmt: skip


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished FedAvg run and its local-only baseline (same config, same hospitals; the
    small one names itself with markup), run by the engine in process."""
    root = tmp_path_factory.mktemp("runs")
    nodes = hospitals(root.parent / "state", (60, 40, 10))
    for name, algorithm in (("study-fedavg", "fedavg"), ("study-local-only", "local-only")):
        flat = study_config(algorithm)
        with quiet_flower():
            run_in_process(flat, StudyGrid(nodes, flat), root / name, clock=FakeClock())
    return root


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh page; any console error (a CSP violation included) or page error fails."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    problems: list[str] = []
    opened.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    opened.on("pageerror", lambda e: problems.append(str(e)))
    yield opened
    context.close()
    # a refused script or style says "Refused to ..."; an HTTP error status (the live page's
    # 404 before its run exists) is the browser's note on a response, not a page problem
    assert [p for p in problems if not p.startswith("Failed to load resource")] == []


def loaded(page: Any, updates: int = 1) -> None:
    page.wait_for_function("(n) => Number(document.body.dataset.updates || 0) >= n", arg=updates)


def test_finished_runs_in_the_browser(page: Any, browser: Any, study: Path, shots: Path) -> None:
    """The runs page, a finished run's page and the token, on one study (built once: under
    xdist each test may land on its own worker)."""
    dashboard = Dashboard.bind(Settings(runs=RunsRoot(study), poll_seconds=0.3), "127.0.0.1", 0)
    with dashboard.in_background():
        check_runs_page(page, dashboard.url, shots)
        check_run_page(page, dashboard.url, shots)
        page.goto("about:blank")
    check_token(browser, study, shots)


def check_runs_page(page: Any, served: str, shots: Path) -> None:
    page.goto(served + "/")
    loaded(page)
    rows = page.locator("#runs tbody tr")
    assert rows.count() == 2
    assert sorted(page.locator("#runs tbody a").all_text_contents()) == [
        "study-fedavg",
        "study-local-only",
    ]
    assert page.locator("#runs .badge").all_text_contents() == ["completed", "completed"]
    page.screenshot(path=shots / "runs.png", full_page=True)


def check_run_page(page: Any, served: str, shots: Path) -> None:
    page.goto(served + "/runs/study-fedavg")
    loaded(page)
    names = page.locator("#hospitals td.hospital-name").all_text_contents()
    assert names == [EVIL, "hospital-a", "hospital-b"]  # the markup is text, sorted first
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.querySelectorAll('img, script:not([src])').length") == 0
    assert page.locator("#status").text_content() == "completed"

    page.wait_for_function(f"() => ({CURVE_PIXELS})() > 50")  # curves drawn, not just axes
    before = page.evaluate("document.querySelector('#chart canvas').toDataURL()")
    assert page.locator("#metric").input_value() == "test_balanced_accuracy"
    page.select_option("#metric", "val_loss")
    page.wait_for_function(
        "(b) => document.querySelector('#chart canvas').toDataURL() !== b", arg=before
    )
    assert page.evaluate(f"({CURVE_PIXELS})()") > 50

    reasons = page.locator("#events td.reason").all_text_contents()
    assert EVIL_ERROR in reasons  # hospital-b's failure in round 2, as text
    assert "hospital-b" in page.locator("#events td.hospital-name").all_text_contents()
    timeline = page.locator("#timeline tbody tr.round")
    assert timeline.count() == 3  # two rounds and the final evaluation
    equity = page.locator("#equity-note a")
    assert equity.text_content() == "study-local-only"  # the baseline was found
    small = page.locator("#equity tr.small td.hospital-name").all_text_contents()
    assert small == [EVIL + " (small)"]
    links = page.locator("#models a")
    assert links.all_text_contents() == ["model_final.pt", "model_selected.pt"]
    assert page.locator("#models tbody tr").first.locator("td").last.text_content() == (
        "file matches its SHA-256"
    )
    page.screenshot(path=shots / "run-finished.png", full_page=True)


def test_live_run_updates_without_reload(
    page: Any, browser: Any, tmp_path: Path, shots: Path
) -> None:
    root = tmp_path / "runs"
    root.mkdir()
    dashboard = Dashboard.bind(Settings(runs=RunsRoot(root), poll_seconds=0.3), "127.0.0.1", 0)
    gate = threading.Event()
    flat = {**study_config("fedavg"), "rounds": 3}
    grid = StudyGrid(hospitals(tmp_path / "state", (40, 30)), flat, gate=gate, tamper=False)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            with quiet_flower():
                run_in_process(flat, grid, root / "live", clock=FakeClock())
        except BaseException as err:  # reported by the test, not lost in the thread
            failure.append(err)

    thread = threading.Thread(target=run, daemon=True)
    with dashboard.in_background():
        try:
            page.goto(dashboard.url + "/runs/live")  # before the run has a directory
            page.wait_for_function(
                "() => document.getElementById('status-detail').textContent.includes('No run')"
            )
            page.evaluate("window.__sameDocument = 'yes'")
            thread.start()
            page.wait_for_function(
                "() => document.body.dataset.status === 'running' && "
                "document.querySelectorAll('#timeline tr.round').length >= 2",
                timeout=60_000,
            )
            assert page.locator("#hospitals tbody tr").count() == 2
            assert "1 of 3 completed" in page.locator("#facts").text_content()
            page.wait_for_selector("#chart canvas")  # one point per hospital so far
            page.screenshot(path=shots / "run-live.png", full_page=True)
            updates = int(page.evaluate("document.body.dataset.updates"))
            gate.set()
            page.wait_for_function(
                "() => document.body.dataset.status === 'completed'", timeout=60_000
            )
            assert page.evaluate("window.__sameDocument") == "yes"  # no reload happened
            assert int(page.evaluate("document.body.dataset.updates")) > updates
            assert "3 of 3 completed" in page.locator("#facts").text_content()
            assert page.locator("#timeline tr.round").count() == 4
            page.wait_for_function("() => document.querySelectorAll('#models a').length === 2")
            page.wait_for_function(f"() => ({CURVE_PIXELS})() > 50")  # the curves grew
            page.screenshot(path=shots / "run-live-completed.png", full_page=True)
        finally:
            gate.set()
            if thread.is_alive():
                thread.join(timeout=120)
            page.goto("about:blank")  # stop polling before the server goes
    assert not failure, failure


def check_token(browser: Any, study: Path, shots: Path) -> None:
    settings = Settings(runs=RunsRoot(study), token=TOKEN, poll_seconds=0.3)
    dashboard = Dashboard.bind(settings, "127.0.0.1", 0)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    with dashboard.in_background():
        assert page.goto(dashboard.url + "/").status == 401
        assert page.goto(dashboard.url + "/runs/study-fedavg").status == 401
        page.screenshot(path=shots / "token-missing.png")
        assert page.goto(dashboard.url + "/?token=not-the-token").status == 403
        response = page.goto(dashboard.url + f"/runs/study-fedavg?token={TOKEN}")
        assert response.status == 200 and TOKEN not in page.url  # the cookie, not the URL
        loaded(page)
        assert page.locator("#hospitals tbody tr").count() == 3
        page.screenshot(path=shots / "run-with-token.png", full_page=True)
    context.close()
