"""The config's `adapters:` section: LoRAs, embeddings and VAEs in S3 reach a real worker (downloaded,
checked and cached) and every image's metadata; a run naming a LoRA or VAE the locations lack is refused at
enqueue."""

import hashlib
import io
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from PIL import Image

import sdcore
from sdcore.config import tiny_clip, tiny_unet
from sdcore.params import Request
from tests.fixtures_servers import sdbatch_env, wait_for
from tests.reference import reference_text_encoder, reference_unet
from tests.test_adapters import write_vae_file
from tests.test_lora import (
    addnet_hash,
    kohya_state_dict,
    random_layers,
    text_encoder_names,
    unet_linear_names,
    write_lora,
)
from worker import client, progress
from worker.adapters import Adapters
from worker.config import AdapterSettings, ConfigError, load_config
from worker.jobs import PromptFileError
from worker.messages import queue_list
from worker.storage import LocalStorage, S3Storage

pytest_plugins = ["tests.fixtures_servers"]
QUEUE = "sdbatch-adapters-test"


def write_config(tmp_path, text: str) -> Path:
    path = tmp_path / "sdbatch.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("section, expected", [
    ("adapters: {url: ftp://x/y}", "adapters.url: 'ftp://x/y' has an unsupported scheme; accepted: s3://"),
    ("adapters: {dir: 3}", "adapters.dir: 3 is not a path; accepted: a folder path holding loras/"),
    ("adapters: {cache: ''}", "adapters.cache: '' is not a path; accepted: a folder path"),
    ("adapters: {loras: x}", "adapters.loras: is not a known key; accepted: dir, url, cache"),
    ("adapters: [x]", "adapters: is a list; accepted: a mapping"),
    ("adapters: {url: s3://Bad_Bucket/x}", "adapters.url: 'Bad_Bucket' is not a bucket name"),
])
def test_adapter_config_errors_name_the_file_the_key_and_the_accepted_values(tmp_path, section, expected):
    path = write_config(tmp_path, f"model: {{checkpoint: tiny-random}}\n{section}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert str(error.value).startswith(f"{path}: {expected}")


def test_model_vae_and_adapters_load_and_default_to_none(tmp_path):
    plain = load_config(write_config(tmp_path, "model: {checkpoint: tiny-random}\n"), environ={})
    assert plain.model.vae is None and not plain.adapters.configured
    settings = load_config(write_config(tmp_path, """\
        model: {checkpoint: tiny-random, vae: /models/vae.safetensors}
        adapters: {dir: /srv/adapters, url: "s3://my-bucket/adapters", cache: /tmp/cache}
        """), environ={})
    assert settings.model.vae == "/models/vae.safetensors"
    assert settings.adapters == AdapterSettings("/srv/adapters", "s3://my-bucket/adapters", "/tmp/cache")
    with pytest.raises(ConfigError, match=r"model\.vae: 5 is not a path; accepted: the path of a VAE"):
        load_config(write_config(tmp_path, "model: {checkpoint: tiny-random, vae: 5}\n"), environ={})


def lora_files(folder: Path) -> dict[str, Path]:
    """Two kohya LoRAs on the tiny-random model's shapes: one on the U-Net, one on the text encoder."""
    unet, text_encoder = reference_unet(tiny_unet(), seed=1), reference_text_encoder(tiny_clip(), seed=2)
    unet_state = kohya_state_dict("unet", random_layers(unet, unet_linear_names(unet), rank=2, seed=3), 1)
    text_state = kohya_state_dict("text_encoder", random_layers(
        text_encoder, text_encoder_names(text_encoder), rank=2, seed=4), 1)
    return {"style": write_lora(folder / "style.safetensors", unet_state),
            "detail": write_lora(folder / "detail.pt", text_state)}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_download_that_does_not_check_out_is_fetched_again_never_used(tmp_path):
    (tmp_path / "store" / "loras").mkdir(parents=True)
    (tmp_path / "store" / "loras" / "x.safetensors").write_bytes(b"the real bytes")
    adapters = Adapters(AdapterSettings(url=f"file://{tmp_path / 'store'}", cache=str(tmp_path / "cache")))

    path = adapters.path("loras", "x")
    assert path.read_bytes() == b"the real bytes" and path.parent != tmp_path / "store" / "loras"
    path.write_bytes(b"the real b")  # truncated in the cache
    assert adapters.path("loras", "x").read_bytes() == b"the real bytes"
    assert (path.parent / "x.safetensors.sha256").read_text() == hashlib.sha256(b"the real bytes").hexdigest()
    assert list(Adapters(AdapterSettings(url=f"file://{tmp_path / 'store'}")).available("loras")) == ["x"]
    assert LocalStorage(tmp_path / "store").list("loras") == ["loras/x.safetensors"]


@pytest.fixture
def service(tmp_path, redis_url, s3_server, s3_bucket, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    config = write_config(tmp_path, f"""\
        model: {{checkpoint: tiny-random, device: cpu}}
        sampling: {{sampler: ddim, steps: 2, width: 64, height: 64, micro_batch: 4}}
        broker: {{queue: {QUEUE}}}
        storage: {{url: "s3://{s3_bucket}/runs"}}
        adapters: {{url: "s3://{s3_bucket}/adapters", cache: "{tmp_path / 'cache'}"}}
        limits: {{batch_time_limit: 60}}
        """)
    env = sdbatch_env(config, redis_url, s3_server)
    settings = load_config(config, environ=env)
    adapters = S3Storage(s3_bucket, "adapters", s3_server.endpoint_url)
    return config, env, settings, S3Storage(s3_bucket, "runs", s3_server.endpoint_url), adapters


@pytest.mark.integration
def test_loras_an_embedding_and_a_vae_in_s3_reach_a_real_worker_and_the_metadata(service, worker_processes,
                                                                                 tmp_path):
    config, env, settings, store, adapter_store = service
    files = lora_files(tmp_path)
    embedding = tmp_path / "glow.pt"
    torch.save({"string_to_param": {"*": torch.randn(2, tiny_clip().width)}, "name": "inside"}, embedding)
    for path in files.values():
        adapter_store.put(f"loras/{path.name}", path.read_bytes())
    adapter_store.put("embeddings/glow.pt", embedding.read_bytes())
    vae = write_vae_file(tmp_path / "ft-test.safetensors", seed=5)
    adapter_store.put("vaes/ft-test.safetensors", vae.read_bytes())
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "a glow fox", "loras": [{"name": "style", "weight": 0.7}], "vae": "ft-test"},
             {"prompt": "a bird <lora:detail:0.5>", "images": 2}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    workers = worker_processes.start(1, config, env)

    run_id = client.enqueue(prompts, settings, run_id="adapters")
    counters = progress.RunProgress(progress.connect(settings.broker.url), run_id)
    wait_for(lambda: counters.status().finished, f"run {run_id}", 120, workers[0].process,
             workers[0].log_path)

    status = counters.status()
    assert (status.total, status.done, status.failed) == (3, 3, 0), counters.failures()
    first = json.loads(store.get(f"{run_id}/meta/0000001-000.json"))
    assert first["loras"] == [{"name": "style", "weight": 0.7, "sha256": sha256(files["style"]),
                               "shorthash": addnet_hash(files["style"])[:12]}]
    assert first["embeddings"] == [{"name": "glow", "sha256": sha256(embedding)}]
    assert first["vae"] == "ft-test"
    assert first["vae_file"] == {"name": "ft-test.safetensors", "sha256": sha256(vae)}
    png = Image.open(io.BytesIO(store.get(f"{run_id}/images/0000001-000.png")))
    assert f"VAE hash: {sha256(vae)[:10]}, VAE: ft-test.safetensors" in png.text["parameters"]
    # the worker's image is the one sdcore makes here from the recorded settings and the same files
    here = sdcore.load("tiny-random", device="cpu")
    here.add_lora(files["style"]), here.add_embedding(embedding, "glow"), here.add_vae(vae)
    remade = here.run([Request.from_dict(first)], progress=False)[0].image
    assert np.abs(np.array(remade, dtype=int) - np.array(png.convert("RGB"), dtype=int)).max() <= 1
    second = json.loads(store.get(f"{run_id}/meta/0000002-001.json"))
    assert second["loras"] == [] and "embeddings" not in second and "vae" not in second
    assert second["prompt_loras"] == [{"name": "detail", "weight": 0.5, "sha256": sha256(files["detail"]),
                                       "shorthash": sha256(files["detail"])[:12]}]
    png = Image.open(io.BytesIO(store.get(f"{run_id}/images/0000002-000.png")))
    assert f'Lora hashes: "detail: {sha256(files["detail"])[:12]}"' in png.text["parameters"]
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.sha256"))
    assert cached == ["detail.pt.sha256", "ft-test.safetensors.sha256", "glow.pt.sha256",
                      "style.safetensors.sha256"]


@pytest.mark.integration
def test_a_run_naming_a_missing_lora_or_vae_is_refused_by_line_and_nothing_is_queued(service, tmp_path):
    config, env, settings, store, adapter_store = service
    adapter_store.put("loras/style.safetensors", b"not read at enqueue")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "fine <lora:style:1>"}, {"prompt": "a fox <lora:nope:0.5>"},
        {"prompt": "a bird", "loras": [["gone", 1]]}, {"prompt": "plain"},
        {"prompt": "x", "vae": "ft"}]) + "\n")

    with pytest.raises(PromptFileError) as error:
        client.enqueue(prompts, settings, run_id="refused")

    assert error.value.errors == [
        f"{prompts}:2: loras: LoRA 'nope' is not in {settings.adapters.url}/loras; accepted: style",
        f"{prompts}:3: loras: LoRA 'gone' is not in {settings.adapters.url}/loras; accepted: style",
        f"{prompts}:5: vae: VAE 'ft' is not in {settings.adapters.url}/vaes; accepted: none there"]
    assert not store.exists("refused/run.jsonl")
    assert redis.Redis.from_url(settings.broker.url).llen(queue_list(QUEUE)) == 0


