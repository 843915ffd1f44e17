"""A run's finish, end to end on real Redis, SeaweedFS and `sdbatch worker` processes: the results manifest,
the stream event and one signed POST to the run's hook per finish, also when workers race on the last jobs,
when the receiver is down at first, and again after `retry` finishes the run a second time."""

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from tests.fixtures_servers import sdbatch_env, tiny_s3_config, wait_for
from worker import client, progress
from worker.config import load_config
from worker.finish import EVENTS_STREAM, SIGNATURE_HEADER
from worker.messages import queue_list
from worker.storage import S3Storage

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.fixtures_servers"]
SECRET = "hook-secret-for-the-test"


class Receiver:
    """A local HTTP endpoint that answers 503 to its first `down_for` requests, then 204, keeping each body
    it accepted with its signature."""

    def __init__(self, down_for: int = 0):
        self.down_for, self.attempts, self.accepted = down_for, 0, []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts += 1
                if receiver.attempts <= receiver.down_for:
                    self.send_response(503)
                else:
                    receiver.accepted.append((body, self.headers.get(SIGNATURE_HEADER)))
                    self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/sdbatch"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def summaries(self) -> list[dict]:
        for body, signature in self.accepted:
            assert signature == "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        return [json.loads(body) for body, _ in self.accepted]


@pytest.fixture
def service(tmp_path, redis_url, s3_server, s3_bucket, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    config = tiny_s3_config(tmp_path / "sdbatch.yaml", s3_bucket, "sdbatch-finish-test")
    env = sdbatch_env(config, redis_url, s3_server, SDBATCH_HOOK_SECRET=SECRET)
    receiver = Receiver(down_for=2)
    store = S3Storage(s3_bucket, "runs", s3_server.endpoint_url)
    yield config, env, load_config(config, environ=env), store, receiver
    receiver.server.shutdown()


def manifest(store, run_id: str) -> list[dict]:
    return [json.loads(line) for line in store.get(f"{run_id}/results.jsonl").decode().splitlines()]


def test_two_workers_racing_on_the_last_jobs_send_one_signed_post_after_the_receiver_recovers(
        service, worker_processes):
    config, env, settings, store, receiver = service
    run_id = client.enqueue(["a red fox", "a blue bird"], settings, notify=receiver.url)
    counters = progress.RunProgress(progress.connect(settings.broker.url), run_id)
    workers = worker_processes.start(2, config, env)

    wait_for(lambda: counters.finish_step_done(1, "hook"), "the hook of the finished run", 180,
             workers[0].process, workers[0].log_path)

    [summary] = receiver.summaries()
    assert receiver.attempts == 3  # two answered 503, then the one accepted
    assert {key: summary[key] for key in ("event_id", "run_id", "total", "done", "failed", "cancelled")} == {
        "event_id": f"{run_id}/1", "run_id": run_id, "total": 2, "done": 2, "failed": 0, "cancelled": 0}
    assert summary["manifest"] == f"{run_id}/results.jsonl" and summary["elapsed_s"] > 0
    events = redis.Redis.from_url(settings.broker.url).xrange(EVENTS_STREAM)
    assert [json.loads(fields[b"summary"])["event_id"] for _, fields in events] == [f"{run_id}/1"]
    assert counters.client.hget(counters.info_key, "finishes") == b"1"


def test_the_manifest_lists_every_job_in_input_order_and_is_rewritten_when_retry_finishes_the_run(
        service, worker_processes):
    config, env, settings, store, receiver = service
    receiver.down_for = 0
    run_id = client.enqueue(["first", {"prompt": "second", "images": 2}, "third"], settings,
                            notify=receiver.url)
    broker = redis.Redis.from_url(settings.broker.url)
    broker.lpop(queue_list(settings.broker.queue))  # the newest message, the third line's, never runs ...
    counters = progress.RunProgress(progress.connect(settings.broker.url), run_id)
    counters.failed("0000003-000", "RuntimeError: CUDA error: an illegal memory access")  # ... as if failed
    workers = worker_processes.start(1, config, env)
    wait_for(lambda: counters.finish_step_done(1, "hook"), "the first finish", 180, workers[0].process,
             workers[0].log_path)

    first = manifest(store, run_id)
    assert [(entry["job_id"], entry["status"]) for entry in first] == [
        ("0000001-000", "done"), ("0000002-000", "done"), ("0000002-001", "done"), ("0000003-000", "failed")]
    assert first[3]["reason"] == "RuntimeError: CUDA error: an illegal memory access"
    for entry in first[:3]:
        assert entry["image_sha256"] == hashlib.sha256(store.get(entry["image_key"])).hexdigest()
        assert json.loads(store.get(entry["meta_key"]))["seed"] == entry["seed"]

    assert client.retry(settings, run_id) == 1
    wait_for(lambda: counters.finish_step_done(2, "hook"), "the finish after retry", 180, workers[0].process,
             workers[0].log_path)

    again = manifest(store, run_id)
    assert [entry["status"] for entry in again] == ["done"] * 4
    assert again[3]["image_sha256"] == hashlib.sha256(store.get(again[3]["image_key"])).hexdigest()
    assert [(s["event_id"], s["done"], s["failed"]) for s in receiver.summaries()] == [
        (f"{run_id}/1", 3, 1), (f"{run_id}/2", 4, 0)]
