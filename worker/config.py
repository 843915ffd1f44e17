"""YAML config -> validated, frozen settings.

    model:    {checkpoint: PATH | tiny-random, precision: fp32|fp16|bf16, device: auto|cpu|cuda, winograd,
               vae: PATH (optional: a standalone VAE instead of the checkpoint's)}
    sampling: {sampler, steps, guidance_scale, width, height, eta, micro_batch, seed}
              (sdcore.params.Generation's fields but img2img's strength, with its defaults and checks)
    broker:   {url: redis://[:PASSWORD@]HOST:PORT/DB | rediss://..., queue}
    storage:  {url: s3://BUCKET/PREFIX | file:///DIR | file://./DIR, endpoint_url}
    adapters: {dir: PATH, url: s3://BUCKET/PREFIX | file://DIR, cache: PATH} (optional; worker.adapters):
              LoRA files loras/NAME.safetensors|.pt|.ckpt and embeddings embeddings/NAME.pt|.safetensors|.bin
    limits:   {max_pixels, max_steps, max_prompt_chars, max_images_per_prompt, max_jobs_per_run,
               step_seconds, batch_time_limit, max_memory_per_child_mb}

Environment overrides: SDBATCH_BROKER_URL, SDBATCH_STORAGE_URL, SDBATCH_S3_ENDPOINT_URL. S3 credentials come
only from the standard AWS variables and profiles (boto3's own chain): a config file holds no secret, and a
broker password is redacted whenever a URL is printed (`redact_url`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import yaml

from sdcore.errors import InvalidField
from sdcore.params import MAX_SEED, MAX_STEPS, PRECISIONS, Generation, check_float, check_int
from worker.validate import GENERATION_FIELDS, MAX_MICRO_BATCH, Limits, check_generation

DEVICES = ("auto", "cpu", "cuda")
BROKER_SCHEMES = ("redis", "rediss")
QUEUE_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
KEY_SEGMENT_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
CONFIG_ENV = "SDBATCH_CONFIG"


class ConfigError(ValueError):
    """A config problem, with the file and the key path in its message."""


@dataclass(frozen=True)
class ModelSettings:
    checkpoint: str
    precision: str = "fp32"
    device: str = "auto"
    winograd: bool = False  # CPU fp32 workers: U-Net convolutions as Winograd (sdcore Pipeline.use_winograd)
    vae: str | None = None  # a standalone VAE file or folder (sdcore.load(..., vae=))


@dataclass(frozen=True)
class SamplingSettings:
    """`sampling:` holds the Generation fields (worker.validate.GENERATION_FIELDS) side by side with these."""

    generation: Generation = field(default_factory=Generation)  # what a prompt-file line may override
    micro_batch: int = 4
    seed: int = 0  # the run's base seed when neither the prompt file nor --seed gives one


@dataclass(frozen=True)
class BrokerSettings:
    url: str = "redis://127.0.0.1:6379/0"
    queue: str = "sdbatch"


@dataclass(frozen=True)
class StorageSettings:
    url: str = "file://./outputs"
    endpoint_url: str | None = None


@dataclass(frozen=True)
class AdapterSettings:
    """Where LoRA and embedding files live: a local folder and/or a store whose files workers download into
    `cache` on first use (the local folder wins for a name both hold)."""

    dir: str | None = None
    url: str | None = None
    cache: str = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                              "sdbatch", "adapters")

    @property
    def configured(self) -> bool:
        return self.dir is not None or self.url is not None


@dataclass(frozen=True)
class Settings:
    path: str
    model: ModelSettings
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    limits: Limits = field(default_factory=Limits)
    adapters: AdapterSettings = field(default_factory=AdapterSettings)


SECTIONS = {"model": ModelSettings, "sampling": SamplingSettings, "broker": BrokerSettings,
            "storage": StorageSettings, "limits": Limits, "adapters": AdapterSettings}


def load_config(path: str | os.PathLike, environ: dict | None = None) -> Settings:
    """Read, validate and return the settings of a YAML config file, env overrides applied."""
    path = os.fspath(path)
    environ = os.environ if environ is None else environ
    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.safe_load(f)
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config ({error.strerror})") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}, "
                          f"got {type(document).__name__}")
    try:
        return _settings(path, document, environ)
    except InvalidField as error:
        raise ConfigError(f"{path}: {error}") from None


def from_env() -> Settings:
    """The settings of the file named by $SDBATCH_CONFIG: how `celery -A worker.app` finds its config."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise ConfigError(f"{CONFIG_ENV} is not set; accepted: the path of a config file such as "
                          "configs/demo.yaml (`sdbatch worker --config` sets it for its workers)")
    return load_config(path)


