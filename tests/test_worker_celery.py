"""The distributed service end to end: `sdbatch enqueue` -> Redis -> real `sdbatch worker` processes ->
SeaweedFS S3, with progress in Redis and tasks visible in Flower. No part is simulated."""

import io
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis
from kombu import Connection, Producer
from PIL import Image

from tests.fixtures_servers import sdbatch_env, wait_for
from worker import client, progress
from worker.app import make_app
from worker.config import load_config
from worker.messages import FINISH_TASK_NAME, TASK_NAME, queue_list
from worker.storage import S3Storage

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.fixtures_servers"]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def service(tmp_path, redis_url, s3_server, s3_bucket):
    """A config for tiny-random on the CPU, storage in a fresh S3 bucket, a Redis db of its own."""
    config = tmp_path / "sdbatch.yaml"
    config.write_text(textwrap.dedent(f"""\
        model: {{checkpoint: tiny-random, device: cpu}}
        sampling: {{sampler: ddim, steps: 2, width: 64, height: 64, micro_batch: 4}}
        broker: {{queue: sdbatch-test}}
        storage: {{url: "s3://{s3_bucket}/runs"}}
        limits: {{batch_time_limit: 30}}
        """))
    env = sdbatch_env(config, redis_url, s3_server)
    settings = load_config(config, environ=env)
    store = S3Storage(s3_bucket, "runs", s3_server.endpoint_url)
    return config, env, settings, store


