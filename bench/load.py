"""Time to a ready full-size SD 1.5 pipeline: converted .safetensors (fp32 and fp16) vs the original .ckpt.

    flock /tmp/sd-heavy.lock python -m bench.load [--dir /tmp] [--out bench/results/load.json]

Writes, from the random reference weights, an original-layout `.ckpt` (a zip pickle with the 15 non-weight
entries of v1-5-pruned-emaonly.ckpt) and its `sdcore convert` outputs (`.safetensors`, `--half`), then for
each file starts a fresh Python process that runs `sdcore.load(file)` and a 1-step 64x64 generate (text
encoder, every U-Net weight and the VAE decoder touched) and sums every parameter (the VAE encoder too).
Both formats are memory-mapped and lazy, so `sdcore.load` alone would time little more than the index; the
ready time is the fair figure. "cold": the file's page cache is dropped first (drop_caches when writable,
else posix_fadvise DONTNEED on the file); "warm": read just before. Peak RSS is the child's VmHWM minus its
RSS after imports, against the bytes of the loaded weights (target <= 1.3x). Target time: safetensors
<= 0.3x the .ckpt.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Report, reference_models

CHILD = r"""
import json, sys, time
import torch
import sdcore

def status_bytes(field):  # VmRSS now, VmHWM its peak; ru_maxrss would include the parent's (kept by exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

base_rss = status_bytes("VmRSS")
start = time.perf_counter()
pipe = sdcore.load(sys.argv[1])
loaded = time.perf_counter()
pipe.generate(["a lighthouse"], [1], steps=1, width=64, height=64, progress=False)
total = 0.0
with torch.inference_mode():
    for model in (pipe.text_encoder, pipe.unet, pipe.vae):
        for p in model.parameters():
            total += float(p.float().sum())
ready = time.perf_counter()
weights = sum(p.numel() * p.element_size() for m in (pipe.text_encoder, pipe.unet, pipe.vae)
              for p in m.parameters())
peak = status_bytes("VmHWM")
print(json.dumps(dict(load_s=loaded - start, ready_s=ready - start, weight_bytes=weights,
                      dtype=str(pipe.dtype), peak_rss_bytes=peak - base_rss, base_rss_bytes=base_rss)))
"""


def drop_cache(path: Path) -> str:
    """Evict the file from the page cache; returns how."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "fadvise_dontneed"


def warm_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def measure(path: Path, cache: str) -> dict:
    how = drop_cache(path) if cache == "cold" else (warm_cache(path) or "read_before")
    result = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    return dict(json.loads(result.stdout.strip().splitlines()[-1]), cache=cache, cache_method=how)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the ~13 GB of files go")
    parser.add_argument("--repeat", type=int, default=2, help="runs per file and cache state")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()

    free = shutil.disk_usage(args.dir).free
    if free < 16e9:
        sys.exit(f"--dir {args.dir} has {free / 1e9:.1f} GB free; the files need about 16 GB")
    report = Report(args.out)
    from sdcore.checkpoints import convert_checkpoint
    from tests.reference import original_state_dict

    with tempfile.TemporaryDirectory(prefix="bench-load-", dir=args.dir) as tmp:
        files = {"ckpt": Path(tmp, "sd15-random.ckpt"), "safetensors": Path(tmp, "sd15-random.safetensors"),
                 "safetensors_fp16": Path(tmp, "sd15-random-fp16.safetensors")}
        start = time.perf_counter()
        refs = reference_models()
        torch.save({"state_dict": original_state_dict(**refs, non_weights=True)}, files["ckpt"])
        del refs
        gc.collect()
        convert_checkpoint(files["ckpt"], files["safetensors"])
        convert_checkpoint(files["ckpt"], files["safetensors_fp16"], half=True)
        print(f"wrote the files in {time.perf_counter() - start:.0f} s", flush=True)

        results = {}
        for cache in ("cold", "warm"):
            for _ in range(args.repeat):
                for fmt, path in files.items():  # interleaved: the machine is shared
                    row = dict(bench="load", format=fmt, file_bytes=path.stat().st_size,
                               load_avg=os.getloadavg()[0], **measure(path, cache))
                    row["peak_rss_over_weights"] = row["peak_rss_bytes"] / row["weight_bytes"]
                    report.add(**row)
                    results.setdefault((fmt, cache), []).append(row)
        for cache in ("cold", "warm"):
            best = {fmt: min(r["ready_s"] for r in results[(fmt, cache)]) for fmt in files}
            for fmt in ("safetensors", "safetensors_fp16"):
                ratio = best[fmt] / best["ckpt"]
                report.add(bench="load_ratio", format=fmt, cache=cache, ready_s=best[fmt],
                           ckpt_ready_s=best["ckpt"], ratio=ratio)
                print(f"{cache}: {fmt} ready in {best[fmt]:.1f} s vs .ckpt {best['ckpt']:.1f} s: "
                      f"ratio {ratio:.2f}", flush=True)
        for fmt in files:
            rss = max(r["peak_rss_over_weights"] for r in results[(fmt, "cold")] + results[(fmt, "warm")])
            print(f"{fmt}: peak RSS {rss:.2f}x the weights", flush=True)


if __name__ == "__main__":
    main()