def _settings(path: str, document: dict, environ) -> Settings:
    unknown = sorted(set(document) - set(SECTIONS), key=str)
    if unknown:
        raise InvalidField(str(unknown[0]), "is not a known section", ", ".join(SECTIONS))
    if "model" not in document:
        raise InvalidField("model", "is missing", "a section with at least `checkpoint: PATH | tiny-random`")
    raw = {name: _section(name, document.get(name)) for name in SECTIONS}

    limits = _limits(raw["limits"])
    model = _model(raw["model"])
    sampling = _sampling(raw["sampling"], limits)
    broker = {**raw["broker"]}
    storage = {**raw["storage"]}
    if environ.get("SDBATCH_BROKER_URL"):
        broker["url"] = environ["SDBATCH_BROKER_URL"]
    if environ.get("SDBATCH_STORAGE_URL"):
        storage["url"] = environ["SDBATCH_STORAGE_URL"]
    if environ.get("SDBATCH_S3_ENDPOINT_URL"):
        storage["endpoint_url"] = environ["SDBATCH_S3_ENDPOINT_URL"]
    broker, storage = BrokerSettings(**broker), StorageSettings(**storage)
    _check_broker(broker, environ)
    _check_storage(storage, environ)
    adapters = _adapters(raw["adapters"])
    return Settings(path=path, model=model, sampling=sampling, broker=broker, storage=storage, limits=limits,
                    adapters=adapters)


def _section(name: str, values: object) -> dict:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InvalidField(name, f"is a {type(values).__name__}", "a mapping of keys to values")
    keys = [f.name for f in dataclasses.fields(SECTIONS[name])]
    if name == "sampling":  # flat in the file: its generation's fields sit next to micro_batch and seed
        keys = [*GENERATION_FIELDS, *(key for key in keys if key != "generation")]
    unknown = sorted(set(values) - set(keys), key=str)
    if unknown:
        raise InvalidField(f"{name}.{unknown[0]}", "is not a known key", ", ".join(keys))
    return values


def _limits(values: dict) -> Limits:
    defaults = Limits()
    checked = {}
    for name, value in values.items():
        default = getattr(defaults, name)
        if isinstance(default, float):
            checked[name] = check_float(f"limits.{name}", value, 1e-6, 1e6)
        else:
            low = 0 if name == "max_memory_per_child_mb" else 1
            checked[name] = check_int(f"limits.{name}", value, low, 10**12)
    if checked.get("max_steps", 0) > MAX_STEPS:
        raise InvalidField("limits.max_steps", f"{checked['max_steps']} is over {MAX_STEPS}",
                           f"1 to {MAX_STEPS} (sdcore's samplers run at most {MAX_STEPS} steps)")
    if checked.get("max_images_per_prompt", 0) > 999:
        raise InvalidField("limits.max_images_per_prompt", "is over 999", "1 to 999 (job ids keep 3 digits)")
    return Limits(**checked)


def _model(values: dict) -> ModelSettings:
    if "checkpoint" not in values:
        raise InvalidField("model.checkpoint", "is missing", "a checkpoint path or tiny-random")
    checkpoint = values["checkpoint"]
    if not isinstance(checkpoint, str) or not checkpoint.strip():
        raise InvalidField("model.checkpoint", f"{checkpoint!r} is not a path",
                           "a checkpoint path or tiny-random")
    model = ModelSettings(**values)
    if model.precision not in PRECISIONS:
        raise InvalidField("model.precision", f"{model.precision!r} is not a precision",
                           ", ".join(PRECISIONS))
    if model.device not in DEVICES:
        raise InvalidField("model.device", f"{model.device!r} is not a device", ", ".join(DEVICES))
    if model.device == "cpu" and model.precision != "fp32":
        # CPUs here have no fast half types: bf16 matmul is emulated (~500x slower), fp16 lacks kernels.
        raise InvalidField("model.precision", f"{model.precision} on device cpu is unsupported",
                           "fp32 on cpu; fp16 or bf16 with device cuda or auto")
    if not isinstance(model.winograd, bool):
        raise InvalidField("model.winograd", f"{model.winograd!r} is not a boolean", "true, false")
    if model.winograd and (model.device == "cuda" or model.precision != "fp32"):
        raise InvalidField("model.winograd", f"true with device {model.device}, precision {model.precision}",
                           "true only with precision fp32 and device cpu or auto (GPU workers ignore it)")
    if model.vae is not None and (not isinstance(model.vae, str) or not model.vae.strip()):
        raise InvalidField("model.vae", f"{model.vae!r} is not a path",
                           "the path of a VAE file (.safetensors / .ckpt / .pt) or diffusers VAE folder")
    return model


