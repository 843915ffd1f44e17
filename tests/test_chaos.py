"""Chaos: one of two real workers is SIGKILLed (its whole process tree, a machine lost) three times while it
runs a batch, and restarted; the run still ends with every image, each byte-identical to a clean run's, and
counters that count each job exactly once.

The moments are drawn from a seeded random generator (reproducible) as progress counts; the kill waits until
both workers hold a batch (two unacknowledged messages, prefetch 1 each), so it lands mid-batch. How long each
killed batch takes to come back (broker visibility timeout + restore scan + rerun) is measured and printed.
"""

import base64
import io
import json
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis
from PIL import Image

from tests.fixtures_servers import POLL_S, sdbatch_env
from worker import client, progress
from worker.app import VISIBILITY_MARGIN_S
from worker.config import load_config
from worker.storage import LocalStorage, S3Storage

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
JOBS = 300
KILLS = 3
SEED = 20240605
BATCH_TIME_LIMIT_S = 8  # visibility timeout = 8 + 15 s: a killed batch is back in ~25-30 s, not a minute


def unacked_batches(broker: redis.Redis) -> list[set[str]]:
    """The job ids of each message delivered to a worker and not yet acknowledged (kombu's `unacked` hash:
    delivery tag -> [raw message, exchange, routing key]; the body is Celery's [args, kwargs, embed])."""
    batches = []
    for raw in broker.hvals("unacked"):
        message = json.loads(raw)[0]
        args = json.loads(base64.b64decode(message["body"]))[0]
        batches.append({job["job_id"] for job in args[0]["jobs"]})
    return batches


@pytest.fixture
def chaos_service(tmp_path, redis_url, s3_server, s3_bucket, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "sdbatch.yaml"
    config.write_text(textwrap.dedent(f"""\
        model: {{checkpoint: tiny-random, device: cpu}}
        sampling: {{sampler: ddim, steps: 12, width: 64, height: 64, micro_batch: 4}}
        broker: {{queue: sdbatch-chaos}}
        storage: {{url: "s3://{s3_bucket}/runs"}}
        limits: {{batch_time_limit: {BATCH_TIME_LIMIT_S}}}
        """))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"chaos prompt number {n}\n" for n in range(JOBS)))
    env = sdbatch_env(config, redis_url, s3_server)
    return config, prompts, env, load_config(config, environ=env), S3Storage(s3_bucket, "runs",
                                                                              s3_server.endpoint_url)


def test_a_worker_killed_3_times_mid_batch_loses_nothing_and_changes_no_byte(chaos_service, worker_processes,
                                                                             tmp_path):
    config, prompts, env, settings, store = chaos_service
    # the clean run: the same task code in one process (`sdbatch run`), same run id, no faults; it runs while
    # the chaos does (it only reads the prompt file and writes a local folder)
    clean_dir, clean_log = tmp_path / "clean", tmp_path / "clean.log"
    with open(clean_log, "w") as log:
        clean = subprocess.Popen([sys.executable, "-m", "worker.cli", "run", str(prompts), "--config",
                                  str(config), "--run-id", "chaos", "--out", str(clean_dir)],
                                 env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    victim, survivor = worker_processes.start(2, config, env)
    broker = redis.Redis.from_url(settings.broker.url)
    counters = progress.RunProgress(progress.connect(settings.broker.url), "chaos")
    rng = random.Random(SEED)
    targets = sorted(rng.sample(range(10, 200), KILLS))  # progress counts at which to kill

    names = {victim.nodes[0], survivor.nodes[0]}
    client.enqueue(prompts, settings, run_id="chaos")
    start = time.monotonic()
    kills, stranded, returns = [], [], []  # kills: (done, s); stranded: (kill time, the victim's batch)
    while not counters.status().finished or stranded:
        assert time.monotonic() - start < 400, f"run stuck at {counters.status()} after kills {kills}"
        done = counters.done_ids()
        for killed_at, jobs in [entry for entry in stranded if entry[1] <= done]:
            returns.append(time.monotonic() - killed_at)
            stranded.remove((killed_at, jobs))
        if len(kills) < KILLS and len(done) >= targets[len(kills)] and victim.ready_nodes():
            running = [jobs for jobs in unacked_batches(broker) if jobs not in [s for _, s in stranded]]
            if len(running) == 2:  # both workers are inside a batch: the victim dies mid-batch
                victim.kill()
                killed_at = time.monotonic()
                kills.append((len(done), round(killed_at - start, 1)))
                # The survivor acknowledges its batch when it ends (seconds on a loaded machine); the victim's
                # stays unacknowledged until the visibility timeout returns it to the queue.
                deadline = killed_at + BATCH_TIME_LIMIT_S + VISIBILITY_MARGIN_S
                left = running
                while len(left) > 1 and time.monotonic() < deadline:
                    time.sleep(POLL_S)
                    left = [jobs for jobs in unacked_batches(broker) if jobs in running]
                # Unacknowledged whether the kill landed mid-batch or (rarely) after its last image counted
                # and before its ack: either way the batch comes back and must change no byte.
                assert len(left) == 1, left
                stranded.append((killed_at, left[0]))
                victim.spawn()
        time.sleep(POLL_S * 5)
    time.sleep(2)  # a late duplicate, had there been one, would land now
    status = counters.status()
    clean.wait(timeout=300)

    assert len(kills) == KILLS, f"only {len(kills)} kills happened before the run finished: {kills}"
    assert (status.total, status.done, status.failed) == (JOBS, JOBS, 0)
    assert clean.returncode == 0, clean_log.read_text()[-3000:]
    reference = LocalStorage(clean_dir)
    images, metas = store.list("chaos/images"), store.list("chaos/meta")
    assert images == reference.list("chaos/images") and len(images) == JOBS
    assert metas == reference.list("chaos/meta") and len(metas) == JOBS
    for key in images:
        png = store.get(key)
        assert png == reference.get(key), f"{key} differs from the clean run"
        assert Image.open(io.BytesIO(png)).size == (64, 64)
    for key in metas:
        written, expected = json.loads(store.get(key)), json.loads(reference.get(key))
        for varying in ("worker", "timings"):  # who made it and how fast: the only fields allowed to differ
            written.pop(varying), expected.pop(varying)
        assert written == expected
    assert len(names) == 2, names  # two workers on one host, two node names
    visibility = BATCH_TIME_LIMIT_S + VISIBILITY_MARGIN_S
    print(f"\nchaos: kills at (done, s) {kills}; each killed batch back and done after "
          f"{[round(r, 1) for r in returns]} s (visibility timeout {visibility} s); whole run "
          f"{time.monotonic() - start:.1f} s")
    assert len(returns) == KILLS and max(returns) < visibility + 20
