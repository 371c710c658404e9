"""The HTML report of a big simulated run: its size against ``size_bound`` and how long it takes
to write and to open in headless Chromium (``tests/test_report.py`` runs a smaller scale in CI).

    python benchmarks/bench_report.py [--ranks 1024] [--points 100000] [--keys 2] [--dir DIR]

The run is built by ``bench_merge.make_run`` (shards in the writer's layout, rows in bulk numpy
calls) and merged by ``merge_run``; 1,024 ranks x 10^5 points is 10^8 rows (3.2 GB of shards
before compression): give it a disk with room. Needs selenium, chromium and chromedriver.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from bench_merge import make_run

from prov4ml_dist.merge import merge_run
from prov4ml_dist.report import size_bound, write_report


def open_seconds(page: Path) -> float:
    """Seconds from loading the page to its metrics view drawn, in headless Chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.binary_location = shutil.which("chromium") or "chromium"
    chrome = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        started = time.monotonic()
        chrome.get(page.resolve().as_uri())
        while not chrome.execute_script("return document.body && document.body.dataset.ready === '1'"):
            time.sleep(0.01)
        chrome.find_element("css selector", "nav button[data-view=metrics]").click()
        return time.monotonic() - started
    finally:
        chrome.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=1024)
    parser.add_argument("--points", type=int, default=100_000, help="points per rank, over all keys")
    parser.add_argument("--keys", type=int, default=2)
    parser.add_argument("--dir", type=Path, default=None, help="where the run is built (default: a temporary dir)")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(dir=args.dir, prefix="bench-report-"))
    try:
        run_dir = base / "run"
        started = time.perf_counter()
        make_run(run_dir, args.ranks, args.points, args.keys)
        built = time.perf_counter() - started
        started = time.perf_counter()
        assert not merge_run(run_dir, world_size=args.ranks).problems
        merged = time.perf_counter() - started
        started = time.perf_counter()
        page = write_report(run_dir)
        written = time.perf_counter() - started
        size, bound = page.stat().st_size, size_bound(args.keys, args.ranks)
        opened = open_seconds(page)
        print(f"{args.ranks} ranks x {args.points} points ({args.ranks * args.points:.3g} in all): "
              f"built {built:.1f} s, "
              f"merged {merged:.1f} s, report written {written:.1f} s, {size / 1e6:.2f} MB "
              f"(bound {bound / 1e6:.2f} MB, merged.h5 {(run_dir / 'merged.h5').stat().st_size / 1e6:.0f} MB), "
              f"opened in {opened:.2f} s")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
