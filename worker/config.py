"""YAML config -> validated, frozen settings.

    model:    {checkpoint: PATH | tiny-random, name (default: the file's stem, the folder's name or
               tiny-random), precision: fp32|fp16|bf16 (|int8 with backend openvino), device: auto|cpu|cuda,
               winograd, vae: PATH (optional: a standalone VAE instead of the checkpoint's),
               backend: torch|openvino|auto}
    models:   {NAME: {queue: QUEUE, sha256: HEX (optional)}, ...} (optional): the fleet's other models, which
              a prompt line names in `model`; this config's own model is served on broker.queue
    sampling: {sampler, steps, guidance_scale, width, height, eta, micro_batch, seed}
              (sdcore.params.Generation's fields but img2img's strength, with its defaults and checks)
    broker:   {url: redis://[:PASSWORD@]HOST:PORT/DB | rediss://... |
               sentinel://[:PASSWORD@]HOST:PORT[/DB][;sentinel://HOST:PORT...], queue,
               master_name (the Sentinels' name of the primary; only and always with sentinel://)}
    storage:  {url: s3://BUCKET/PREFIX | file:///DIR | file://./DIR, endpoint_url}
    adapters: {dir: PATH, url: s3://BUCKET/PREFIX | file://DIR, cache: PATH} (optional; worker.adapters):
              LoRA files loras/NAME.safetensors|.pt|.ckpt and embeddings embeddings/NAME.pt|.safetensors|.bin
    limits:   {max_pixels, max_steps, max_prompt_chars, max_images_per_prompt, max_jobs_per_run,
               max_prompt_file_bytes, step_seconds, batch_time_limit, max_memory_per_child_mb}

Environment overrides: SDBATCH_BROKER_URL, SDBATCH_STORAGE_URL, SDBATCH_S3_ENDPOINT_URL. S3 credentials come
only from the standard AWS variables and profiles (boto3's own chain): a config file holds no secret, and a
broker password is redacted whenever a URL is printed (`redact_url`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import reprlib
import stat
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

from sdcore.errors import InvalidField
from sdcore.params import (
    LOAD_BACKENDS,
    MAX_SEED,
    MAX_STEPS,
    OPENVINO_PRECISIONS,
    PRECISIONS,
    Generation,
    check_float,
    check_int,
)
from worker.validate import GENERATION_FIELDS, MAX_MICRO_BATCH, Limits, check_generation

DEVICES = ("auto", "cpu", "cuda")
BROKER_SCHEMES = ("redis", "rediss", "sentinel")
QUEUE_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MASTER_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # broker.master_name (names a Sentinel primary)
SENTINEL_SEPARATOR = re.compile(r";(?=sentinel://)")  # between the sentinels of a sentinel:// URL
BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
KEY_SEGMENT_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
CONFIG_ENV = "SDBATCH_CONFIG"


MAX_CONFIG_BYTES = 1024 * 1024  # a config is a few hundred bytes; this bounds what a wrong path can cost
# Values a config may hold once its YAML aliases are expanded (a string counts its characters). A shipped
# config holds about 30; 419 bytes of nested aliases ("billion laughs") expand to 10**9, which any repr of
# them, in an error message say, would spend hours and all memory on.
MAX_CONFIG_VALUES = 100_000


class ConfigError(ValueError):
    """A config problem, with the file and the key path in its message."""


class FileRefused(ValueError):
    """A file that is not read: not a regular file, too large or unreadable."""

    def __init__(self, path: str, problem: str, accepted: str):
        super().__init__(f"{path}: {problem}; accepted: {accepted}")
        self.problem, self.accepted = problem, accepted


def read_regular_file(path: str, limit: int, accepted: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. Anything else (a FIFO that never ends, a device
    such as /dev/zero, a directory) is refused before it is read, by a check on the opened file, so that a
    file swapped in between cannot slip past."""
    try:
        # O_NONBLOCK: opening a FIFO without a writer would block before fstat could refuse it
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise FileRefused(path, error.strerror or str(error), accepted) from None
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise FileRefused(path, "not a regular file", accepted)
    with os.fdopen(descriptor, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as error:
            raise FileRefused(path, error.strerror or str(error), accepted) from None
    if len(data) > limit:
        raise FileRefused(path, f"larger than {limit} bytes", accepted)
    return data


def shown(value: object, limit: int = 60) -> str:
    """A short repr for error messages that stays short and quick whatever the value (a config's, a prompt
    file's, a task message's): nested aliases, an int of more digits than Python converts, a list nested past
    the recursion limit."""
    try:
        text = _SHORT_REPR.repr(value)
    except (ValueError, RecursionError):
        return f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 60, 60


@dataclass(frozen=True)
class ModelSettings:
    checkpoint: str
    name: str | None = None  # what jobs call it (`model` of a prompt line); _model sets the default
    precision: str = "fp32"
    device: str = "auto"
    winograd: bool = False  # CPU fp32 workers: U-Net convolutions as Winograd (sdcore Pipeline.use_winograd)
    vae: str | None = None  # a standalone VAE file or folder (sdcore.load(..., vae=))
    # "openvino": U-Net and VAE compiled for the CPU; "auto": openvino where installed (sdcore.load's backend)
    backend: str = "torch"


@dataclass(frozen=True)
class ModelRoute:
    """Where a model of the fleet is served: the queue its workers consume, and its weights' SHA-256 when
    known, which workers check before rendering (a message that reached the wrong workers fails clearly)."""

    queue: str
    sha256: str | None = None


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
    master_name: str | None = None  # with sentinel:// only: which primary of the Sentinels' to use

    def __repr__(self) -> str:  # settings get printed and logged: never with the broker's password
        return (f"BrokerSettings(url={redact_url(self.url)!r}, queue={self.queue!r}, "
                f"master_name={self.master_name!r})")


@dataclass(frozen=True)
class SentinelURL:
    """sentinel://[[USER]:PASSWORD@]HOST:PORT[/DB];sentinel://HOST:PORT...: the Sentinels to ask, and the
    credentials and db of the Redis primary they name (given once, on the first sentinel)."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = None
    db: int = 0


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
    # every model a job may name -> its route, this config's own model (on broker.queue) included
    models: dict[str, ModelRoute] = field(default_factory=dict)


SECTIONS = {"model": ModelSettings, "sampling": SamplingSettings, "broker": BrokerSettings,
            "storage": StorageSettings, "limits": Limits, "adapters": AdapterSettings, "models": ModelRoute}
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


def check_model_name(field: str, value: object) -> str:
    if not isinstance(value, str) or not MODEL_NAME_PATTERN.fullmatch(value):
        raise InvalidField(field, f"{shown(value)} is not a model name",
                           "1-64 characters of A-Z a-z 0-9 _ . -")
    return value


def load_config(path: str | os.PathLike, environ: dict | None = None) -> Settings:
    """Read, validate and return the settings of a YAML config file, env overrides applied."""
    path = os.fspath(path)
    environ = os.environ if environ is None else environ
    try:
        data = read_regular_file(path, MAX_CONFIG_BYTES, f"a YAML config file of at most {MAX_CONFIG_BYTES} "
                                 "bytes")
    except FileRefused as error:
        raise ConfigError(f"{path}: cannot read config ({error.problem}); "
                          f"accepted: {error.accepted}") from None
    try:
        document = yaml.load(data.decode("utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader: no tags run
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid YAML ({str(error)[:300]})") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML (nested too deeply); accepted: sections of keys and "
                          "values") from None
    except ValueError as error:  # an int of more digits than Python converts (sys.int_max_str_digits)
        raise ConfigError(f"{path}: not valid YAML ({str(error)[:120]})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}, "
                          f"got {type(document).__name__}")
    _check_document(path, document)
    try:
        return _settings(path, document, environ)
    except InvalidField as error:
        raise ConfigError(f"{path}: {error}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error: PyYAML keeps the
    last one silently, so `steps: 20` a few lines above `steps: 50` would be ignored without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # an unhashable key: SafeLoader's own construct_mapping reports it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {str(key)[:60]!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_document(path: str, document: dict) -> None:
    """Refuse what no setting can be and what would make an error message about it endless: more than
    MAX_CONFIG_VALUES values once aliases are expanded (strings count their length; the count stops as soon
    as it is over, so a bomb costs nothing), or an integer too long for any setting."""
    size, stack = 0, [("", document)]
    while stack:
        key, item = stack.pop()
        size += 1 + (len(item) if isinstance(item, str | bytes) else 0)
        if size > MAX_CONFIG_VALUES:
            raise ConfigError(f"{path}: holds more than {MAX_CONFIG_VALUES} values once its YAML aliases are "
                              "expanded; accepted: a config without nested aliases (*name) that multiply")
        if isinstance(item, int) and item.bit_length() > 64:
            raise ConfigError(f"{path}: {key or 'a value'}: an integer of {item.bit_length()} bits is out of "
                              "range; accepted: the ranges of each setting, all within 64 bits")
        if isinstance(item, dict):
            stack.extend((f"{key}.{name}".lstrip(".")[:100], value) for name, value in item.items())
            stack.extend((key, name) for name in item)
        elif isinstance(item, list | tuple | set):
            stack.extend((key, value) for value in item)


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
        raise InvalidField(str(unknown[0])[:60], "is not a known section", ", ".join(SECTIONS))
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
    models = _models(raw["models"], model, broker)
    return Settings(path=path, model=model, sampling=sampling, broker=broker, storage=storage, limits=limits,
                    adapters=adapters, models=models)


def _section(name: str, values: object) -> dict:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise InvalidField(name, f"is a {type(values).__name__}", "a mapping of keys to values")
    if name == "models":  # NAME: {queue, sha256}, checked by _models
        return values
    keys = [f.name for f in dataclasses.fields(SECTIONS[name])]
    if name == "sampling":  # flat in the file: its generation's fields sit next to micro_batch and seed
        keys = [*GENERATION_FIELDS, *(key for key in keys if key != "generation")]
    unknown = sorted(set(values) - set(keys), key=str)
    if unknown:
        raise InvalidField(f"{name}.{str(unknown[0])[:60]}", "is not a known key", ", ".join(keys))
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
        raise InvalidField("model.checkpoint", f"{shown(checkpoint)} is not a path",
                           "a checkpoint path or tiny-random")
    model = ModelSettings(**values)
    if model.name is None:
        path = Path(checkpoint)
        model = dataclasses.replace(model, name=path.stem if path.is_file() else path.name)
        if not MODEL_NAME_PATTERN.fullmatch(model.name):
            raise InvalidField("model.name", f"is missing, and the checkpoint's name {shown(model.name)} is "
                               "not one", "a name of 1-64 characters of A-Z a-z 0-9 _ . - (jobs name models)")
    else:
        check_model_name("model.name", model.name)
    if model.precision not in (OPENVINO_PRECISIONS if model.backend == "openvino" else PRECISIONS):
        accepted = (f"{', '.join(OPENVINO_PRECISIONS)} with backend openvino" if model.backend == "openvino"
                    else f"{', '.join(PRECISIONS)} ({', '.join(OPENVINO_PRECISIONS)} with backend openvino)")
        raise InvalidField("model.precision", f"{shown(model.precision)} is not a precision", accepted)
    if model.device not in DEVICES:
        raise InvalidField("model.device", f"{shown(model.device)} is not a device", ", ".join(DEVICES))
    if model.device == "cpu" and model.precision != "fp32" and model.backend != "openvino":
        # torch on a CPU has no fast half types: bf16 matmul is emulated (~500x slower), fp16 lacks kernels.
        # OpenVINO runs bf16 natively where the CPU has AVX512-BF16 or AMX (sdcore.load checks at start).
        raise InvalidField("model.precision", f"{model.precision} on device cpu is unsupported",
                           "fp32 on cpu (bf16 or int8 with backend openvino); fp16 or bf16 with device cuda "
                           "or auto")
    if model.precision == "int8" and model.device != "cpu":
        raise InvalidField("model.precision", f"int8 with device {model.device}",
                           "int8 with device cpu and backend openvino (the U-Net's weights compressed)")
    if not isinstance(model.winograd, bool):
        raise InvalidField("model.winograd", f"{shown(model.winograd)} is not a boolean", "true, false")
    if model.winograd and (model.device == "cuda" or model.precision != "fp32"):
        raise InvalidField("model.winograd", f"true with device {model.device}, precision {model.precision}",
                           "true only with precision fp32 and device cpu or auto (GPU workers ignore it)")
    if model.backend not in LOAD_BACKENDS:
        raise InvalidField("model.backend", f"{shown(model.backend)} is not a backend",
                           ", ".join(LOAD_BACKENDS))
    # Whether openvino is installed is the worker's to say (sdcore.load names the extra): clients that only
    # enqueue read the same config.
    if model.backend == "openvino" and (model.device == "cuda" or model.winograd):
        raise InvalidField("model.backend", f"openvino with device {model.device}, winograd {model.winograd}",
                           "openvino with device cpu or auto (GPU workers ignore it) and winograd false")
    if model.vae is not None and (not isinstance(model.vae, str) or not model.vae.strip()):
        raise InvalidField("model.vae", f"{shown(model.vae)} is not a path",
                           "the path of a VAE file (.safetensors / .ckpt / .pt) or diffusers VAE folder")
    return model


def _models(values: dict, model: ModelSettings, broker: BrokerSettings) -> dict[str, ModelRoute]:
    routes = {model.name: ModelRoute(broker.queue)}
    for name, route in values.items():
        where = f"models.{str(name)[:64]}"
        check_model_name(where, name)
        if not isinstance(route, dict) or "queue" not in route or set(route) - {"queue", "sha256"}:
            raise InvalidField(where, f"{shown(route)} is not a route", "{queue: QUEUE, sha256: HEX} (sha256 "
                               "optional)")
        queue, sha256 = route["queue"], route.get("sha256")
        if not isinstance(queue, str) or not QUEUE_PATTERN.fullmatch(queue):
            raise InvalidField(f"{where}.queue", f"{shown(queue)} is not a queue name",
                               "1-64 characters of A-Z a-z 0-9 _ . -")
        if sha256 is not None and (not isinstance(sha256, str) or not SHA256_PATTERN.fullmatch(sha256)):
            raise InvalidField(f"{where}.sha256", f"{shown(sha256)} is not a SHA-256",
                               "64 lowercase hex digits")
        if name == model.name and queue != broker.queue:
            raise InvalidField(f"{where}.queue", f"{queue} is not broker.queue ({broker.queue})",
                               "this config's own model on broker.queue, where its workers consume")
        routes[name] = ModelRoute(queue, sha256)
    return routes


def _adapters(values: dict) -> AdapterSettings:
    for key in ("dir", "cache"):
        value = values.get(key)
        if key in values and (not isinstance(value, str) or not value.strip()):
            holding = " holding loras/ and/or embeddings/" if key == "dir" else ""
            raise InvalidField(f"adapters.{key}", f"{shown(value)} is not a path", f"a folder path{holding}")
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
    accepted = ("redis://[:PASSWORD@]HOST:PORT/DB or rediss://... (TLS) or "
                "sentinel://[:PASSWORD@]HOST:PORT[/DB][;sentinel://HOST:PORT...] (Redis Sentinel)")
    if not isinstance(url, str) or _split(url) is None or _split(url).scheme not in BROKER_SCHEMES:
        shown_url = shown(redact_url(url) if isinstance(url, str) else url)
        raise InvalidField(source, f"{shown_url} is not a Redis URL", accepted)
    if source == "broker.url" and _password(url) is not None:
        # the message names where the password goes, never the URL: it would print the secret
        raise InvalidField("broker.url", "holds a password, and a config file holds no secret",
                           "the URL without its password here, and the whole URL with the password in the "
                           "environment: SDBATCH_BROKER_URL=redis://:PASSWORD@HOST:PORT/DB (from a secret)")
    sentinel = _split(url).scheme == "sentinel"
    # urlsplit and redis-py end the host part at the first of #/?; kombu splits a sentinel URL at each ;
    cut_at, named = ("#/?;", "'#', '/', '?' or ';'") if sentinel else ("#/?", "'#', '/' or '?'")
    password = _password(SENTINEL_SEPARATOR.split(url)[0] if sentinel else url)
    if any(c in (password or "") for c in cut_at):
        raise InvalidField(source, f"{shown(redact_url(url))} has a password holding {named}",
                           "the password percent-encoded: %23 for #, %2F for /, %3F for ?, %3B for ;")
    if sentinel:
        parse_sentinel_url(url, source)
    elif _bad_port(url):  # redis-py would refuse it only later, after a run record had been written
        raise InvalidField(source, f"{shown(redact_url(url))} has a bad port ({BAD_PORT})", accepted)
    if not isinstance(broker.queue, str) or not QUEUE_PATTERN.fullmatch(broker.queue):
        raise InvalidField("broker.queue", f"{shown(broker.queue)} is not a queue name",
                           "1 to 64 characters from A-Z a-z 0-9 _ . -")
    if sentinel and (not isinstance(broker.master_name, str)
                     or not MASTER_NAME_PATTERN.fullmatch(broker.master_name)):
        problem = "is missing" if broker.master_name is None else f"{shown(broker.master_name)} is not a name"
        raise InvalidField("broker.master_name", f"{problem}, and {source} is a sentinel:// URL",
                           "the name the Sentinels monitor the primary under (`sentinel monitor NAME ...`): "
                           "1-64 characters of A-Z a-z 0-9 _ . -")
    if not sentinel and broker.master_name is not None:
        raise InvalidField("broker.master_name", f"is set, and {source} is a {_split(url).scheme}:// URL",
                           "master_name only with a sentinel:// URL; leave it out for redis:// and rediss://")


def parse_sentinel_url(url: str, source: str = "broker.url") -> SentinelURL:
    """The parts of a sentinel:// broker URL (SentinelURL); InvalidField names what is wrong in it."""
    accepted = "sentinel://[:PASSWORD@]HOST:PORT[/DB][;sentinel://HOST:PORT...]"
    nodes, first = [], None
    for n, part in enumerate(SENTINEL_SEPARATOR.split(url)):
        parts = _split(part)
        where = f"{shown(redact_url(url))}: sentinel {n + 1}"
        if parts is None or parts.scheme != "sentinel" or not parts.hostname or _bad_port(part) \
                or not parts.port:
            raise InvalidField(source, f"{where} is not sentinel://HOST:PORT (a port in 1-65535)", accepted)
        if n > 0 and (_has_userinfo(part) or parts.path.strip("/") or parts.query):
            raise InvalidField(source, f"{where} has a password, a db or options of its own",
                               f"{accepted}: the password and db once, on the first sentinel")
        first = first or parts
        nodes.append((parts.hostname, parts.port))
    db = first.path.strip("/") or "0"
    if not db.isdigit():
        raise InvalidField(source, f"{shown(redact_url(url))} has db {shown(db)}", f"{accepted}: DB a number")
    password = unquote(first.password) if first.password is not None else None
    return SentinelURL(tuple(nodes), unquote(first.username) if first.username else None, password, int(db))


def _check_storage(storage: StorageSettings, environ) -> None:
    source = "SDBATCH_STORAGE_URL" if environ.get("SDBATCH_STORAGE_URL") else "storage.url"
    parse_storage_url(storage.url, source)
    endpoint = storage.endpoint_url
    if endpoint is None:
        return
    variable = "SDBATCH_S3_ENDPOINT_URL" if environ.get("SDBATCH_S3_ENDPOINT_URL") else "storage.endpoint_url"
    accepted = "http(s)://HOST[:PORT], or leave unset for AWS"
    if isinstance(endpoint, str) and _has_userinfo(endpoint):
        # boto3 never reads credentials from the endpoint; they would only be printed in its errors
        raise InvalidField(variable, "holds credentials (USER:SECRET@)",
                           f"{accepted}; the keys in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or an AWS "
                           "profile")
    if not isinstance(endpoint, str) or _split(endpoint) is None \
            or _split(endpoint).scheme not in ("http", "https") or not _split(endpoint).netloc:
        raise InvalidField(variable, f"{shown(endpoint)} is not an endpoint URL", accepted)
    if _bad_port(endpoint):
        raise InvalidField(variable, f"{shown(endpoint)} has a bad port ({BAD_PORT})", accepted)


def parse_storage_url(url: object, source: str = "storage.url") -> tuple[str, str, str]:
    """("s3", bucket, prefix) or ("file", directory, ""), for s3://BUCKET/PREFIX or file://DIR."""
    accepted = "s3://BUCKET/PREFIX or file:///ABSOLUTE/DIR or file://./RELATIVE/DIR"
    if not isinstance(url, str):
        raise InvalidField(source, f"{shown(url)} is a {type(url).__name__}", accepted)
    if url.startswith("file://"):
        directory = url[len("file://"):]
        if not directory:
            raise InvalidField(source, f"{shown(url)} names no directory", accepted)
        return "file", directory, ""
    if url.startswith("s3://"):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not BUCKET_PATTERN.fullmatch(bucket):
            raise InvalidField(source, f"{shown(bucket)} is not a bucket name",
                               "3-63 characters from a-z 0-9 . - (S3 bucket naming rules)")
        prefix = prefix.strip("/")
        for segment in prefix.split("/") if prefix else ():
            if segment in (".", "..") or not KEY_SEGMENT_PATTERN.fullmatch(segment):
                raise InvalidField(source, f"prefix segment {shown(segment)} is not allowed",
                                   "prefix segments of A-Z a-z 0-9 _ . - other than . and ..")
        return "s3", bucket, prefix
    raise InvalidField(source, f"{shown(url)} has an unsupported scheme", accepted)


def _split_userinfo(url: str) -> tuple[str, str, str] | None:
    """(scheme, userinfo, rest after the last '@') of SCHEME://USERINFO@REST, or None without a '@'. The
    last '@' and not urlsplit: a password holding '#', '/' or '?' (unquoted) ends urlsplit's netloc early,
    which then sees no password at all."""
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return None
    userinfo, _, after = rest.rpartition("@")
    return scheme, userinfo, after


# said in words of our own: urlsplit's message quotes the text it found, which can be part of a password
BAD_PORT = "not a number from 0 to 65535"


def _split(url: str):
    """urlsplit(url), or None for what it cannot split (an unclosed "[" of an IPv6 host, ...)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


def _bad_port(url: str) -> bool:
    try:
        urlsplit(url).port  # noqa: B018 - the property parses the port, and raises on a bad one
    except ValueError:
        return True
    return False


def _has_userinfo(url: str) -> bool:
    return _split_userinfo(url) is not None


def _password(url: str) -> str | None:
    parts = _split_userinfo(url)
    if parts is None:
        return None
    user, colon, password = parts[1].partition(":")
    # a '/', '?' or '#' in the user part means the '@' is past the authority: treat it all as secret
    return password if colon or any(c in user for c in "/?#") else None


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for anything that is printed or logged; in a sentinel://
    URL every sentinel's."""
    if isinstance(url, str) and url.startswith("sentinel://"):
        return ";".join(_redact_one(part) for part in SENTINEL_SEPARATOR.split(url))
    return _redact_one(url)


def _redact_one(url: str) -> str:
    parts = _split_userinfo(url) if isinstance(url, str) else None
    if parts is None or _password(url) is None:
        return url
    scheme, userinfo, after = parts
    user = userinfo.partition(":")[0]
    user = "" if any(c in user for c in "/?#") else user
    return f"{scheme}://{user}:***@{after}"
