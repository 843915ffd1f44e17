"""Soak: 1,000 jobs through one real `sdbatch worker` (tiny-random, CPU) on a private Redis and SeaweedFS S3,
recording the worker's resident memory (RSS) from start to end: a long run must keep it flat.

    python -m bench.soak --jobs 1000 --out bench-out/soak.json

"start" is sampled once the first batch is stored (model loaded, first-call allocations made), "end" when the
last job is counted; `pool` is the pool process that holds the model and runs the batches, `tree` the whole
process group (supervisor + Celery main process + pool). Uses the test fixtures' server classes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

from tests.fixtures_servers import RedisServer, S3Server, WorkerProcesses, sdbatch_env
from worker import client, progress
from worker.config import load_config


def rss_mib(worker) -> dict[str, float]:
    """RSS of the worker's pool process (the largest Celery child) and of its whole process tree, MiB."""
    leader = psutil.Process(worker.process.pid)
    tree = [leader, *leader.children(recursive=True)]
    sizes = {process.pid: process.memory_info().rss for process in tree if process.is_running()}
    return {"pool": round(max(sizes.values()) / 2**20, 1), "tree": round(sum(sizes.values()) / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="sdbatch-soak-"))
    redis_server = RedisServer(dir=root / "redis")
    s3 = S3Server(data_dir=root / "s3", log_path=root / "weed.log")
    redis_server.start()
    s3.start()
    workers = WorkerProcesses(root)
    try:
        bucket = s3.create_bucket()
        config = root / "soak.yaml"
        config.write_text(textwrap.dedent(f"""\
            model: {{checkpoint: tiny-random, device: cpu}}
            sampling: {{sampler: ddim, steps: {args.steps}, width: 64, height: 64, micro_batch: 4}}
            storage: {{url: "s3://{bucket}/soak"}}
            """))
        env = sdbatch_env(config, redis_server.url(), s3)
        os.environ.update({k: v for k, v in env.items() if k.startswith(("AWS_", "SDBATCH_S3"))})
        settings = load_config(config, environ=env)
        worker, = workers.start(1, config, env)

        started = time.monotonic()
        run_id = client.enqueue([f"soak prompt {n}" for n in range(args.jobs)], settings, run_id="soak")
        counters = progress.RunProgress(progress.connect(settings.broker.url), run_id)
        samples, start_rss = [], None
        while not counters.status().finished:
            done = counters.status().done
            sample = {"s": round(time.monotonic() - started, 1), "done": done, **rss_mib(worker)}
            if start_rss is None and done >= 4:
                start_rss = sample
            samples.append(sample)
            time.sleep(1.0)
        seconds = time.monotonic() - started
        end_rss = {"s": round(seconds, 1), "done": counters.status().done, **rss_mib(worker)}
        status = counters.status()
        report = {
            "jobs": args.jobs, "steps": args.steps, "size": "64x64", "micro_batch": 4, "model": "tiny-random",
            "done": status.done, "failed": status.failed, "seconds": round(seconds, 1),
            "images_per_s": round(status.done / seconds, 2),
            "rss_start_mib": start_rss, "rss_end_mib": end_rss,
            "rss_max_mib": {key: max(s[key] for s in samples) for key in ("pool", "tree")},
            "pool_growth_mib": round(end_rss["pool"] - start_rss["pool"], 1),
            "machine": f"{platform.node()} {os.cpu_count()} cpus", "samples": samples,
        }
    finally:
        workers.kill_all()
        s3.stop()
        redis_server.stop()
    print(json.dumps({k: v for k, v in report.items() if k != "samples"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