def _adapters(values: dict) -> AdapterSettings:
    for key in ("dir", "cache"):
        value = values.get(key)
        if key in values and (not isinstance(value, str) or not value.strip()):
            holding = " holding loras/ and/or embeddings/" if key == "dir" else ""
            raise InvalidField(f"adapters.{key}", f"{value!r} is not a path", f"a folder path{holding}")
    if values.get("url") is not None:
        parse_storage_url(values["url"], "adapters.url")
    elif "url" in values:
        raise InvalidField("adapters.url", "is null", "s3://BUCKET/PREFIX or file:///DIR, or leave it out")
    return AdapterSettings(**values)


def _sampling(values: dict, limits: Limits) -> SamplingSettings:
    defaults = SamplingSettings()
    try:
        generation = check_generation({k: v for k, v in values.items() if k in GENERATION_FIELDS}, limits)
    except InvalidField as error:
        raise error.under("sampling") from None
    micro_batch = check_int("sampling.micro_batch", values.get("micro_batch", defaults.micro_batch), 1,
                            MAX_MICRO_BATCH)
    seed = check_int("sampling.seed", values.get("seed", defaults.seed), 0, MAX_SEED)
    return SamplingSettings(generation, micro_batch=micro_batch, seed=seed)


def _check_broker(broker: BrokerSettings, environ) -> None:
    source = "SDBATCH_BROKER_URL" if environ.get("SDBATCH_BROKER_URL") else "broker.url"
    url = broker.url
    if not isinstance(url, str) or urlsplit(url).scheme not in BROKER_SCHEMES:
        raise InvalidField(source, f"{redact_url(url) if isinstance(url, str) else url!r} is not a Redis URL",
                           "redis://[:PASSWORD@]HOST:PORT/DB or rediss://... (TLS)")
    if not isinstance(broker.queue, str) or not QUEUE_PATTERN.fullmatch(broker.queue):
        raise InvalidField("broker.queue", f"{broker.queue!r} is not a queue name",
                           "1 to 64 characters from A-Z a-z 0-9 _ . -")


def _check_storage(storage: StorageSettings, environ) -> None:
    source = "SDBATCH_STORAGE_URL" if environ.get("SDBATCH_STORAGE_URL") else "storage.url"
    parse_storage_url(storage.url, source)
    endpoint = storage.endpoint_url
    if endpoint is None:
        return
    if not isinstance(endpoint, str) or urlsplit(endpoint).scheme not in ("http", "https") \
            or not urlsplit(endpoint).netloc:
        variable = "SDBATCH_S3_ENDPOINT_URL" if environ.get("SDBATCH_S3_ENDPOINT_URL") \
            else "storage.endpoint_url"
        raise InvalidField(variable, f"{endpoint!r} is not an endpoint URL",
                           "http(s)://HOST[:PORT], or leave unset for AWS")


def parse_storage_url(url: object, source: str = "storage.url") -> tuple[str, str, str]:
    """("s3", bucket, prefix) or ("file", directory, ""), for s3://BUCKET/PREFIX or file://DIR."""
    accepted = "s3://BUCKET/PREFIX or file:///ABSOLUTE/DIR or file://./RELATIVE/DIR"
    if not isinstance(url, str):
        raise InvalidField(source, f"{url!r} is a {type(url).__name__}", accepted)
    if url.startswith("file://"):
        directory = url[len("file://"):]
        if not directory:
            raise InvalidField(source, f"{url!r} names no directory", accepted)
        return "file", directory, ""
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not BUCKET_PATTERN.fullmatch(bucket):
            raise InvalidField(source, f"{bucket!r} is not a bucket name",
                               "3-63 characters from a-z 0-9 . - (S3 bucket naming rules)")
        prefix = prefix.strip("/")
        for segment in prefix.split("/") if prefix else ():
            if segment in (".", "..") or not KEY_SEGMENT_PATTERN.fullmatch(segment):
                raise InvalidField(source, f"prefix segment {segment!r} is not allowed",
                                   "prefix segments of A-Z a-z 0-9 _ . - other than . and ..")
        return "s3", bucket, prefix
    raise InvalidField(source, f"{url!r} has an unsupported scheme", accepted)


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for anything that is printed or logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
