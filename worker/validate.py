"""The rules every job field obeys, checked at enqueue and again in the worker (a message can come from any
client). Each failure is an `InvalidField` naming the field, what is wrong and what would be accepted.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

# The names of sdcore.samplers.NAMES (docs/interfaces.md), spelled out so that enqueueing never imports torch;
# tests/test_jobs.py asserts the two lists are equal.
SAMPLERS = ("ddpm", "ddim", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")
MAX_STEPS = 999  # sdcore.samplers.MAX_STEPS: the schedule has 1000 timesteps
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes any unsigned 64-bit seed
MIN_SIDE, MAX_SIDE = 64, 2048  # sdcore.pipeline's MIN_SIZE, MAX_SIZE
GUIDANCE_RANGE = (0.0, 100.0)
ETA_RANGE = (0.0, 1.0)
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
JOB_ID_PATTERN = re.compile(r"[0-9]{7}-[0-9]{3}")  # "{line:07d}-{image:03d}", see worker.jobs

# The settings shared by every job of a micro-batch; a prompt-file line may override any of them.
GENERATION_FIELDS = ("sampler", "steps", "guidance_scale", "width", "height", "eta")


@dataclass(frozen=True)
class Limits:
    """What one job may ask for; configured under `limits:` (worker.config)."""

    max_pixels: int = 1024 * 1024
    max_steps: int = 500
    max_prompt_chars: int = 2000
    max_images_per_prompt: int = 16
    max_jobs_per_run: int = 1_000_000
    # Seconds one 512x512 image-step (CFG included) takes on the deployment's hardware: the per-micro-batch
    # time limits are derived from it (worker.tasks.time_limits).
    step_seconds: float = 0.05
    # Hard ceiling for one micro-batch, seconds. The broker's visibility timeout sits just above it, so it is
    # also how long a task lost with its worker waits before it is delivered again.
    batch_time_limit: int = 40
    # A worker process whose resident memory grows past this is replaced (model reloaded); 0 turns it off.
    max_memory_per_child_mb: int = 8192


class InvalidField(ValueError):
    def __init__(self, field: str, problem: str, accepted: str):
        self.field, self.problem, self.accepted = field, problem, accepted
        super().__init__(f"{field}: {problem}; accepted: {accepted}")

    def under(self, prefix: str) -> InvalidField:
        """The same error with its field placed under `prefix` (e.g. "sampling")."""
        return InvalidField(f"{prefix}.{self.field}", self.problem, self.accepted)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_int(field: str, value: object, low: int, high: int) -> int:
    accepted = f"an integer from {low} to {high}"
    # bool is an int subclass in Python, but `"steps": true` is a mistake, not 1 step.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField(field, f"{_shown(value)} is a {type(value).__name__}", accepted)
    if not low <= value <= high:
        raise InvalidField(field, f"{value} is out of range", accepted)
    return value


def check_float(field: str, value: object, low: float, high: float) -> float:
    accepted = f"a finite number from {low:g} to {high:g}"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidField(field, f"{_shown(value)} is a {type(value).__name__}", accepted)
    if not math.isfinite(value):
        raise InvalidField(field, f"{value} is not finite", accepted)
    if not low <= value <= high:
        raise InvalidField(field, f"{value:g} is out of range", accepted)
    return float(value)


def check_text(field: str, value: object, max_chars: int, allow_blank: bool) -> str:
    kind = "UTF-8 text" if allow_blank else "non-blank UTF-8 text"
    accepted = f"{kind} of at most {max_chars} characters, without NUL"
    if not isinstance(value, str):
        raise InvalidField(field, f"{_shown(value)} is a {type(value).__name__}", accepted)
    if not allow_blank and not value.strip():
        raise InvalidField(field, "is empty or only whitespace", accepted)
    if len(value) > max_chars:
        raise InvalidField(field, f"has {len(value)} characters", accepted)
    if "\x00" in value:
        raise InvalidField(field, f"contains a NUL character at position {value.index(chr(0))}", accepted)
    try:
        # Files are decoded with surrogateescape and JSON may spell "\udc80": both leave lone surrogates,
        # which are not text and which no tokenizer or PNG chunk can carry.
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidField(field, f"is not valid UTF-8 (bad data at character {error.start})",
                           accepted) from None
    return value


def check_sampler(value: object) -> str:
    if value not in SAMPLERS:
        raise InvalidField("sampler", f"{_shown(value)} is not a known sampler", ", ".join(SAMPLERS))
    return value


def check_seed(field: str, value: object) -> int:
    return check_int(field, value, 0, SEED_MAX)


def check_generation(values: dict, limits: Limits) -> dict:
    """The generation settings (GENERATION_FIELDS) checked and normalised; raises the first InvalidField."""
    missing = [name for name in GENERATION_FIELDS if name not in values]
    if missing:
        raise InvalidField(missing[0], "is missing", "all of " + ", ".join(GENERATION_FIELDS))
    checked = {
        "sampler": check_sampler(values["sampler"]),
        "steps": check_int("steps", values["steps"], 1, limits.max_steps),
        "guidance_scale": check_float("guidance_scale", values["guidance_scale"], *GUIDANCE_RANGE),
        "eta": check_float("eta", values["eta"], *ETA_RANGE),
    }
    for side in ("width", "height"):
        size = check_int(side, values[side], MIN_SIDE, 10**6)
        if size % 8:
            # the VAE downsamples by 8: other sizes have no latent of their own
            raise InvalidField(side, f"{size} is not a multiple of 8", f"a multiple of 8 from {MIN_SIDE}")
        checked[side] = size
    width, height = checked["width"], checked["height"]
    if width * height > limits.max_pixels:
        raise InvalidField("width", f"{width}x{height} is {width * height} pixels, over the budget",
                           f"width * height <= limits.max_pixels = {limits.max_pixels}")
    for side in ("width", "height"):
        if checked[side] > MAX_SIDE:
            raise InvalidField(side, f"{checked[side]} is out of range", f"{MIN_SIDE} to {MAX_SIDE}")
    return checked


def check_run_id(value: object) -> str:
    if not isinstance(value, str) or not RUN_ID_PATTERN.fullmatch(value):
        # run ids become storage keys: anything else could climb out of the prefix ("../../x")
        raise InvalidField("run_id", f"{_shown(value)} is not a valid run id",
                           "1 to 64 characters from A-Z a-z 0-9 _ -")
    return value


def check_job_id(value: object) -> str:
    if not isinstance(value, str) or not JOB_ID_PATTERN.fullmatch(value):
        raise InvalidField("job_id", f"{_shown(value)} is not a valid job id", "LLLLLLL-III (7 + 3 digits)")
    return value
