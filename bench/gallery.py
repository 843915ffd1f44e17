"""How fast headless Chromium opens a run's gallery page (worker.gallery), served over HTTP as from a bucket.

    python3 -m bench.gallery                     # fake runs of 200 and 10,000 jobs
    python3 -m bench.gallery --jobs 200 --repeat 5

The runs are made without the model (tests/test_gallery.py's fake_run: 64x64 PNGs, metadata, run.jsonl).
Each page is opened by a fresh `chromium --headless --dump-dom` with a probe script appended to a copy of the
page, which records the navigation timings once the load event has run: DOMContentLoaded (HTML parsed, pager
run), load (the shown page's images fetched), first contentful paint, and how many images were fetched.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from tests.test_gallery import fake_run
from worker.gallery import build_gallery
from worker.storage import LocalStorage

PROBE = """<script>addEventListener("load", function () { setTimeout(function () {
  var navigation = performance.getEntriesByType("navigation")[0];
  var fetched = Array.prototype.filter.call(document.images, function (image) { return image.naturalWidth; });
  var timing = {dom_ms: navigation.domContentLoadedEventEnd, load_ms: navigation.loadEventEnd,
                images_fetched: fetched.length};
  performance.getEntriesByType("paint").forEach(function (entry) { timing[entry.name] = entry.startTime; });
  document.body.setAttribute("data-timing", JSON.stringify(timing));
}, 0); });</script>"""


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass  # one line per image fetched would bury the figures


def open_timed(url: str, profile: Path) -> dict:
    shutil.rmtree(profile, ignore_errors=True)
    start = time.perf_counter()
    result = subprocess.run(["chromium", "--headless", "--disable-gpu", "--no-sandbox",
                             f"--user-data-dir={profile}", "--window-size=1280,900", "--dump-dom", url],
                            capture_output=True, text=True, timeout=300, check=True)
    found = re.search(r'data-timing="([^"]*)"', result.stdout)
    timing = json.loads(found.group(1).replace("&quot;", '"'))
    return {**timing, "chromium_wall_s": round(time.perf_counter() - start, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[200, 10_000])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gallery-") as folder:
        root = Path(folder)
        files = functools.partial(QuietFiles, directory=str(root))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), files)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        for count in args.jobs:
            store = LocalStorage(root / str(count))
            jobs = fake_run(store, "run", count, missing={5, 17})
            start = time.perf_counter()
            key = build_gallery(store, "run", {jobs[5].job_id: "out of memory", jobs[17].job_id: "bad LoRA"})
            build_s = time.perf_counter() - start
            page = store.root / key
            page.with_name("probe.html").write_text(page.read_text().replace("</body>", PROBE + "</body>"))
            url = f"http://127.0.0.1:{server.server_port}/{count}/run/probe.html"
            print(json.dumps({"jobs": count, "page_bytes": page.stat().st_size,
                              "build_s": round(build_s, 3)}))
            for _ in range(args.repeat):
                print(json.dumps({"jobs": count, **open_timed(url, root / "profile")}))
        server.shutdown()


if __name__ == "__main__":
    main()
