"""worker.reconcile on real Redis and SeaweedFS: after the broker changed, a pending job that no message holds
(its message lost in a failover, or its done mark) is enqueued again or recorded done from storage, once; a
job some message still holds (queued, unacked, held) is left alone, and so is a run still being enqueued.
And the trigger: a worker that connects to a Redis the fleet has not seen sends the reconcile by itself."""

import base64
import hashlib
import json

import pytest
import redis
from kombu import Connection

from tests.fixtures_servers import sdbatch_env, tiny_s3_config, wait_for
from worker import client, progress, reconcile
from worker.app import RedisTransport, make_app
from worker.config import load_config
from worker.messages import queue_list
from worker.storage import S3Storage

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.fixtures_servers"]
QUEUE = "sdbatch-reconcile-test"


def service(tmp_path, broker_url, s3_server, s3_bucket, monkeypatch, micro_batch=2):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    config = tiny_s3_config(tmp_path / "sdbatch.yaml", s3_bucket, QUEUE)
    config.write_text(config.read_text().replace("micro_batch: 1", f"micro_batch: {micro_batch}"))
    env = sdbatch_env(config, broker_url, s3_server)
    return config, env, load_config(config, environ=env), S3Storage(s3_bucket, "runs", s3_server.endpoint_url)


def jobs_of(entry: bytes) -> list[str]:
    return [job["job_id"] for job in json.loads(base64.b64decode(json.loads(entry)["body"]))[0][0]["jobs"]]


def queued(broker: redis.Redis) -> list[list[str]]:
    return sorted(jobs_of(entry) for entry in broker.lrange(queue_list(QUEUE), 0, -1))


def test_lost_jobs_are_enqueued_again_or_found_done_and_held_ones_left_alone(
        tmp_path, redis_url, s3_server, s3_bucket, monkeypatch):
    _, _, settings, store = service(tmp_path, redis_url, s3_server, s3_bucket, monkeypatch)
    broker = redis.Redis.from_url(redis_url)
    run_id = client.enqueue([f"reconcile prompt {n}" for n in range(8)], settings, run_id="reconcile")
    assert queued(broker) == [["0000001-000", "0000002-000"], ["0000003-000", "0000004-000"],
                              ["0000005-000", "0000006-000"], ["0000007-000", "0000008-000"]]
    # oldest first: the batch a failover lost (popped on the dead primary, nowhere on the new one) ...
    assert jobs_of(broker.rpop(queue_list(QUEUE))) == ["0000001-000", "0000002-000"]
    # ... one a worker holds, unacked (kombu's own bookkeeping, as a worker's consumer takes it; kombu puts
    # it back as the connection closes) ...
    connection = Connection(redis_url, transport=RedisTransport, transport_options={"sep": ":"})
    taken = connection.default_channel.basic_get(QUEUE, no_ack=False)
    assert taken is not None and broker.hlen(reconcile.UNACKED_KEY) == 1
    # ... and one that ran, its images stored, whose done marks the failover lost
    ran = jobs_of(broker.rpop(queue_list(QUEUE)))
    hashes = {}
    for job_id in ran:
        png = f"png of {job_id}".encode()
        hashes[job_id] = hashlib.sha256(png).hexdigest()
        store.put(f"{run_id}/images/{job_id}.png", png, "image/png")
        store.put(f"{run_id}/meta/{job_id}.json", json.dumps({"image_sha256": hashes[job_id]}).encode())
    # a run whose enqueue has not sent everything yet: its unsent jobs are not lost
    unsent = client.run_counters(settings, "still-enqueueing")
    unsent.begin(4)

    outcome = reconcile.reconcile(make_app(settings), settings, broker, store)

    assert outcome == {run_id: (2, 2)}
    assert queued(broker) == [["0000001-000", "0000002-000"], ["0000007-000", "0000008-000"]]
    counters = client.run_counters(settings, run_id)
    assert counters.done_ids() == set(ran) and counters.image_hashes() == hashes
    assert counters.status().pending == 6 and broker.hlen(reconcile.UNACKED_KEY) == 1
    assert reconcile.reconcile(make_app(settings), settings, broker, store) == {}  # once: nothing lost now
    connection.close()


def test_a_reconcile_is_requested_once_per_server_change_or_reconnection(redis_url):
    broker = redis.Redis.from_url(redis_url)
    assert reconcile.request(broker, reconnected=False)  # a server the fleet has not seen
    assert not reconcile.request(broker, reconnected=True)  # one is waiting already
    reconcile.started(broker)
    assert not reconcile.request(broker, reconnected=False)  # a worker started on the same server
    assert reconcile.request(broker, reconnected=True)
    reconcile.started(broker)
    broker.set(reconcile.SERVER_KEY, "the run id of a primary that is gone")  # as a promoted replica holds
    assert reconcile.request(broker, reconnected=False)


@pytest.mark.slow
def test_a_worker_on_a_redis_the_fleet_has_not_seen_finishes_a_run_whose_batch_was_lost(
        tmp_path, redis_server, s3_server, s3_bucket, monkeypatch, worker_processes):
    config, env, settings, store = service(tmp_path, redis_server.url(), s3_server, s3_bucket, monkeypatch)
    broker = redis.Redis.from_url(redis_server.url())
    run_id = client.enqueue([f"lost batch prompt {n}" for n in range(6)], settings, run_id="lost-batch")
    lost = jobs_of(broker.rpop(queue_list(QUEUE)))
    worker, = worker_processes.start(1, config, env)
    counters = progress.RunProgress(broker, run_id)
    wait_for(lambda: counters.status().finished, "the run with a lost batch", 180, worker.process,
             worker.log_path)
    assert (counters.status().done, counters.status().failed) == (6, 0)
    assert sorted(store.list(f"{run_id}/images")) == [f"{run_id}/images/{n:07d}-000.png" for n in range(1, 7)]
    assert f"reconcile: run {run_id} had 2 pending jobs that no message held: 0 found stored (done), 2 " \
           "enqueued again" in worker.log_path.read_text()
    assert lost == ["0000001-000", "0000002-000"]
