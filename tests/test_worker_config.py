"""Config files: valid ones load into frozen settings; every mistake names the file, the key and what is
accepted; the environment overrides the broker and the store; secrets never reach output."""

import dataclasses
import textwrap
from pathlib import Path

import pytest

from worker.app import celery_config
from worker.config import ConfigError, SentinelURL, load_config, parse_sentinel_url, redact_url

REPO = Path(__file__).resolve().parent.parent
MINIMAL = "model: {checkpoint: tiny-random}\n"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "sdbatch.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name", ["demo.yaml", "sd15-fp16.yaml", "sd15-fp32-cpu.yaml"])
def test_shipped_configs_load(name):
    settings = load_config(REPO / "configs" / name, environ={})

    assert settings.broker.queue.startswith("sdbatch")


def test_demo_config_is_the_embedded_tiny_cpu_setup():
    settings = load_config(REPO / "configs" / "demo.yaml", environ={})

    assert (settings.model.checkpoint, settings.model.device, settings.model.precision) == \
        ("tiny-random", "cpu", "fp32")
    assert settings.storage.url == "file://./outputs"
    assert settings.sampling.generation.width * settings.sampling.generation.height <= 128 * 128


def test_a_minimal_config_gets_the_documented_defaults(tmp_path):
    settings = load_config(write(tmp_path, MINIMAL), environ={})

    assert settings.sampling.generation.sampler == "ddpm" and settings.sampling.generation.steps == 50
    assert settings.broker.queue == "sdbatch"
    assert settings.limits.max_pixels == 1024 * 1024


def test_settings_are_frozen(tmp_path):
    settings = load_config(write(tmp_path, MINIMAL), environ={})

    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.sampling.generation.steps = 3


@pytest.mark.parametrize(("text", "expected"), [
    ("model: {checkpoint: tiny-random}\nsampler: {steps: 3}\n",
     "sampler: is not a known section; accepted: model, sampling, broker, storage, limits"),
    ("sampling: {steps: 3}\n", "model: is missing"),
    ("model: {precision: fp32}\n",
     "model.checkpoint: is missing; accepted: a checkpoint path or tiny-random"),
    ("model: {checkpoint: tiny-random, precision: fp8}\n",
     "model.precision: 'fp8' is not a precision; accepted: fp32, fp16, bf16"),
    ("model: {checkpoint: tiny-random, device: tpu}\n",
     "model.device: 'tpu' is not a device; accepted: auto, cpu, cuda"),
    ("model: {checkpoint: tiny-random, device: cpu, precision: bf16}\n",
     "model.precision: bf16 on device cpu is unsupported; accepted: fp32 on cpu"),
    ("model: {checkpoint: tiny-random, winograd: 'yes'}\n",
     "model.winograd: 'yes' is not a boolean; accepted: true, false"),
    ("model: {checkpoint: tiny-random, device: cuda, winograd: true}\n",
     "model.winograd: true with device cuda, precision fp32; accepted: true only with precision fp32"),
    ("model: {checkpoint: tiny-random, precision: fp16, winograd: true}\n",
     "model.winograd: true with device auto, precision fp16; accepted: true only with precision fp32"),
    (MINIMAL + "model_x: 1\n", "model_x: is not a known section"),
    (MINIMAL + "sampling: {stpes: 20}\n",
     "sampling.stpes: is not a known key; accepted: sampler, steps, guidance_scale, width, height, eta, "
     "clip_skip, loras, vae, micro_batch, seed"),
    (MINIMAL + "sampling: {strength: 0.5}\n", "sampling.strength: is not a known key"),  # txt2img only
    (MINIMAL + "sampling: {steps: 0}\n",
     "sampling.steps: 0 is out of range; accepted: an integer from 1 to 500"),
    (MINIMAL + "sampling: {steps: '20'}\n", "sampling.steps: '20' is a str; accepted: an integer"),
    (MINIMAL + "sampling: {sampler: k_lms}\n",
     "sampling.sampler: 'k_lms' is not a known sampler; accepted: ddpm, ddim, euler_a, dpmpp_2m, "
     "dpmpp_2m_karras"),
    (MINIMAL + "sampling: {width: 500}\n", "sampling.width: 500 is not a multiple of 8"),
    (MINIMAL + "sampling: {guidance_scale: .nan}\n", "sampling.guidance_scale: nan is not finite"),
    (MINIMAL + "limits: {max_steps: 1000}\n",
     "limits.max_steps: 1000 is over 999; accepted: 1 to 999 (sdcore's samplers run at most 999 steps)"),
    (MINIMAL + "sampling: {micro_batch: 0}\n",
     "sampling.micro_batch: 0 is out of range; accepted: an integer from 1"),
    (MINIMAL + "limits: {max_pixels: 262144}\nsampling: {width: 1024, height: 1024}\n",
     "sampling.width: 1024x1024 is 1048576 pixels, over the budget; accepted: width * height <= "
     "limits.max_pixels = 262144"),
    (MINIMAL + "limits: {max_steps: -1}\n", "limits.max_steps: -1 is out of range"),
    (MINIMAL + "limits: {max_steps: 20}\n",  # sdcore's default of 50 steps is over this deployment's limit
     "sampling.steps: 50 is out of range; accepted: an integer from 1 to 20"),
    (MINIMAL + "limits: {max_gpus: 2}\n",
     "limits.max_gpus: is not a known key; accepted: max_pixels, max_steps"),
    (MINIMAL + "broker: {url: 'amqp://localhost'}\n",
     "broker.url: 'amqp://localhost' is not a Redis URL; accepted: redis://[:PASSWORD@]HOST:PORT/DB or rediss://"),
    (MINIMAL + "broker: {queue: 'a queue'}\n", "broker.queue: 'a queue' is not a queue name"),
    (MINIMAL + "storage: {url: 'ftp://host/x'}\n",
     "storage.url: 'ftp://host/x' has an unsupported scheme; accepted: s3://BUCKET/PREFIX or file:///"),
    (MINIMAL + "storage: {url: 's3://Bad_Bucket/x'}\n", "storage.url: 'Bad_Bucket' is not a bucket name"),
    (MINIMAL + "storage: {url: 's3://bucket/runs/../x'}\n",
     "storage.url: prefix segment '..' is not allowed"),
    (MINIMAL + "storage: {url: 's3://bucket/x', endpoint_url: 'localhost:9000'}\n",
     "storage.endpoint_url: 'localhost:9000' is not an endpoint URL; accepted: http(s)://HOST[:PORT]"),
    (MINIMAL + "storage: {url: 's3://bucket/x', access_key: AKIA}\n",
     "storage.access_key: is not a known key; accepted: url, endpoint_url"),
    ("[1, 2]\n", "expected a mapping with sections model, sampling"),
    ("model: {checkpoint: [\n", "not valid YAML"),
])
def test_config_errors_name_the_file_the_key_and_the_accepted_values(tmp_path, text, expected):
    path = write(tmp_path, text)

    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})

    assert str(error.value).startswith(f"{path}: ")
    assert expected in str(error.value)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: cannot read config"):
        load_config(tmp_path / "nowhere.yaml", environ={})


