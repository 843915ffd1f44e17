"""What a job may ask of this deployment, on top of what sdcore accepts (sdcore.params): checked at enqueue
and again in the worker (a message can come from any client). Each failure is an `InvalidField` naming the
field, what is wrong and what would be accepted.

sdcore.params defines the generation settings, their defaults, ranges and checks; this module adds only the
service's own rules: the deployment's `Limits`, non-blank prompts, and the run and job id patterns.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from sdcore.errors import InvalidField
from sdcore.params import GENERATION_FIELDS as SDCORE_GENERATION_FIELDS
from sdcore.params import Generation, check_int, check_text, shown

# The worker makes txt2img only: a job carries no init image, so img2img's `strength` is no job, config or
# message field. Every other Generation field is, under its own name.
GENERATION_FIELDS = tuple(name for name in SDCORE_GENERATION_FIELDS if name != "strength")
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
JOB_ID_PATTERN = re.compile(r"[0-9]{7}-[0-9]{3}")  # "{line:07d}-{image:03d}", see worker.jobs
MAX_MICRO_BATCH = 256  # jobs in one micro-batch, and so in one task message


@dataclass(frozen=True)
class Limits:
    """What one job may ask for; configured under `limits:` (worker.config)."""

    max_pixels: int = 1024 * 1024
    max_steps: int = 500
    max_prompt_chars: int = 2000
    max_images_per_prompt: int = 16
    max_jobs_per_run: int = 1_000_000
    # A prompt file is read whole into memory before it is checked: this bounds what one file may cost.
    max_prompt_file_bytes: int = 256 * 1024 * 1024
    # Seconds one 512x512 image-step (CFG included) takes on the deployment's hardware: the per-micro-batch
    # time limits are derived from it (worker.messages.time_limits).
    step_seconds: float = 0.05
    # Hard ceiling for one micro-batch, seconds. The broker's visibility timeout sits just above it, so it is
    # also how long a task lost with its worker waits before it is delivered again.
    batch_time_limit: int = 40
    # A worker process whose resident memory grows past this is replaced (model reloaded); 0 turns it off.
    max_memory_per_child_mb: int = 8192


def check_generation(values: dict, limits: Limits, defaults: Generation | None = None) -> Generation:
    """`defaults` (sdcore's when None) with `values` (of GENERATION_FIELDS) applied, checked by sdcore and
    against the limits; raises the first InvalidField."""
    base = defaults or Generation()
    # the deployment's range before sdcore's, so that a refusal names the steps this deployment accepts
    check_int("steps", values.get("steps", base.steps), 1, limits.max_steps)
    # a line that overrides nothing shares its config's Generation, checked when the config was loaded
    generation = dataclasses.replace(base, **values) if values else base
    width, height = generation.width, generation.height
    if width * height > limits.max_pixels:
        raise InvalidField("width", f"{width}x{height} is {width * height} pixels, over the budget",
                           f"width * height <= limits.max_pixels = {limits.max_pixels}")
    return generation


def check_prompts(prompt: object, negative_prompt: object, limits: Limits) -> None:
    """A job's prompt is non-blank text, and both prompts fit limits.max_prompt_chars."""
    check_text("prompt", prompt, limits.max_prompt_chars, allow_blank=False)
    check_text("negative_prompt", negative_prompt, limits.max_prompt_chars)


def check_run_id(value: object) -> str:
    if not isinstance(value, str) or not RUN_ID_PATTERN.fullmatch(value):
        # run ids become storage keys: anything else could climb out of the prefix ("../../x")
        raise InvalidField("run_id", f"{shown(value)} is not a valid run id",
                           "1 to 64 characters from A-Z a-z 0-9 _ -")
    return value


def check_job_id(value: object) -> str:
    if not isinstance(value, str) or not JOB_ID_PATTERN.fullmatch(value):
        raise InvalidField("job_id", f"{shown(value)} is not a valid job id", "LLLLLLL-III (7 + 3 digits)")
    return value
