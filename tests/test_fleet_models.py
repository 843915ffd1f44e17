"""Two models on one fleet, end to end on real Redis, SeaweedFS and `sdbatch worker` processes: each line's
model reaches only the workers holding it (a queue per model), a message that reaches the wrong ones fails
clearly instead of rendering, and `enqueue` refuses a model the fleet does not have, by line."""

import hashlib
import json
import textwrap

import pytest
import redis

from sdcore.config import tiny_clip, tiny_unet, tiny_vae
from tests.fixtures_checkpoints import build_references, write_safetensors
from tests.fixtures_servers import sdbatch_env, wait_for
from tests.reference import original_state_dict
from worker import client, progress
from worker.config import load_config
from worker.jobs import PromptFileError
from worker.messages import queue_list
from worker.storage import S3Storage

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.fixtures_servers"]


@pytest.fixture
def fleet(tmp_path, redis_url, s3_server, s3_bucket, monkeypatch):
    """Workers of tiny-random on queue models-a and of another random model, `tiny-b`, on models-b; the
    enqueueing side's config is model a's with a `models:` entry for b."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    other = write_safetensors(tmp_path / "tiny-b.safetensors", original_state_dict(
        **build_references(tiny_unet(), tiny_vae(), tiny_clip(), seed=77)))
    sha256 = hashlib.sha256(other.read_bytes()).hexdigest()

    def config(name: str, checkpoint: str, queue: str, models: str = "") -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(textwrap.dedent(f"""\
            model: {{checkpoint: "{checkpoint}", name: {name}, device: cpu}}
            sampling: {{sampler: ddim, steps: 2, width: 64, height: 64, micro_batch: 2}}
            broker: {{queue: {queue}}}
            storage: {{url: "s3://{s3_bucket}/runs"}}
            limits: {{batch_time_limit: 60}}
            """) + models)
        return path

    models = f"models: {{tiny-b: {{queue: models-b, sha256: {sha256}}}}}\n"
    a = config("tiny-a", "tiny-random", "models-a", models)
    b = config("tiny-b", str(other), "models-b")
    env_a, env_b = (sdbatch_env(path, redis_url, s3_server) for path in (a, b))
    return (a, env_a), (b, env_b), load_config(a, environ=env_a), sha256, \
        S3Storage(s3_bucket, "runs", s3_server.endpoint_url)


def test_each_line_is_made_by_the_model_it_names_and_no_other(fleet, worker_processes):
    (a, env_a), (b, env_b), settings, sha256, store = fleet
    lines = [{"prompt": f"a lighthouse {n}", **({"model": "tiny-b"} if n % 2 else {})} for n in range(8)]
    run_id = client.enqueue(lines, settings, run_id="two-models")
    queued = redis.Redis.from_url(settings.broker.url)
    assert [queued.llen(queue_list(queue)) for queue in ("models-a", "models-b")] == [2, 2]  # batches of 2
    workers = worker_processes.start(1, a, env_a) + worker_processes.start(1, b, env_b)
    counters = progress.RunProgress(progress.connect(settings.broker.url), run_id)

    wait_for(lambda: counters.status().finished, "the two-model run", 180, workers[0].process,
             workers[0].log_path)

    assert (counters.status().done, counters.status().failed) == (8, 0)
    for n in range(8):
        meta = json.loads(store.get(f"{run_id}/meta/{n + 1:07d}-000.json"))
        made_by_b = meta["model"] == "tiny-b" and meta["model_sha256"] == sha256
        assert made_by_b == bool(n % 2), (n, meta["model"], meta["worker"])
        assert meta["model"] == "tiny-b" or meta["model"] == "tiny-random" and meta["random_model"]


def test_a_batch_that_reaches_the_other_models_workers_fails_naming_both(fleet, worker_processes):
    (a, env_a), _, settings, _, store = fleet
    run_id = client.enqueue([{"prompt": "a kite", "model": "tiny-b"}], settings, run_id="misrouted")
    queued = redis.Redis.from_url(settings.broker.url)
    # as if a client had sent it to the wrong queue: model b's message moved into model a's
    queued.lpush(queue_list("models-a"), queued.rpop(queue_list("models-b")))
    worker = worker_processes.start(1, a, env_a)[0]
    counters = progress.RunProgress(progress.connect(settings.broker.url), run_id)

    wait_for(lambda: counters.status().finished, "the misrouted batch", 120, worker.process, worker.log_path)

    [(job_id, reason)] = counters.failures().items()
    assert reason.startswith("a batch for model tiny-b reached a worker holding tiny-a; accepted: the queue")
    assert store.list(f"{run_id}/images") == []


def test_enqueue_refuses_a_model_the_fleet_does_not_have_by_line(fleet):
    _, _, settings, _, _ = fleet
    lines = ["plain", {"prompt": "x", "model": "tiny-b"}, {"prompt": "y", "model": "sdxl"},
             {"prompt": "z", "model": "bad name"}]

    with pytest.raises(PromptFileError) as refused:
        client.prepare(lines, settings)

    assert refused.value.errors == [
        "prompts:3: model: 'sdxl' is not a model of this fleet; accepted: tiny-a, tiny-b (model.name and the "
        "config's models:)",
        "prompts:4: model: 'bad name' is not a model name; accepted: 1-64 characters of A-Z a-z 0-9 _ . -"]