def test_environment_overrides_broker_storage_and_endpoint(tmp_path):
    environ = {"SDBATCH_BROKER_URL": "redis://:s3cret@redis.internal:6380/2",
               "SDBATCH_STORAGE_URL": "s3://images/runs", "SDBATCH_S3_ENDPOINT_URL": "http://127.0.0.1:8333"}

    settings = load_config(write(tmp_path, MINIMAL), environ=environ)

    assert settings.broker.url == "redis://:s3cret@redis.internal:6380/2"
    assert settings.storage.url == "s3://images/runs"
    assert settings.storage.endpoint_url == "http://127.0.0.1:8333"


def test_a_bad_override_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="SDBATCH_BROKER_URL: 'http://x' is not a Redis URL"):
        load_config(write(tmp_path, MINIMAL), environ={"SDBATCH_BROKER_URL": "http://x"})


def test_a_broker_password_is_redacted_even_in_the_error_that_rejects_its_url(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, MINIMAL), environ={"SDBATCH_BROKER_URL": "amqp://user:hunter2@host/"})

    assert "hunter2" not in str(error.value)
    assert "amqp://user:***@host/" in str(error.value)


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
    ("rediss://default:s3cret@host:6380/1?ssl_cert_reqs=required",
     "rediss://default:***@host:6380/1?ssl_cert_reqs=required"),
    ("redis://host:6379/0", "redis://host:6379/0"),
])
def test_redact_url_hides_only_the_password(url, shown):
    assert redact_url(url) == shown


