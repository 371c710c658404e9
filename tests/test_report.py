"""``prov4ml-dist report`` in a real browser (headless Chromium driven by Selenium): the page of a
real 2-rank torchrun job, of a job SIGKILLed then merged offline, and of 1,024 simulated ranks
loads with no console error and no network request, and its charts and lineage graph render.
A screenshot of every view is kept under $PROV4ML_TEST_ARTIFACTS (default: the test's tmp_path,
printed)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prov4ml_dist.merge import load_merged, merge_run
from prov4ml_dist.report import BOUNDS, size_bound

from .conftest import REPO
from .test_cli_jobs import _start_until_killed, clean_job  # noqa: F401 - clean_job is a fixture used here
from .test_cli_support import cli, write_run

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000")
VIEWS = ("overview", "metrics", "stragglers", "system", "params", "artifacts")
OPEN_LIMIT_S = 3.0  # the bound for opening the report of 1,024 ranks
BIG_RANKS, BIG_STEPS, BIG_KEYS = 1024, 1000, 2  # 2,000 points per rank: see README "Report" for 10^5


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    return browser, driver


@pytest.fixture(scope="module")
def browser() -> Iterator:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    binary, driver = _chromium()
    options = webdriver.ChromeOptions()
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.binary_location = binary
    # The browser's console and its network events (Chrome DevTools Protocol) as logs.
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    chrome = webdriver.Chrome(options=options, service=Service(driver))
    yield chrome
    chrome.quit()


@pytest.fixture
def artifacts(request, tmp_path) -> Path:
    """Where the screenshots go (said on the terminal, so a person can look at them)."""
    root = os.environ.get("PROV4ML_TEST_ARTIFACTS")
    folder = Path(root) / request.node.name if root else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nreport screenshots: {folder}")
    return folder


def _report(run_dir: Path, out: Path) -> Path:
    done = cli("report", run_dir, "-o", out, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    return out


def _open(chrome, page: Path) -> float:
    """Seconds from asking for the page to its first view drawn."""
    chrome.get_log("browser")
    chrome.get_log("performance")  # forget earlier pages
    started = time.monotonic()
    chrome.get(page.resolve().as_uri())
    deadline = started + 30
    while not chrome.execute_script("return document.body && document.body.dataset.ready === '1'"):
        assert time.monotonic() < deadline, "the page never finished drawing"
        time.sleep(0.02)
    return time.monotonic() - started


def _show(chrome, view: str) -> None:
    chrome.find_element("css selector", f"nav button[data-view={view}]").click()
    assert chrome.execute_script("return document.body.dataset.view") == view


PAINTED = """
const canvases = [...document.querySelectorAll('section.view.active canvas')];
return canvases.filter(c => {
  if (!c.width || !c.height) return false;
  // Read a copy: reading the page's own canvases back would make the browser warn.
  const copy = document.createElement('canvas');
  copy.width = c.width; copy.height = c.height;
  const ctx = copy.getContext('2d', {willReadFrequently: true});
  ctx.drawImage(c, 0, 0);
  const pixels = ctx.getImageData(0, 0, c.width, c.height).data;
  for (let i = 3; i < pixels.length; i += 4 * 7) if (pixels[i] !== 0) return true;
  return false;
}).length;
"""


def _painted_canvases(chrome) -> int:
    """Canvases of the shown view with at least one pixel drawn (uPlot, the heat map, cytoscape)."""
    return chrome.execute_script(PAINTED)


def _screenshots(chrome, folder: Path, tag: str) -> dict[str, int]:
    """Every view shown, its painted canvases counted and a full-height screenshot kept."""
    painted = {}
    for view in VIEWS:
        _show(chrome, view)
        time.sleep(0.3)  # cytoscape lays out and paints on the next frames
        painted[view] = _painted_canvases(chrome)
        height = chrome.execute_script("return document.documentElement.scrollHeight")
        chrome.set_window_size(1400, min(max(height, 800), 6000))
        assert chrome.save_screenshot(str(folder / f"{tag}-{view}.png"))
        chrome.set_window_size(1400, 1000)
    return painted


def _assert_offline_and_clean(chrome, page: Path) -> None:
    """No console message (error or warning) and no request but the page file itself."""
    messages = [m for m in chrome.get_log("browser") if m["level"] in ("SEVERE", "WARNING")]
    assert not messages, messages
    requests = [json.loads(e["message"])["message"] for e in chrome.get_log("performance")]
    urls = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
    assert urls <= {page.resolve().as_uri()}, urls
    assert chrome.execute_script("return performance.getEntriesByType('resource').length") == 0


def _hover_and_zoom(chrome) -> None:
    """On the first metric chart: hovering fills the legend with values, dragging zooms the x axis."""
    from selenium.webdriver.common.action_chains import ActionChains
    _show(chrome, "metrics")
    over = chrome.find_element("css selector", "#view-metrics .u-over")
    values = "return [...document.querySelectorAll('#view-metrics .chart')[0].querySelectorAll('.u-value')]" \
             ".map(v => v.textContent)"
    assert set(chrome.execute_script(values)) == {"-"}
    ActionChains(chrome).move_to_element(over).perform()
    assert any(v not in ("-", "--") for v in chrome.execute_script(values)), chrome.execute_script(values)
    full = chrome.execute_script("const x = window.__charts[0].scales.x; return [x.min, x.max];")
    width = over.size["width"]
    ActionChains(chrome).move_to_element_with_offset(over, -width // 4, 0).click_and_hold() \
        .move_by_offset(width // 4, 0).release().perform()
    zoomed = chrome.execute_script("const x = window.__charts[0].scales.x; return [x.min, x.max];")
    assert full[0] < zoomed[0] < zoomed[1] < full[1], (full, zoomed)


def _lineage_nodes(chrome) -> int:
    _show(chrome, "artifacts")
    return chrome.execute_script("return window.__lineage ? window.__lineage.nodes().length : 0")


# -- the tests ---------------------------------------------------------------------------------
def test_report_of_a_real_torchrun_job(clean_job, browser, artifacts, tmp_path):  # noqa: F811
    page = _report(clean_job, tmp_path / "clean.html")
    html = page.read_text()
    assert "<script src" not in html and "<link" not in html  # everything inline
    _open(browser, page)
    painted = _screenshots(browser, artifacts, "torchrun")
    _assert_offline_and_clean(browser, page)
    merged = load_merged(clean_job / "merged.h5")
    metric_charts = len({(s.key, s.context) for s in merged.series if s.dataset == "/metrics/rows"})
    assert painted["metrics"] == metric_charts >= 3  # loss, val_loss, val_acc: one chart each
    assert painted["system"] >= 5 and painted["stragglers"] >= 2  # heat map and skew chart
    assert browser.execute_script("return document.querySelectorAll('#rank-grid span.ok').length") == 2
    _hover_and_zoom(browser)
    # Each content is one node: 3 model versions/final models and the artifacts, with a derivation chain.
    doc = json.loads((clean_job / "prov.json").read_text())
    contents = [e for e in doc["entity"].values() if "p4d:Content" in json.dumps(e.get("prov:type"))]
    assert _lineage_nodes(browser) == len(contents) > 3
    assert browser.execute_script("return window.__lineage.edges().length") >= 2
    assert painted["artifacts"] >= 1  # cytoscape draws on canvases
    node = browser.execute_script("const n = window.__lineage.nodes('[item = \"model_version\"]')[0];"
                                  "n.emit('tap'); return n.data();")
    info = browser.find_element("id", "node-info").text
    assert node["sha256"] in info and "ranks 0-1" in info


def test_report_of_a_job_killed_then_merged_offline(browser, artifacts, tmp_path):
    save = tmp_path / "prov"
    proc, pids = _start_until_killed(save)
    for pid in pids.values():
        os.killpg(pid, signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    (run_dir,) = (save / "crash").iterdir()
    merged = cli("merge", run_dir)
    assert merged.returncode == 0, merged.stderr
    page = _report(run_dir, tmp_path / "crash.html")
    _open(browser, page)
    painted = _screenshots(browser, artifacts, "crashed")
    _assert_offline_and_clean(browser, page)
    _show(browser, "overview")
    assert browser.execute_script("return document.querySelectorAll('#rank-grid span.incomplete').length") == 2
    assert "2 incomplete" in browser.find_element("css selector", ".cards").text
    assert painted["metrics"] == 2  # loss (TRAINING), val_loss (VALIDATION)
    assert painted["system"] >= 3 and painted["stragglers"] >= 2
    assert _lineage_nodes(browser) == 2  # each rank's weights.bin: two contents


def _bench_merge():
    """benchmarks/bench_merge.py's make_run: shards in the writer's layout, rows in bulk numpy calls."""
    spec = importlib.util.spec_from_file_location("bench_merge", REPO / "benchmarks" / "bench_merge.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_of_1024_ranks_is_bounded_and_opens_fast(browser, artifacts, tmp_path):
    run_dir = tmp_path / "big"
    _bench_merge().make_run(run_dir, BIG_RANKS, BIG_STEPS * BIG_KEYS, BIG_KEYS)
    assert not merge_run(run_dir, world_size=BIG_RANKS).problems
    page = _report(run_dir, tmp_path / "big.html")
    bound = size_bound(charts=BIG_KEYS, ranks=BIG_RANKS)
    print(f"report of {BIG_RANKS} ranks: {page.stat().st_size / 1e6:.2f} MB (bound {bound / 1e6:.2f} MB)")
    assert page.stat().st_size <= bound
    seconds = _open(browser, page)
    started = time.monotonic()
    _show(browser, "metrics")  # the heaviest view, drawn on demand
    assert _painted_canvases(browser) == BIG_KEYS
    opened = seconds + time.monotonic() - started
    print(f"opened, metrics drawn, in {opened:.2f} s")
    assert opened < OPEN_LIMIT_S
    painted = _screenshots(browser, artifacts, "1024-ranks")
    _assert_offline_and_clean(browser, page)
    assert painted["metrics"] == BIG_KEYS and painted["stragglers"] >= 2
    assert browser.execute_script("return document.querySelectorAll('#rank-grid span.ok').length") == BIG_RANKS
    # A rank's line on demand: the picker shows one of the stored lines, hidden at first.
    _show(browser, "metrics")
    hidden = "return document.querySelectorAll('#view-metrics .chart')[0].querySelectorAll('.u-series.u-off').length"
    before = browser.execute_script(hidden)
    assert before == BOUNDS["lines_per_chart"]
    picker = browser.find_element("css selector", "#view-metrics .chart select")
    picker.find_elements("tag name", "option")[5].click()
    assert browser.execute_script(hidden) == before - 1
    model = json.loads(browser.execute_script("return document.getElementById('report-data').textContent"))
    for chart in model["metrics"]:
        assert len(chart["band"]["x"]) <= BOUNDS["band_points"] and chart["band"]["steps"] == BIG_STEPS
        assert len(chart["lines"]) == BOUNDS["lines_per_chart"] and chart["omitted_lines"] == BIG_RANKS - len(
            chart["lines"])
        assert all(len(line["x"]) <= BOUNDS["line_points"] for line in chart["lines"])
    heat = model["stragglers"]["heat"]["cells"]
    assert len(heat) <= BOUNDS["heat_ranks"] and len(heat[0]) <= BOUNDS["heat_steps"]


def test_report_shows_gpus_energy_and_params_ranks_disagree_on(browser, artifacts, tmp_path):
    run_dir = write_run(tmp_path / "prov", 8, gpu=True, params_of=lambda r: {"seed": 7 if r == 5 else 1})
    page = _report(run_dir, tmp_path / "gpu.html")
    _open(browser, page)
    painted = _screenshots(browser, artifacts, "gpu")
    _assert_offline_and_clean(browser, page)
    _show(browser, "params")
    rows = browser.find_elements("css selector", "#view-params tr.disagree")
    assert [r.text for r in rows] == ["seed 1 0-4,6-7 7 (majority)", "seed 7 5 1 (differs)"]
    assert "1 differ across ranks" in browser.find_element("id", "view-params").text
    _show(browser, "system")
    text = browser.find_element("id", "view-system").text
    assert "ENERGY TO SOLUTION\n24.03 kJ" in text  # 8 ranks of 3000 J + their rank number (CSS upper-cases)
    assert "No GPU series" not in text
    # gpu_power, gpu_utilization, gpu_energy (per device) and the energy-per-rank bars.
    assert painted["system"] == 4
    _show(browser, "overview")
    assert "GPUS\n8\n" in browser.find_element("css selector", ".cards").text


def test_report_errors_are_one_line(tmp_path):
    done = cli("report", tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "is not a run directory" in done.stderr


def test_lineage_groups_contents_of_one_name_beyond_its_node_cap(tmp_path, monkeypatch):
    """Every rank saving its own note.txt gives one content per rank: above MAX_NODES they are
    drawn as one node per name and kind, counted, with every rank that wrote one."""
    from prov4ml_dist.report import lineage
    run_dir = write_run(tmp_path / "prov", 8)
    doc = json.loads((run_dir / "prov.json").read_text())
    whole = lineage.lineage(doc)
    assert whole["grouped"] is False and whole["contents"] == 9  # 8 notes + the shared.json all saved
    assert {n["ranks"] for n in whole["nodes"] if n["label"] == "shared.json"} == {"0-7"}
    monkeypatch.setattr(lineage, "MAX_NODES", 4)
    grouped = lineage.lineage(doc)
    assert grouped["grouped"] is True
    by_label = {n["label"]: n for n in grouped["nodes"]}
    assert set(by_label) == {"note.txt", "shared.json"}
    assert by_label["note.txt"]["count"] == 8 and by_label["note.txt"]["ranks"] == "0-7"
    assert by_label["note.txt"]["sha256"] == "8 distinct contents" and by_label["note.txt"]["size"] == 8 * 7


def test_downsampling_keeps_the_extremes_within_its_bound():
    """Min/max per bucket: at most 2 points per bucket, in x order, a one-point spike and dip kept;
    a band keeps the lowest min and highest max of each bucket."""
    import numpy as np

    from prov4ml_dist.report.downsample import band_buckets, minmax_points
    rng = np.random.default_rng(0)
    x = np.arange(100_000, dtype=float)
    y = rng.normal(size=x.size)
    y[31_337], y[77_777], y[5] = 50.0, -50.0, np.nan
    dx, dy = minmax_points(x, y, 200)
    assert len(dx) <= 400 and np.all(np.diff(dx) > 0)
    assert {31_337.0, 77_777.0} <= set(dx.tolist()) and np.nanmax(dy) == 50.0 and np.nanmin(dy) == -50.0
    bx, low, mean, high = band_buckets(x, y - 1, y, y + 1, 1000)
    assert len(bx) == 1000 and high.max() == 51.0 and low.min() == -51.0
    assert np.all(low <= mean) and np.all(mean <= high)
