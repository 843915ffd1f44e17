"""The task message: what the enqueue side (worker.client) and the worker (worker.tasks) agree on, so that
neither imports the other: the task's name, the JSON body of one micro-batch, and the time limits it is sent
with. Torch- and Celery-free.

    {"version": 1, "run_id": RUN_ID,
     "generation": {each of worker.validate.GENERATION_FIELDS: value},  # what the micro-batch shares
     "jobs": [{"job_id", "index", "line", "image", "prompt", "negative_prompt", "seed"}, ...]}  # 1 to 256
"""

from __future__ import annotations

from sdcore.errors import InvalidField
from sdcore.params import MAX_SEED, Generation, Request, check_int
from worker.jobs import Job
from worker.validate import (
    GENERATION_FIELDS,
    MAX_MICRO_BATCH,
    Limits,
    check_generation,
    check_job_id,
    check_prompts,
    check_run_id,
)

TASK_NAME = "sdbatch.generate_batch"
MESSAGE_VERSION = 1
JOB_FIELDS = ("job_id", "index", "line", "image", "prompt", "negative_prompt", "seed")


class MessageError(ValueError):
    """A task message that cannot be processed at all (not a dict, unknown version, bad envelope)."""


def to_message(run_id: str, batch: list[Job]) -> dict:
    """The JSON task message for one micro-batch (all jobs share the batch's generation settings)."""
    generation = batch[0].request.generation
    return {"version": MESSAGE_VERSION, "run_id": run_id,
            "generation": {name: getattr(generation, name) for name in GENERATION_FIELDS},
            "jobs": [_job_to_message(job) for job in batch]}


def _job_to_message(job: Job) -> dict:
    request = job.request
    return {"job_id": job.job_id, "index": job.index, "line": job.line, "image": job.image,
            "prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed}


def from_message(message: object, limits: Limits) -> tuple[str, list[Job], list[tuple[str, str]]]:
    """Check a task message from any client. Returns (run_id, valid jobs, [(job_id, reason)] of bad jobs
    whose id is readable); raises MessageError when the message as a whole is unusable."""
    if not isinstance(message, dict):
        raise MessageError(f"message is a {type(message).__name__}; accepted: a JSON object")
    if message.get("version") != MESSAGE_VERSION:
        raise MessageError(f"version {message.get('version')!r} is not supported; "
                           f"accepted: {MESSAGE_VERSION}")
    if sorted(message) != sorted(("version", "run_id", "generation", "jobs")):
        raise MessageError(f"message keys {sorted(message)}; accepted: version, run_id, generation, jobs")
    try:
        run_id = check_run_id(message["run_id"])
        generation = message["generation"]
        if not isinstance(generation, dict) or set(generation) != set(GENERATION_FIELDS):
            raise InvalidField("generation", "does not hold exactly the generation settings",
                               ", ".join(GENERATION_FIELDS))
        generation = check_generation(generation, limits)
    except InvalidField as error:
        raise MessageError(str(error)) from None
    if not isinstance(message["jobs"], list) or not 1 <= len(message["jobs"]) <= MAX_MICRO_BATCH:
        raise MessageError(f"jobs: not a list of 1 to {MAX_MICRO_BATCH} jobs; accepted: the jobs of one "
                           "micro-batch")
    jobs, rejected = [], []
    for raw in message["jobs"]:
        try:
            jobs.append(_job_from_message(raw, generation, limits))
        except InvalidField as error:
            readable = isinstance(raw, dict) and isinstance(raw.get("job_id"), str)
            if readable and _is_job_id(raw["job_id"]):
                rejected.append((raw["job_id"], f"invalid job: {error}"))
            else:
                rejected.append(("", f"invalid job without a usable job_id: {error}"))
    return run_id, jobs, rejected


def _is_job_id(value: str) -> bool:
    try:
        check_job_id(value)
        return True
    except InvalidField:
        return False


def _job_from_message(raw: object, generation: Generation, limits: Limits) -> Job:
    if not isinstance(raw, dict) or sorted(raw) != sorted(JOB_FIELDS):
        raise InvalidField("job", "does not hold exactly the job fields", ", ".join(JOB_FIELDS))
    job_id = check_job_id(raw["job_id"])
    index = check_int("index", raw["index"], 0, 10**12)
    line = check_int("line", raw["line"], 1, 10**12)
    image = check_int("image", raw["image"], 0, 998)
    check_prompts(raw["prompt"], raw["negative_prompt"], limits)
    seed = check_int("seed", raw["seed"], 0, MAX_SEED)
    return Job(job_id, index, line, image, Request(raw["prompt"], seed, raw["negative_prompt"], generation))


# --- time limits --------------------------------------------------------------------------------------------

def time_limits(generation: Generation, jobs: int, limits: Limits) -> tuple[int, int]:
    """(soft, hard) seconds for one micro-batch: 4x the expected time plus model warm-up, capped by
    limits.batch_time_limit (which the broker's visibility timeout exceeds)."""
    area = generation.width * generation.height / (512 * 512)
    expected = limits.step_seconds * generation.steps_run * jobs * area
    hard = max(min(limits.batch_time_limit, int(20 + 4 * expected)), 2)
    return soft_limit(hard), hard


def soft_limit(hard: int) -> int:
    """The soft limit that leaves the batch a tenth of its hard limit to record its jobs as failed."""
    return max(hard - max(hard // 10, 1), 1)