def test_celery_settings_carry_the_delivery_guarantees(tmp_path):
    settings = load_config(write(tmp_path, MINIMAL + "limits: {batch_time_limit: 40}\n"), environ={})

    conf = celery_config(settings)

    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    transport = conf["broker_transport_options"]
    assert 40 < transport["visibility_timeout"] <= 60 - transport["unacked_restore_interval"]
    assert transport["unacked_restore_throttle"] == 1
    assert conf["worker_send_task_events"] and conf["task_send_sent_event"]
    assert conf["task_default_queue"] == "sdbatch"


def test_rediss_urls_get_certificate_checking(tmp_path):
    settings = load_config(write(tmp_path, MINIMAL), environ={"SDBATCH_BROKER_URL": "rediss://:pw@host:6380/0"})

    assert celery_config(settings)["broker_use_ssl"]["ssl_cert_reqs"] == 2  # ssl.CERT_REQUIRED


# --- Redis Sentinel (sentinel:// URLs) ----------------------------------------------------------------------

SENTINELS = "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://10.0.0.2:26379;sentinel://10.0.0.3:26380"
SENTINEL_CONFIG = MINIMAL + "broker: {master_name: sdbatch-primary}\n"


def test_a_sentinel_url_names_every_sentinel_and_the_primary_once(tmp_path):
    settings = load_config(write(tmp_path, SENTINEL_CONFIG), environ={"SDBATCH_BROKER_URL": SENTINELS})

    assert parse_sentinel_url(settings.broker.url) == SentinelURL(
        (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380)), password="s3cret", db=2)
    assert settings.broker.master_name == "sdbatch-primary"


def test_celery_gets_the_sentinel_transport_with_the_password_and_db_on_every_sentinel(tmp_path):
    settings = load_config(write(tmp_path, SENTINEL_CONFIG), environ={"SDBATCH_BROKER_URL": SENTINELS})

    conf = celery_config(settings)

    assert conf["broker_transport"] == "worker.app:SentinelTransport"
    assert conf["broker_transport_options"]["master_name"] == "sdbatch-primary"
    # kombu moves on to the next sentinel after a connection error and reads the credentials from it
    assert conf["broker_url"] == ("sentinel://:s3cret@10.0.0.1:26379/2;sentinel://:s3cret@10.0.0.2:26379/2;"
                                  "sentinel://:s3cret@10.0.0.3:26380/2")


def test_a_sentinel_url_without_master_name_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"broker\.master_name: is missing, and SDBATCH_BROKER_URL is a "
                                          r"sentinel:// URL; accepted: the name the Sentinels monitor"):
        load_config(write(tmp_path, MINIMAL), environ={"SDBATCH_BROKER_URL": SENTINELS})


def test_master_name_with_a_plain_redis_url_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"broker\.master_name: is set, and broker\.url is a redis:// URL"):
        load_config(write(tmp_path, SENTINEL_CONFIG), environ={})


@pytest.mark.parametrize(("url", "problem"), [
    ("sentinel://10.0.0.1:26379;sentinel://:pw@10.0.0.2:26379", "sentinel 2 has a password, a db or options"),
    ("sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/3", "sentinel 2 has a password, a db or options"),
    ("sentinel://10.0.0.1:26379;sentinel://10.0.0.2", r"sentinel 2 is not sentinel://HOST:PORT"),
    ("sentinel://10.0.0.1:99999", r"sentinel 1 is not sentinel://HOST:PORT"),
    ("sentinel://10.0.0.1:26379/x", "has db 'x'"),
    ("sentinel://:pa;ss@10.0.0.1:26379", "has a password holding '#', '/', '\\?' or ';'"),
])
def test_a_malformed_sentinel_url_is_refused_with_what_is_wrong(tmp_path, url, problem):
    with pytest.raises(ConfigError, match=problem) as error:
        load_config(write(tmp_path, SENTINEL_CONFIG), environ={"SDBATCH_BROKER_URL": url})

    assert "pw" not in str(error.value) and "pa;ss" not in str(error.value)


def test_a_sentinel_password_in_the_config_file_is_refused(tmp_path):
    url = "sentinel://h:1;sentinel://:pw@h2:2"
    config = SENTINEL_CONFIG.replace("{master_name", f'{{url: "{url}", master_name')

    with pytest.raises(ConfigError, match="broker.url: holds a password") as error:
        load_config(write(tmp_path, config), environ={})

    assert "pw" not in str(error.value)


def test_redact_url_hides_the_password_of_every_sentinel():
    url = "sentinel://user:one@h1:26379/0;sentinel://:two@h2:26379;sentinel://h3:26379"

    assert redact_url(url) == "sentinel://user:***@h1:26379/0;sentinel://:***@h2:26379;sentinel://h3:26379"
