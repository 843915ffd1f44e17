"""What a reconcile after a failover costs (worker.reconcile): reading a queue backlog of N messages, then a
whole reconcile of the run they belong to (nothing lost, so nothing is sent again).

    python -m bench.reconcile [--messages 10000] [--redis redis://127.0.0.1:6379/14] [--out FILE]

The run is enqueued as `sdbatch enqueue` would (micro-batches of 4, normal priority, file storage in a
temporary folder) into a Redis db that this flushes before and after: give it one nobody else uses.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import redis

from bench.common import Report
from worker import client, reconcile
from worker.app import make_app
from worker.config import load_config
from worker.messages import queue_list

QUEUE, MICRO_BATCH = "bench-reconcile", 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args()
    report = Report(args.out)
    broker = redis.Redis.from_url(args.redis)
    with tempfile.TemporaryDirectory() as folder:
        config = Path(folder) / "sdbatch.yaml"
        config.write_text(f"""\
model: {{checkpoint: tiny-random, device: cpu}}
sampling: {{micro_batch: {MICRO_BATCH}}}
broker: {{queue: {QUEUE}, url: "{args.redis}"}}
storage: {{url: "file://{folder}/out"}}
""")
        settings = load_config(config, environ={})
        broker.flushdb()
        try:
            prompts = [f"a bench prompt, number {n}, highly detailed, by a painter" for n in range(
                args.messages * MICRO_BATCH)]
            run_id = client.enqueue(prompts, settings, run_id="bench-reconcile")
            messages = broker.llen(queue_list(QUEUE))
            start = time.perf_counter()
            held = reconcile.held_jobs(broker, [QUEUE])
            read_s = time.perf_counter() - start
            assert len(held[run_id]) == len(prompts)
            start = time.perf_counter()
            assert reconcile.reconcile(make_app(settings), settings, broker, None) == {}
            whole_s = time.perf_counter() - start
        finally:
            broker.flushdb()
    report.add(bench="reconcile", messages=messages, jobs=len(prompts), read_s=read_s, reconcile_s=whole_s)
    print(f"{messages} queued messages ({len(prompts)} jobs): read in {read_s:.2f} s, a whole reconcile "
          f"{whole_s:.2f} s")


if __name__ == "__main__":
    main()