def test_enqueue_checks_loras_against_a_local_folder_or_refuses_them_without_adapters(tmp_path):
    (tmp_path / "adapters" / "loras").mkdir(parents=True)
    (tmp_path / "adapters" / "loras" / "style.ckpt").write_bytes(b"x")
    lines = ["a fox <lora:style:1>", {"prompt": "a bird", "loras": [["other", 1]]}, "plain"]
    plain = load_config(write_config(tmp_path, "model: {checkpoint: tiny-random}\n"), environ={})
    with pytest.raises(PromptFileError) as error:
        client.prepare(lines, plain)
    assert error.value.errors[0] == ("prompts:1: loras: LoRA 'style' is not in any adapter location "
                                     "(the config has no adapters: section); accepted: none there")
    local = load_config(write_config(tmp_path, f"model: {{checkpoint: tiny-random}}\n"
                                               f"adapters: {{dir: {tmp_path / 'adapters'}}}\n"), environ={})
    with pytest.raises(PromptFileError) as error:
        client.prepare(lines, local)
    assert error.value.errors == [f"prompts:2: loras: LoRA 'other' is not in {tmp_path}/adapters/loras; "
                                  "accepted: style"]
    _, jobs, skipped, _ = client.prepare(lines, local, skip_invalid=True)
    assert [job.line for job in jobs] == [1, 3] and len(skipped) == 1
