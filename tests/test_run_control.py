"""Run control on a shared queue, end to end on real Redis, SeaweedFS and `sdbatch worker` processes: cancel
and pause/unpause act on one run and leave the others alone; a high-priority run overtakes a backlog."""


import pytest
import redis

from tests.fixtures_servers import sdbatch_env, tiny_s3_config, wait_for
from worker import client, progress
from worker.config import load_config
from worker.messages import queue_lists
from worker.storage import S3Storage

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.fixtures_servers"]


@pytest.fixture
def service(tmp_path, redis_url, s3_server, s3_bucket, monkeypatch):
    """tiny-random, one job a batch (so "the batch in flight" is one image), storage in a fresh bucket."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    config = tiny_s3_config(tmp_path / "sdbatch.yaml", s3_bucket, "sdbatch-control-test")
    env = sdbatch_env(config, redis_url, s3_server)
    return config, env, load_config(config, environ=env), S3Storage(s3_bucket, "runs", s3_server.endpoint_url)


def counters(settings, run_id: str) -> progress.RunProgress:
    return progress.RunProgress(progress.connect(settings.broker.url), run_id)


def wait(worker, what: str, condition, deadline_s: float = 180) -> None:
    wait_for(condition, what, deadline_s, worker.process, worker.log_path)


def test_a_cancelled_run_ends_done_plus_cancelled_and_the_run_behind_it_completes(service, worker_processes):
    config, env, settings, store = service
    client.enqueue([f"a fox number {i}" for i in range(120)], settings, run_id="doomed")
    client.enqueue(["a bird", "a frog"], settings, run_id="other")
    doomed, other = counters(settings, "doomed"), counters(settings, "other")
    worker = worker_processes.start(1, config, env)[0]
    wait(worker, "the first image of the doomed run", lambda: doomed.status().done >= 1)

    client.cancel(settings, "doomed")
    done_when_cancelled = doomed.status().done
    wait(worker, "both runs to end", lambda: doomed.status().finished and other.status().finished)

    status = doomed.status()
    assert status.state == "cancelled" and status.failed == 0 and status.cancelled > 0
    assert status.done + status.cancelled == status.total == 120
    assert status.done <= done_when_cancelled + 1  # at most the batch that was in flight
    assert len(store.list("doomed/images")) == status.done
    assert (other.status().done, other.status().cancelled) == (2, 0)
    with pytest.raises(client.RunError, match="is cancelled; accepted: `sdbatch resume doomed`"):
        client.retry(settings, "doomed")


def test_a_paused_run_steps_aside_for_the_next_run_and_completes_after_unpause(service, worker_processes):
    config, env, settings, store = service
    client.enqueue([f"a lake at dawn {i}" for i in range(60)], settings, run_id="held", priority="low")
    client.enqueue(["a bird", "a frog"], settings, run_id="behind", priority="low")
    held, behind = counters(settings, "held"), counters(settings, "behind")
    worker = worker_processes.start(1, config, env)[0]
    wait(worker, "the first image of the run to pause", lambda: held.status().done >= 1)

    client.pause(settings, "held")
    done_when_paused = held.status().done
    wait(worker, "the run behind the paused one", lambda: behind.status().finished)
    queued = redis.Redis.from_url(settings.broker.url)
    wait(worker, "every batch of the paused run set aside",
         lambda: queued.llen(held.held_key) == 60 - held.status().done)

    status = held.status()
    assert status.state == "paused" and not status.finished
    assert status.done <= done_when_paused + 1
    assert behind.status().done == 2
    assert client.unpause(settings, "held") == 60 - status.done
    wait(worker, "the unpaused run", lambda: held.status().finished)
    assert (held.status().done, held.status().state) == (60, "active")
    assert len(store.list("held/images")) == 60


def test_cancelling_a_paused_run_cancels_its_set_aside_batches(service, worker_processes):
    config, env, settings, _ = service
    client.enqueue([f"a hill {i}" for i in range(6)], settings, run_id="shelved")
    shelved = counters(settings, "shelved")
    client.pause(settings, "shelved")  # before any worker: every batch is set aside
    worker = worker_processes.start(1, config, env)[0]
    queued = redis.Redis.from_url(settings.broker.url)
    wait(worker, "the paused run's batches set aside", lambda: queued.llen(shelved.held_key) == 6)

    assert client.cancel(settings, "shelved") == 6

    status = shelved.status()
    assert (status.done, status.cancelled, status.finished, queued.llen(shelved.held_key)) == (0, 6, True, 0)


def test_a_high_priority_run_overtakes_a_backlog_of_low_priority_batches(service, worker_processes):
    config, env, settings, _ = service
    client.enqueue([f"a field {i}" for i in range(10)], settings, run_id="bulk", priority="low")
    client.enqueue(["a boat", "a kite", "a tower"], settings, run_id="urgent", priority="high")
    bulk, urgent = counters(settings, "bulk"), counters(settings, "urgent")
    client.enqueue(["a cloud"], settings, run_id="plain")  # normal, the default
    # the lists KEDA watches (deploy/k8s/keda.yaml) are where the messages are
    queued = redis.Redis.from_url(settings.broker.url)
    assert [queued.llen(name) for name in queue_lists(settings.broker.queue)] == [3, 1, 10]
    worker = worker_processes.start(1, config, env)[0]

    wait(worker, "both runs", lambda: urgent.status().finished and bulk.status().finished)

    # one worker runs one batch at a time, so these times are an order: the backlog's first batch started
    # only after the urgent run's last image was stored
    assert urgent.status().done == 3 and bulk.status().done == 10
    assert bulk.status().started >= urgent.status().last_done
