"""The workers' Prometheus metrics (worker/metrics.py) scraped over HTTP from real `sdbatch worker` processes
and read with prometheus_client's own parser, and a batch with a failed job shown as failed in Flower while it
is acknowledged once and its jobs keep their own outcomes."""

import os
import signal
import textwrap
import urllib.request
from pathlib import Path

import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures_servers import free_port, sdbatch_env, wait_for
from worker import cli, client, progress
from worker.app import make_app
from worker.config import load_config
from worker.jobs import run_record
from worker.messages import TASK_NAME, queue_lists, to_message
from worker.metrics import PORT_ENV
from worker.storage import S3Storage

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.fixtures_servers"]

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny-random"
RUN_DEADLINE_S = 180  # 2 cores shared with other test sessions: generous, and every wait ends on its event


@pytest.fixture
def service(tmp_path, redis_url, s3_server, s3_bucket, monkeypatch):
    """tiny-random on the CPU, storage in a fresh bucket, a Redis db and a metrics port of its own."""
    config = tmp_path / "sdbatch.yaml"
    config.write_text(textwrap.dedent(f"""\
        model: {{checkpoint: {MODEL}, device: cpu}}
        sampling: {{sampler: ddim, steps: 2, width: 64, height: 64, micro_batch: 4}}
        broker: {{queue: sdbatch-metrics}}
        storage: {{url: "s3://{s3_bucket}/runs"}}
        limits: {{batch_time_limit: 30}}
        """))
    port = free_port()
    env = sdbatch_env(config, redis_url, s3_server, **{PORT_ENV: str(port)})
    for name, value in s3_server.env().items():  # this process reaches the store as the workers do
        monkeypatch.setenv(name, value)
    store = S3Storage(s3_bucket, "runs", s3_server.endpoint_url)
    return config, env, load_config(config, environ=env), store, port


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    """{(sample name, its labels): value} of the worker's endpoint, as Prometheus reads it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scraped_when(port: int, condition, what: str, worker) -> dict:
    """The first scrape for which `condition(samples)` holds."""
    found = {}

    def holds() -> bool:
        try:
            found["samples"] = scrape(port)
        except OSError:
            return False  # not serving yet
        return condition(found["samples"])

    wait_for(holds, what, RUN_DEADLINE_S, worker.process, worker.log_path)
    return found["samples"]


def counters_of(settings, run_id: str) -> progress.RunProgress:
    return progress.RunProgress(progress.connect(settings.broker.url), run_id)


def wait_until_all_acknowledged(settings, worker) -> None:
    """Until no message waits or runs: every task, the runs' finish tasks included, has returned (and its
    task_postrun has run) and been acknowledged, so kombu has nothing to deliver again."""
    broker = redis.Redis.from_url(settings.broker.url)

    def holds_nothing() -> bool:
        return broker.hlen("unacked") == 0 and not sum(map(broker.llen, queue_lists(settings.broker.queue)))

    wait_for(holds_nothing, "every message acknowledged", RUN_DEADLINE_S, worker.process, worker.log_path)


def test_metrics_scraped_from_a_running_worker_count_exactly_the_runs_jobs(service, worker_processes):
    config, env, settings, _, port = service
    cancelled = client.enqueue(["never run", "nor this"], settings)
    client.cancel(settings, cancelled)
    run_id = client.enqueue([f"prompt {n}" for n in range(6)], settings)  # batches of 4 and 2
    worker, = worker_processes.start(1, config, env)

    wait_for(lambda: counters_of(settings, run_id).status().finished, "the run", RUN_DEADLINE_S,
             worker.process, worker.log_path)
    wait_until_all_acknowledged(settings, worker)
    samples = scrape(port)
    status, dropped = counters_of(settings, run_id).status(), counters_of(settings, cancelled).status()

    assert (status.done, status.failed, dropped.cancelled) == (6, 0, 2)
    assert value(samples, "sdbatch_images_total", model=MODEL, outcome="done") == status.done
    assert value(samples, "sdbatch_images_total", model=MODEL, outcome="failed") == 0  # shown from the start
    assert value(samples, "sdbatch_images_total", model=MODEL, outcome="cancelled") == dropped.cancelled
    assert value(samples, "sdbatch_batch_seconds_count", model=MODEL) == 2
    assert value(samples, "sdbatch_step_seconds_count", model=MODEL) == 2
    assert value(samples, "sdbatch_batch_seconds_sum", model=MODEL) > 0
    assert value(samples, "sdbatch_model_load_seconds", model=MODEL) > 0
    assert value(samples, "sdbatch_batch_size") == 0  # between batches
    assert not [name for name, _ in samples if name == "sdbatch_gpu_memory_bytes"]  # no CUDA here


def test_a_batch_with_a_failed_job_is_failure_in_flower_acked_once_and_its_jobs_keep_their_outcomes(
        service, worker_processes, flower):
    config, env, settings, store, port = service
    worker, = worker_processes.start(1, config, env)
    monitor = flower(env)
    run_id, jobs, _, header = client.prepare(["a fox", "a bird", "a frog"], settings, run_id="one-fails")
    store.put(f"{run_id}/run.jsonl", run_record(run_id, header, jobs))
    counters = counters_of(settings, run_id)
    counters.begin(len(jobs))
    message = to_message(run_id, jobs)
    # enqueue refuses a LoRA no adapter location holds; sent past it, the job fails in the pipeline alone
    message["jobs"][1]["prompt"] = "a bird <lora:missing:1>"
    task = make_app(settings).send_task(TASK_NAME, args=[message], queue=settings.broker.queue)

    def failed_in_flower() -> bool:
        status, body = monitor.get(f"/api/task/info/{task.id}")
        return status == 200 and b'"FAILURE"' in body

    wait_for(failed_in_flower, "the batch's FAILURE in Flower", RUN_DEADLINE_S, worker.process,
             worker.log_path)
    wait_until_all_acknowledged(settings, worker)  # the batch and the run's finish task
    info = monitor.get_json(f"/api/task/info/{task.id}")
    workers = monitor.get_json("/workers?json=1")["data"]
    samples = scrape(port)

    assert "JobsFailed" in info["exception"] and "1 of 3 jobs failed" in info["exception"]
    assert sum(w.get("task-failed", 0) for w in workers) == 1
    assert counters.done_ids() == {"0000001-000", "0000003-000"}
    [(failed_job, reason)] = counters.failures().items()
    assert failed_job == "0000002-000" and reason.startswith("InvalidField: ")  # its own reason, kept
    assert "LoRA 'missing' is not loaded" in reason
    assert counters.status().finished
    # acknowledged (above), so kombu has nothing to restore, and it ran once
    assert value(samples, "sdbatch_batch_seconds_count", model=MODEL) == 1
    assert worker.log_path.read_text().count(f"{TASK_NAME}[{task.id}] received") == 1
    assert value(samples, "sdbatch_images_total", model=MODEL, outcome="done") == 2
    assert value(samples, "sdbatch_images_total", model=MODEL, outcome="failed") == 1
    assert len(store.list(f"{run_id}/images")) == 2


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(int(stat.parent.name))
    return found


def test_a_pool_process_killed_mid_batch_no_longer_counts_in_the_batch_size(service, worker_processes):
    config, env, settings, _, port = service
    worker, = worker_processes.start(1, config, env)
    [celery_main] = children(worker.process.pid)
    [pool_process] = children(celery_main)
    run_id = client.enqueue([{"prompt": "slow one", "steps": 100}, {"prompt": "slow two", "steps": 100}],
                            settings)
    scraped_when(port, lambda s: value(s, "sdbatch_batch_size") == 2, "the batch running", worker)

    os.kill(pool_process, signal.SIGKILL)  # the batch goes back to the queue and a new pool process reruns it
    wait_for(lambda: counters_of(settings, run_id).status().finished, "the rerun batch", RUN_DEADLINE_S,
             worker.process, worker.log_path)
    wait_until_all_acknowledged(settings, worker)
    samples = scrape(port)

    assert counters_of(settings, run_id).status().done == 2
    assert value(samples, "sdbatch_images_total", model=MODEL, outcome="done") == 2
    assert value(samples, "sdbatch_batch_size") == 0  # not 2 left behind by the killed process
    assert value(samples, "sdbatch_batch_seconds_count", model=MODEL) == 1


def test_a_metrics_port_that_is_no_port_stops_sdbatch_worker_before_any_worker_starts(tmp_path, monkeypatch,
                                                                                     capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(PORT_ENV, "98o8")

    assert cli.main(["worker", "--config", str(REPO / "configs/demo.yaml"), "--devices", "cpu"]) == 3
    error = capsys.readouterr().err
    assert "SDBATCH_METRICS_PORT: '98o8' is not a port; accepted: 0 (no metrics endpoint)" in error
