"""A Redis failover loses nothing: a run in flight on a Sentinel-managed primary whose primary is SIGKILLed,
twice, finishes with every image stored once, in the bytes a run without faults makes, and its counters
exact. Real Redis primary + replica + three Sentinels, SeaweedFS and worker processes (docs/scaling.md,
"Sentinel and failover", says why nothing is lost and what would come back how)."""

import base64
import hashlib
import io
import json
import logging
import re
import textwrap
import time

import pytest
from PIL import Image

from tests.fixtures_servers import sdbatch_env, wait_for
from worker import client
from worker.config import load_config
from worker.messages import queue_list
from worker.storage import S3Storage

pytest_plugins = ["tests.fixtures_servers"]

JOBS = 240
MICRO_BATCH = 2
FAILOVER_DEADLINE_S = 60.0
RUN_DEADLINE_S = 600.0  # a loaded 2-core machine; a batch lost in a failover waits out its visibility timeout


def service(tmp_path, sentinel_group, s3_server, s3_bucket, monkeypatch):
    """A tiny-random config on the Sentinels' primary and the test's bucket: (path, environment, settings)."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "sdbatch.yaml"
    config.write_text(textwrap.dedent(f"""\
        model: {{checkpoint: tiny-random, device: cpu}}
        sampling: {{sampler: ddim, steps: 4, width: 64, height: 64, micro_batch: {MICRO_BATCH}}}
        broker: {{queue: sdbatch-failover, master_name: {sentinel_group.master_name}}}
        storage: {{url: "s3://{s3_bucket}/runs"}}
        limits: {{batch_time_limit: 20}}
        """))
    env = sdbatch_env(config, sentinel_group.url, s3_server)
    return config, env, load_config(config, environ=env)


def job_ids() -> set[str]:
    return {f"{n:07d}-000" for n in range(1, JOBS + 1)}


def pixels(png: bytes) -> bytes:
    image = Image.open(io.BytesIO(png))
    assert image.size == (64, 64)
    return image.tobytes()


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_survives_two_primary_kills_with_every_image_once_and_exact_counters(
        tmp_path, sentinel_group, s3_server, s3_bucket, worker_processes, monkeypatch):
    config, env, settings = service(tmp_path, sentinel_group, s3_server, s3_bucket, monkeypatch)
    store = S3Storage(s3_bucket, "runs", s3_server.endpoint_url)
    workers = worker_processes.start(2, config, env)
    prompts = [f"failover prompt {n}" for n in range(JOBS)]

    start = time.monotonic()
    run_id = client.enqueue(prompts, settings, run_id="failover", seed=7)
    counters = client.run_counters(settings, run_id)
    first, second = sentinel_group.data_ports
    timeline, done_at_kills = [], []
    for killed, rejoin in ((first, True), (second, False)):
        under_way = counters.status().done + 6
        wait_for(lambda target=under_way: counters.status().done >= target, "the run under way", 180)
        done_at_kills.append(counters.status().done)
        sentinel_group.kill(killed)
        primary, failover_s = sentinel_group.wait_failover(killed, FAILOVER_DEADLINE_S)
        done_after = counters.status().done  # on the new primary: fewer if done marks were lost
        timeline.append(f"killed {killed} at {done_at_kills[-1]}/{JOBS} done, {primary} primary after "
                        f"{failover_s:.1f} s with {done_after} done")
        wait_for(lambda target=done_after + 2: counters.status().done >= target, "the run after the failover",
                 180)
        if rejoin:  # the second failover needs a replica to promote: the first victim, back on its data
            # as a replica of the new primary, as docs/scaling.md says to return a node: restarted as a
            # primary, it takes writes for the ~10 s before the Sentinels demote it, and they are lost
            sentinel_group.start_data_node(killed, replica_of=primary)
            resync_s = sentinel_group.wait_replica_synced(killed, primary)
            timeline.append(f"{killed} a synced replica after {resync_s:.1f} s")
    wait_for(lambda: counters.status().finished, "the run after two failovers", RUN_DEADLINE_S)
    finished_s = time.monotonic() - start
    status = counters.status()

    clean_id = client.enqueue(prompts, settings, run_id="no-failover", seed=7)
    clean = client.run_counters(settings, clean_id)
    wait_for(lambda: clean.status().finished, "the run without faults", RUN_DEADLINE_S)

    assert done_at_kills[-1] < JOBS  # both kills came mid-run
    lost = sorted(job_ids() - counters.done_ids())
    assert (status.total, status.done, status.failed, status.cancelled) == (JOBS, JOBS, 0, 0), \
        f"{'; '.join(timeline)}; failed: {counters.failures()}; not done: {lost}"
    assert counters.done_ids() == job_ids()
    expected = sorted(f"{run_id}/images/{job}.png" for job in job_ids())
    assert store.list(f"{run_id}/images") == expected
    assert len(store.list(f"{run_id}/meta")) == JOBS
    hashes = counters.image_hashes()
    for job in sorted(job_ids()):
        png = store.get(f"{run_id}/images/{job}.png")
        assert hashlib.sha256(png).hexdigest() == hashes[job]  # the bytes the counters recorded, once
        # the pixels of a run without faults (its PNG's text chunk names the other run)
        assert pixels(png) == pixels(store.get(f"{clean_id}/images/{job}.png"))
    assert all(worker.running for worker in workers)
    logs = "".join(worker.log_path.read_text() for worker in workers)
    batches_run = len(re.findall(r"generate_batch\[[-0-9a-f]+\] succeeded in", logs))
    print(f"\nfailover: {'; '.join(timeline)}; run finished {finished_s:.0f} s after its enqueue; "
          f"{batches_run - 2 * JOBS // MICRO_BATCH} batches ran twice; reconciles that found lost jobs: "
          f"{'; '.join(re.findall(r'reconcile: run failover (had .*)', logs)) or 'none'}")


@pytest.mark.integration
def test_an_enqueue_that_sees_a_failover_resumes_its_run_on_the_new_primary(
        tmp_path, sentinel_group, s3_server, s3_bucket, monkeypatch, caplog):
    _, _, settings = service(tmp_path, sentinel_group, s3_server, s3_bucket, monkeypatch)
    publish = client.publish

    def publish_then_fail_over(*args):
        monkeypatch.setattr(client, "publish", publish)  # once: the resume publishes on the new primary
        count = publish(*args)
        killed = sentinel_group.primary()
        sentinel_group.kill(killed)
        sentinel_group.wait_failover(killed, FAILOVER_DEADLINE_S)
        return count

    monkeypatch.setattr(client, "publish", publish_then_fail_over)
    caplog.set_level(logging.WARNING, logger="worker.client")

    run_id = client.enqueue([f"enqueue failover {n}" for n in range(10)], settings, run_id="enqueue-failover")

    counters = client.run_counters(settings, run_id)
    assert (counters.status().total, counters.status().pending) == (10, 10)
    queued = counters.client.lrange(queue_list("sdbatch-failover"), 0, -1)
    jobs = [job["job_id"] for entry in queued
            for job in json.loads(base64.b64decode(json.loads(entry)["body"]))[0][0]["jobs"]]
    assert set(jobs) == {f"{n:07d}-000" for n in range(1, 11)}  # sent again whether lost or not
    assert "failed over while it was enqueued; resuming it" in caplog.text