@pytest.fixture(autouse=True)
def aws_env(s3_server, monkeypatch):
    """This process talks to the test S3 as the workers do: credentials from the standard variables only."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)


def wait_until_finished(settings, run_id: str, deadline_s: float, workers) -> progress.Status:
    counters = progress.RunProgress(progress.connect(settings.broker.url), run_id)
    wait_for(lambda: counters.status().finished, f"run {run_id}", deadline_s, workers[0].process,
             workers[0].log_path)
    return counters.status()


def sdbatch(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300, cwd=REPO)


def test_enqueued_prompts_come_back_as_images_and_metadata_in_s3(service, worker_processes):
    config, env, settings, store = service
    workers = worker_processes.start(1, config, env)
    prompts = ["a red fox", {"prompt": "a blue bird", "seed": 7, "images": 2}, "a green frog"]

    run_id = client.enqueue(prompts, settings)
    status = wait_until_finished(settings, run_id, 120, workers)

    assert (status.total, status.done, status.failed) == (4, 4, 0)
    assert store.list(f"{run_id}/images") == [f"{run_id}/images/{j}.png" for j in
                                              ("0000001-000", "0000002-000", "0000002-001", "0000003-000")]
    meta = json.loads(store.get(f"{run_id}/meta/0000002-001.json"))
    assert (meta["prompt"], meta["seed"], meta["line"], meta["image"]) == ("a blue bird", 8, 2, 1)
    assert re.fullmatch(r"cpu(-\d+)?@.+", meta["worker"])  # cpu-2@host when another worker holds cpu@host
    assert sdbatch("status", run_id, "--config", str(config), env=env).returncode == 0


def test_cli_enqueue_prints_the_run_id_last_and_status_waits_for_the_end(service, worker_processes, tmp_path):
    config, env, settings, store = service
    workers = worker_processes.start(1, config, env)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n")

    enqueued = sdbatch("enqueue", str(prompts), "--config", str(config), "--run-id", "cli-run", env=env)
    waited = sdbatch("status", "cli-run", "--config", str(config), "--wait", env=env)

    assert enqueued.returncode == 0, enqueued.stderr
    assert enqueued.stdout.strip().splitlines()[-1] == "cli-run"
    assert waited.returncode == 0, waited.stderr + workers[0].log_path.read_text()[-3000:]
    assert "cli-run: 3/3 done, 0 failed, 0 pending" in waited.stdout
    assert len(store.list("cli-run/images")) == 3


def test_enqueue_refuses_a_bad_file_and_sends_nothing(service, tmp_path):
    config, env, settings, _ = service
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": "bad", "width": 100}\n{"prompt": "x", "seed": -1}\n')

    result = sdbatch("enqueue", str(prompts), "--config", str(config), env=env)

    assert result.returncode == 3
    assert f"{prompts}:2: width: 100 is not a multiple of 8" in result.stderr
    assert f"{prompts}:3: seed: -1 is out of range" in result.stderr
    assert redis.Redis.from_url(settings.broker.url).llen(queue_list(settings.broker.queue)) == 0


def test_a_message_shows_a_short_summary_not_a_repr_of_all_its_jobs(service):
    _, _, settings, _ = service
    client.enqueue([f"prompt {n}" for n in range(6)], settings, run_id="summary")

    raw = redis.Redis.from_url(settings.broker.url).lrange(queue_list(settings.broker.queue), 0, -1)
    headers = [json.loads(message)["headers"] for message in raw]
    assert sorted(h["argsrepr"] for h in headers) == ["[run summary: 2 jobs, 0000005-000..0000006-000]",
                                                      "[run summary: 4 jobs, 0000001-000..0000004-000]"]
    assert {h["kwargsrepr"] for h in headers} == {"{}"}


def test_poison_messages_are_rejected_and_the_worker_serves_the_next_job(service, worker_processes):
    config, env, settings, store = service
    workers = worker_processes.start(1, config, env)
    broker = redis.Redis.from_url(settings.broker.url)
    good = client.enqueue(["before the poison"], settings)
    wait_until_finished(settings, good, 120, workers)
    queue = settings.broker.queue
    for raw in (b"{not json", b'{"body": "not base64", "headers": {}}', json.dumps([1, 2, 3]).encode()):
        broker.lpush(queue, raw)  # not even an envelope
    with Connection(settings.broker.url) as connection:  # an envelope whose body is not JSON
        Producer(connection).publish("{not json", routing_key=queue, content_type="application/json",
                                     content_encoding="utf-8", headers={"task": TASK_NAME, "id": "bad-body"})
    app = make_app(settings)
    app.send_task(TASK_NAME, args=[{"version": 1}], queue=queue, serializer="pickle")
    bad_run = {"version": 1, "run_id": "../../x", "generation": {}, "jobs": []}
    for message in ({"version": 9}, bad_run, "text"):
        app.send_task(TASK_NAME, args=[message], queue=queue)
    app.send_task(TASK_NAME, args=[], queue=queue)  # wrong arity

    after = client.enqueue(["after the poison"], settings)
    status = wait_until_finished(settings, after, 120, workers)

    assert status.done == 1 and workers[0].running
    log = workers[0].log_path.read_text()
    assert "Unrecoverable error" not in log and "restarting" not in log  # the same worker served it all
    assert log.count("dropped a queue entry that is not a Celery message") == 3
    assert "rejected message" in log and "version 9 is not supported" in log
    assert "run_id: '../../x' is not a valid run id" in log
    assert "Refusing to deserialize untrusted content of type pickle" in log
    assert "Can't decode message body" in log


@pytest.mark.slow
def test_200_prompts_through_2_workers_all_land_in_s3_matching_their_lines(service, worker_processes,
                                                                          tmp_path, flower):
    from sdcore.png import read_settings

    config, env, settings, store = service
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": f"prompt number {n}", **({"seed": 1000 + n} if n % 2 else {})} for n in range(200)]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    workers = worker_processes.start(2, config, env)
    monitor = flower(env)

    enqueued = sdbatch("enqueue", str(prompts), "--config", str(config), "--run-id", "r200", env=env)
    assert enqueued.returncode == 0, enqueued.stderr
    status = wait_until_finished(settings, "r200", 600, workers)

    assert (status.done, status.failed) == (200, 0)
    images, metas = store.list("r200/images"), store.list("r200/meta")
    assert len(images) == len(metas) == 200
    for n, line in enumerate(lines):
        job_id = f"{n + 1:07d}-000"
        png = store.get(f"r200/images/{job_id}.png")
        stored = read_settings(png)
        meta = json.loads(store.get(f"r200/meta/{job_id}.json"))
        assert stored["prompt"] == meta["prompt"] == line["prompt"]
        assert stored["seed"] == meta["seed"] and ("seed" not in line or stored["seed"] == line["seed"])
        assert Image.open(io.BytesIO(png)).size == (64, 64)
    assert len({json.loads(store.get(key))["worker"] for key in metas}) >= 1
    tasks = monitor.get_json("/api/tasks?limit=1000")
    succeeded = [task["name"] for task in tasks.values() if task["state"] == "SUCCESS"]
    assert succeeded.count(TASK_NAME) == 50  # 200 jobs / micro_batch 4
    assert succeeded.count(FINISH_TASK_NAME) == 1  # the run's manifest and announcement (worker.finish)
    assert monitor.get("/api/workers", auth=False)[0] == 401


def test_resume_rebuilds_a_run_from_storage_after_redis_lost_everything(service, worker_processes):
    config, env, settings, store = service
    run_id = client.enqueue([f"prompt {n}" for n in range(6)], settings)
    broker = redis.Redis.from_url(settings.broker.url)
    broker.flushdb()  # queue, counters and unacked messages gone: only storage remembers the run

    resumed = sdbatch("resume", run_id, "--config", str(config), env=env)
    workers = worker_processes.start(1, config, env)
    status = wait_until_finished(settings, run_id, 120, workers)

    assert resumed.returncode == 0 and f"re-enqueued 6 missing jobs of {run_id}" in resumed.stdout
    assert (status.total, status.done, status.failed) == (6, 6, 0)
    assert len(store.list(f"{run_id}/images")) == len(store.list(f"{run_id}/meta")) == 6
    again = sdbatch("resume", run_id, "--config", str(config), env=env)
    assert f"re-enqueued 0 missing jobs of {run_id}" in again.stdout


def test_failed_lists_failures_and_retry_runs_them_again(service, worker_processes):
    config, env, settings, store = service
    run_id = client.enqueue(["first", "second"], settings)
    broker = redis.Redis.from_url(settings.broker.url)
    broker.delete(queue_list(settings.broker.queue))  # the batch never ran ...
    counters = progress.RunProgress(progress.connect(settings.broker.url), run_id)
    counters.failed("0000002-000", "RuntimeError: CUDA error: an illegal memory access")  # ... as if failed

    listed = sdbatch("failed", run_id, "--config", str(config), env=env)
    status_before = sdbatch("status", run_id, "--config", str(config), env=env)
    retried = sdbatch("retry", run_id, "--config", str(config), env=env)
    workers = worker_processes.start(1, config, env)
    wait_for(lambda: counters.status().done == 1, "the retried job", 120, workers[0].process,
             workers[0].log_path)

    assert listed.stdout == "0000002-000\tline 2\tRuntimeError: CUDA error: an illegal memory access\n"
    assert status_before.returncode == 2  # some failed
    assert f"re-enqueued 1 failed jobs of {run_id}" in retried.stdout
    assert counters.failures() == {} and counters.done_ids() == {"0000002-000"}
    assert store.list(f"{run_id}/images") == [f"{run_id}/images/0000002-000.png"]
