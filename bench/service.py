"""Service-side benchmarks: what Celery + Redis + S3 cost against `pipe.generate` in-process, how
fast `sdbatch enqueue` takes 10,000 prompts, how two pinned workers scale against one, and what micro-batching
gives in-process.

    python -m bench.service [--quick] [--only enqueue] [--out bench-out/service.json]

Model: tiny-random (the only weights this machine has), sized so that its compute is representative: at the
defaults (128x128, ddim, 10 steps, CFG 7.5, micro-batch 4) one batch takes ~1-1.5 s on one CPU core, so
per-image service costs (PNG encode, S3 PUT of image and metadata, Redis counters, Celery delivery) weigh as
they would on a model a few times slower, not as on a 10 ms toy. Every process runs ONE torch thread: the
workers get OMP_NUM_THREADS=1 (as tests/fixtures_servers.py sets it), this process torch.set_num_threads(1).

1. overhead: images/s of one real `sdbatch worker` (private Redis, SeaweedFS S3), from just before
   `client.enqueue` to the last job's completion stamp, after a warm-up run of one batch; against
   `pipe.generate` in this process on the same model, sizes and micro-batch (measured before and after the
   service run, averaged). Target >= 0.95x. Worker start-up and model load are excluded.
2. enqueue: wall time of `sdbatch enqueue` of a 10,000-line prompt file (process start, validation, run
   record to S3, 10,000 / micro-batch messages to Redis); best of N. Target <= 3 s.
3. scaling: two workers pinned to one core each (`taskset -c`) against one pinned worker, same images per
   worker. Target >= 1.8x. A machine that other work shares gives pinned workers less than their core:
   each run records the CPU share each worker's process tree got, and the ratio per core received.
4. micro-batching: in-process images/s at micro-batch 1, 2, 4, 8, and the speed-up over 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path

import torch

import sdcore
from bench.common import PROMPT, Report
from bench.service_fixtures import Service
from sdcore.params import Generation, Request
from sdcore.png import png_bytes
from tests.fixtures_servers import console_script
from worker.messages import queue_lists
from worker.storage import open_storage

REPO = Path(__file__).resolve().parent.parent
ENQUEUE_PROMPTS = 10_000
MICRO_BATCHES = (1, 2, 4, 8)
MEASUREMENTS = ("micro_batching", "enqueue", "overhead", "scaling")
# images per measurement: (overhead run, scaling run per worker, each micro-batch setting, enqueue repeats)
FULL = {"overhead": 64, "scaling": 64, "micro_batching": 32, "enqueue_repeats": 3}
QUICK = {"overhead": 8, "scaling": 8, "micro_batching": 8, "enqueue_repeats": 1}


def prompts_for(count: int) -> list[str]:
    return [f"{PROMPT}, variation {n}" for n in range(count)]


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def in_process_rate(pipe, count: int, micro_batch: int, generation: dict) -> float:
    """images/s of pipe.generate over `count` images in micro-batches, after one warm-up batch."""
    prompts = prompts_for(count)
    pipe.generate(prompts[:micro_batch], list(range(micro_batch)), progress=False, **generation)
    start = time.perf_counter()
    for first in range(0, count, micro_batch):
        batch = prompts[first:first + micro_batch]
        pipe.generate(batch, list(range(first, first + len(batch))), progress=False, **generation)
    return count / (time.perf_counter() - start)


def png_encode_s(pipe, micro_batch: int, generation: dict) -> float:
    """Seconds to encode one image as the worker stores it (sdcore.png with its settings chunk)."""
    images = pipe.generate(prompts_for(micro_batch), list(range(micro_batch)), progress=False, **generation)
    settings = pipe.metadata(Request(PROMPT, 0, generation=Generation(**generation)))
    start = time.perf_counter()
    for image in images:
        png_bytes(image, settings)
    return (time.perf_counter() - start) / len(images)


def run_metadata(settings, run_id: str) -> list[dict]:
    store = open_storage(settings.storage)
    return [json.loads(store.get(key)) for key in store.list(f"{run_id}/meta")]


def worker_timings(metas: list[dict]) -> dict:
    """Mean per-image seconds the workers recorded in the jobs' metadata: the image's share of its batch's
    pipe.generate, and its S3 PUT."""
    return {name: round(statistics.mean(m["timings"][name] for m in metas), 4)
            for name in ("generate_s", "upload_s")}


def measure_micro_batching(pipe, report: Report, count: int, generation: dict) -> dict:
    count = max(count // max(MICRO_BATCHES), 1) * max(MICRO_BATCHES)  # whole batches at every size
    rates = {}
    for micro_batch in MICRO_BATCHES:
        rates[micro_batch] = in_process_rate(pipe, count, micro_batch, generation)
        report.add(benchmark="micro_batching", micro_batch=micro_batch, images=count,
                   threads=torch.get_num_threads(),
                   images_per_s=round(rates[micro_batch], 3),
                   speedup_vs_1=round(rates[micro_batch] / rates[1], 3), load_1m=load_1m())
    return {"images_per_s": {mb: round(r, 3) for mb, r in rates.items()},
            "speedup_vs_1": {mb: round(r / rates[1], 3) for mb, r in rates.items()}}


def sdbatch_executable() -> str:
    return console_script("sdbatch", "pip install -e '.[worker]'")


def measure_enqueue(service: Service, report: Report, repeats: int, sampling: dict) -> dict:
    # a queue no worker consumes: the messages only have to reach Redis
    config, env, settings = service.config("enqueue", sampling, queue="bench-enqueue")
    prompt_file = service.root / "prompts-10k.txt"
    prompt_file.write_text("".join(f"{p}\n" for p in prompts_for(ENQUEUE_PROMPTS)))
    messages = -(-ENQUEUE_PROMPTS // sampling["micro_batch"])
    client = service.redis_client()
    walls = []
    for repeat in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sdbatch_executable(), "enqueue", str(prompt_file), "--config", str(config),
                               "--run-id", f"enqueue-{repeat}"], env=env, cwd=REPO, capture_output=True,
                              text=True)
        walls.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise RuntimeError(f"sdbatch enqueue exited {done.returncode}: {done.stderr[-2000:]}")
        queued = sum(client.llen(name) for name in queue_lists(settings.broker.queue))
        if queued != messages * (repeat + 1):
            raise RuntimeError(f"expected {messages * (repeat + 1)} messages in {settings.broker.queue}, "
                               f"found {queued}")
        inner = re.search(r"in ([0-9.]+) s", done.stderr)
        report.add(benchmark="enqueue", prompts=ENQUEUE_PROMPTS, messages=messages,
                   wall_s=round(walls[-1], 3), reported_by_command_s=float(inner.group(1)) if inner else None,
                   load_1m=load_1m())
    return {"prompts": ENQUEUE_PROMPTS, "messages": messages, "best_s": round(min(walls), 3),
            "walls_s": [round(w, 3) for w in walls]}


def measure_overhead(service: Service, pipe, report: Report, count: int, sampling: dict,
                     generation: dict) -> dict:
    micro_batch = sampling["micro_batch"]
    config, env, settings = service.config("overhead", sampling)
    before = in_process_rate(pipe, count, micro_batch, generation)
    service.start_workers(config, env, cpus=[None])
    service.timed_run(settings, prompts_for(micro_batch), "overhead-warmup")
    timing = service.timed_run(settings, prompts_for(count), "overhead")
    service.stop_workers()
    after = in_process_rate(pipe, count, micro_batch, generation)
    in_process = (before + after) / 2
    served = count / timing.seconds
    timings = worker_timings(run_metadata(settings, "overhead"))
    result = {"images": count, "service_images_per_s": round(served, 3),
              "in_process_images_per_s": round(in_process, 3),
              "in_process_before_after": [round(before, 3), round(after, 3)],
              "ratio": round(served / in_process, 3), "worker_per_image_s": timings,
              "in_process_per_image_s": round(1 / in_process, 4),
              "worker_core_share": round(timing.core_share[0], 3),
              "overhead_per_image_s": round(1 / served - 1 / in_process, 4),
              "png_encode_per_image_s": round(png_encode_s(pipe, micro_batch, generation), 4)}
    report.add(benchmark="overhead", **result, load_1m=load_1m())
    return result


def measure_scaling(service: Service, report: Report, count: int, sampling: dict) -> dict:
    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        report.add(benchmark="scaling", skipped=f"needs 2 cores, this process may use {cores}")
        return {"skipped": "fewer than 2 cores"}
    config, env, settings = service.config("scaling", sampling)
    rates, shares = {}, {}
    for workers in (1, 2):
        service.start_workers(config, env, cpus=cores[:workers])
        # a warm-up batch or two per worker: first-call allocations are not part of the steady state
        warmup = prompts_for(2 * sampling["micro_batch"] * workers)
        service.timed_run(settings, warmup, f"scaling-{workers}-warmup")
        images = count * workers
        timing = service.timed_run(settings, prompts_for(images), f"scaling-{workers}")
        service.stop_workers()
        rates[workers] = images / timing.seconds
        shares[workers] = timing.core_share
        served_by = Counter(meta["worker"] for meta in run_metadata(settings, f"scaling-{workers}"))
        report.add(benchmark="scaling", workers=workers, cores=cores[:workers], images=images,
                   images_per_s=round(rates[workers], 3), images_by_worker=dict(served_by),
                   core_share=[round(share, 3) for share in timing.core_share], load_1m=load_1m())
    # the ratio had each worker had its whole core: images per CPU-second the workers received, x2 vs x1
    per_core = {workers: rates[workers] / sum(shares[workers]) for workers in rates}
    return {"one_worker_images_per_s": round(rates[1], 3), "two_workers_images_per_s": round(rates[2], 3),
            "ratio": round(rates[2] / rates[1], 3), "cores": cores,
            "core_share": {workers: [round(x, 3) for x in share] for workers, share in shares.items()},
            "ratio_per_core_received": round(2 * per_core[2] / per_core[1], 3)}


def print_summary(summary: dict, described: str) -> None:
    print(f"\nService benchmarks ({described}; one torch thread per process)")
    if over := summary.get("overhead"):
        worker = over["worker_per_image_s"]
        print(f"  overhead:  {over['service_images_per_s']:.3f} img/s through Celery+Redis+S3 vs "
              f"{over['in_process_images_per_s']:.3f} in-process = {over['ratio']:.3f}x (target >= 0.95x); "
              f"per image: {over['overhead_per_image_s'] * 1000:.0f} ms more than in-process "
              f"{over['in_process_per_image_s']:.3f} s; worker generate {worker['generate_s']:.3f} s, "
              f"PNG encode {over['png_encode_per_image_s'] * 1000:.1f} ms, "
              f"image PUT {worker['upload_s'] * 1000:.1f} ms; the worker got {over['worker_core_share']:.2f} "
              "of a core")
    if enq := summary.get("enqueue"):
        print(f"  enqueue:   {enq['prompts']:,} prompts ({enq['messages']:,} messages) in "
              f"{enq['best_s']:.2f} s (best of {len(enq['walls_s'])}: {enq['walls_s']}; target <= 3 s)")
    if (scale := summary.get("scaling")) and "ratio" in scale:
        print(f"  scaling:   2 pinned workers {scale['two_workers_images_per_s']:.3f} img/s vs 1 pinned "
              f"{scale['one_worker_images_per_s']:.3f} = {scale['ratio']:.3f}x (target >= 1.8x); the workers "
              f"got {scale['core_share']} of a core each, {scale['ratio_per_core_received']:.2f}x per core "
              "received")
    elif scale:
        print(f"  scaling:   skipped ({scale['skipped']})")
    if mb := summary.get("micro_batching"):
        rates = "  ".join(f"{b}: {rate:.3f} img/s ({mb['speedup_vs_1'][b]:.2f}x)"
                          for b, rate in mb["images_per_s"].items())
        print(f"  micro-batch (in-process): {rates}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few images per measurement: a smoke run")
    parser.add_argument("--out", default=None, help="JSON report, written after every measurement")
    parser.add_argument("--size", type=int, default=128, help="image width and height (default 128)")
    parser.add_argument("--steps", type=int, default=10, help="ddim steps (default 10)")
    parser.add_argument("--micro-batch", type=int, default=4,
                        help="micro-batch of the overhead, scaling and enqueue runs (default 4)")
    parser.add_argument("--only", choices=MEASUREMENTS, action="append",
                        help="run only this measurement (repeatable; default: all)")
    args = parser.parse_args()
    only = args.only or MEASUREMENTS

    torch.set_num_threads(1)
    counts = QUICK if args.quick else FULL
    generation = {"sampler": "ddim", "steps": args.steps, "guidance_scale": 7.5, "width": args.size,
                  "height": args.size}
    sampling = {**generation, "micro_batch": args.micro_batch}
    described = (f"tiny-random {args.size}x{args.size}, ddim {args.steps} steps, CFG 7.5, "
                 f"micro-batch {args.micro_batch}")
    report = Report(args.out)
    report.data["machine"].update(load_start=os.getloadavg(), workload=described)
    pipe = sdcore.load("tiny-random") if {"micro_batching", "overhead"} & set(only) else None

    summary = {}
    if "micro_batching" in only:
        summary["micro_batching"] = measure_micro_batching(pipe, report, counts["micro_batching"], generation)
    if {"enqueue", "overhead", "scaling"} & set(only):
        with Service.running() as service:
            if "enqueue" in only:
                summary["enqueue"] = measure_enqueue(service, report, counts["enqueue_repeats"], sampling)
            if "overhead" in only:
                summary["overhead"] = measure_overhead(service, pipe, report, counts["overhead"], sampling,
                                                       generation)
            if "scaling" in only:
                summary["scaling"] = measure_scaling(service, report, counts["scaling"], sampling)
    report.data.update(summary=summary)
    report.data["machine"]["load_end"] = os.getloadavg()
    report.save()
    print_summary(summary, described)


if __name__ == "__main__":
    main()
