"""The task message: what the enqueue side (worker.client) and the worker (worker.tasks) agree on, so that
neither imports the other: the task's name, the JSON body of one micro-batch, and the time limits it is sent
with. Torch- and Celery-free.

    {"version": 1, "run_id": RUN_ID,
     "model": {"name": NAME, "sha256": HEX | null},  # which model renders it (absent: any, as before)
     "storage": IDENTITY,  # where the run lives (worker.storage's `identity`; absent: the worker's store)
     "generation": {each of worker.validate.GENERATION_FIELDS: value},  # what the micro-batch shares
     "jobs": [{"job_id", "index", "line", "image", "prompt", "negative_prompt", "seed"}, ...]}  # 1 to 256
"""

from __future__ import annotations

import math

from sdcore.errors import InvalidField
from sdcore.params import MAX_SEED, Generation, Request, check_int
from worker.config import SHA256_PATTERN, check_model_name, shown
from worker.jobs import Job
from worker.validate import (
    GENERATION_FIELDS,
    MAX_MICRO_BATCH,
    RUN_ID_PATTERN,
    Limits,
    check_generation,
    check_job_id,
    check_prompts,
    check_run_id,
)

TASK_NAME = "sdbatch.generate_batch"
FINISH_TASK_NAME = "sdbatch.finish_run"  # args: run id, finish number (worker.finish)
RECONCILE_TASK_NAME = "sdbatch.reconcile"  # no args (worker.reconcile)
MESSAGE_VERSION = 1
# A run's priority as kombu's Redis transport orders messages: one list per step of its priority_steps
# (0, 3, 6, 9), BRPOP'd in that order, so 0 is served first. A message without one counts as 0, hence the
# apps' task_default_priority is "normal" (worker.app), not 0.
PRIORITIES = {"high": 0, "normal": 3, "low": 6}


def queue_list(queue: str, priority: str = "normal") -> str:
    """The Redis list that holds a queue's waiting messages of one priority (worker.app sets sep ":")."""
    step = PRIORITIES[priority]
    return queue if step == 0 else f"{queue}:{step}"


def queue_lists(queue: str) -> list[str]:
    return [queue_list(queue, priority) for priority in PRIORITIES]


JOB_FIELDS = ("job_id", "index", "line", "image", "prompt", "negative_prompt", "seed")
ENVELOPE = ("version", "run_id", "generation", "jobs")
OPTIONAL_ENVELOPE = ("model", "storage")


class MessageError(ValueError):
    """A task message that cannot be processed at all (not a dict, unknown version, bad envelope). `run_id`
    and `job_ids` are what could still be read of it, so that the worker records those jobs as failed: a
    consumed job never stays pending."""

    def __init__(self, problem: str, run_id: str | None = None, job_ids: tuple[str, ...] = ()):
        super().__init__(problem)
        self.run_id, self.job_ids = run_id, job_ids


def to_message(run_id: str, batch: list[Job], model_sha256: str | None = None,
               storage: str | None = None) -> dict:
    """The JSON task message for one micro-batch (all jobs share the batch's model and generation
    settings); `model_sha256` is the model's weights' when the fleet's config knows it, `storage` the
    identity of the store the run lives in (decided at enqueue: workers write there or refuse)."""
    generation = batch[0].request.generation
    model = {"model": {"name": batch[0].model, "sha256": model_sha256}} if batch[0].model else {}
    where = {"storage": storage} if storage else {}
    return {"version": MESSAGE_VERSION, "run_id": run_id, **model, **where,
            "generation": {name: getattr(generation, name) for name in GENERATION_FIELDS},
            "jobs": [_job_to_message(job) for job in batch]}


def message_model(message: dict) -> tuple[str | None, str | None]:
    """(name, sha256) of the model a checked message (from_message) asks for; (None, None): any."""
    model = message.get("model") or {}
    return model.get("name"), model.get("sha256")


def _job_to_message(job: Job) -> dict:
    request = job.request
    return {"job_id": job.job_id, "index": job.index, "line": job.line, "image": job.image,
            "prompt": request.prompt, "negative_prompt": request.negative_prompt, "seed": request.seed}


def from_message(message: object, limits: Limits) -> tuple[str, list[Job], list[tuple[str, str]]]:
    """Check a task message from any client. Returns (run_id, valid jobs, [(job_id, reason)] of bad jobs
    whose id is readable); raises MessageError when the message as a whole is unusable."""
    if not isinstance(message, dict):
        raise MessageError(f"message is a {type(message).__name__}; accepted: a JSON object")
    run_id, job_ids = _readable_ids(message)
    if message.get("version") != MESSAGE_VERSION:
        raise MessageError(f"version {shown(message.get('version'))} is not supported; "
                           f"accepted: {MESSAGE_VERSION}", run_id, job_ids)
    keys = set(map(str, message))
    if not set(ENVELOPE) <= keys <= {*ENVELOPE, *OPTIONAL_ENVELOPE} or len(keys) != len(message):
        raise MessageError(f"message keys {shown(sorted(map(str, message)), 200)}; accepted: version, "
                           "run_id, generation, jobs, and model and storage (optional)", run_id, job_ids)
    try:
        run_id = check_run_id(message["run_id"])
        model = message.get("model")
        if "model" in message and (not isinstance(model, dict) or set(model) != {"name", "sha256"}):
            raise InvalidField("model", f"{shown(model)} is not a model's identity",
                               '{"name": NAME, "sha256": HEX or null}')
        if model is not None:
            check_model_name("model.name", model["name"])
            if model["sha256"] is not None and (not isinstance(model["sha256"], str)
                                                or not SHA256_PATTERN.fullmatch(model["sha256"])):
                raise InvalidField("model.sha256", f"{shown(model['sha256'])} is not a SHA-256",
                                   "64 lowercase hex digits, or null")
        storage = message.get("storage", "")
        if not isinstance(storage, str) or len(storage) > 2000:
            raise InvalidField("storage", f"{shown(message['storage'])} is not a store's identity",
                               "s3://BUCKET/PREFIX or file:///DIR")
        generation = message["generation"]
        if not isinstance(generation, dict) or set(generation) != set(GENERATION_FIELDS):
            raise InvalidField("generation", "does not hold exactly the generation settings",
                               ", ".join(GENERATION_FIELDS))
        generation = check_generation(generation, limits)
        if not isinstance(message["jobs"], list) or not 1 <= len(message["jobs"]) <= MAX_MICRO_BATCH:
            raise InvalidField("jobs", f"not a list of 1 to {MAX_MICRO_BATCH} jobs",
                               "the jobs of one micro-batch")
    except InvalidField as error:
        raise MessageError(str(error), run_id, job_ids) from None
    jobs, rejected = [], []
    for raw in message["jobs"]:
        try:
            jobs.append(_job_from_message(raw, generation, limits, model["name"] if model else None))
        except InvalidField as error:
            readable = isinstance(raw, dict) and isinstance(raw.get("job_id"), str)
            if readable and _is_job_id(raw["job_id"]):
                rejected.append((raw["job_id"], f"invalid job: {error}"))
            else:
                rejected.append(("", f"invalid job without a usable job_id: {error}"))
    return run_id, jobs, rejected


def _readable_ids(message: dict) -> tuple[str | None, tuple[str, ...]]:
    """The run id and the job ids of a message, as far as they are valid: whom to record a refusal for."""
    run_id = message.get("run_id")
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        return None, ()
    jobs = message.get("jobs")
    raw_ids = [job.get("job_id") for job in jobs if isinstance(job, dict)] if isinstance(jobs, list) else []
    return run_id, tuple(dict.fromkeys(job_id for job_id in raw_ids
                                       if isinstance(job_id, str) and _is_job_id(job_id)))


def _is_job_id(value: str) -> bool:
    try:
        check_job_id(value)
        return True
    except InvalidField:
        return False


def _job_from_message(raw: object, generation: Generation, limits: Limits, model: str | None) -> Job:
    if not isinstance(raw, dict) or sorted(raw) != sorted(JOB_FIELDS):
        raise InvalidField("job", "does not hold exactly the job fields", ", ".join(JOB_FIELDS))
    job_id = check_job_id(raw["job_id"])
    index = check_int("index", raw["index"], 0, 10**12)
    line = check_int("line", raw["line"], 1, 10**12)
    image = check_int("image", raw["image"], 0, 998)
    check_prompts(raw["prompt"], raw["negative_prompt"], limits)
    seed = check_int("seed", raw["seed"], 0, MAX_SEED)
    return Job(job_id, index, line, image, Request(raw["prompt"], seed, raw["negative_prompt"], generation),
               model)


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


def capped_time_limits(requested: object, ceiling: float) -> tuple[float, float]:
    """(hard, soft) seconds for a batch whose message asked for `requested` = [hard, soft] (Celery's
    `timelimit` header, which any client can set): a hard limit that is no positive number or is above
    `ceiling` (limits.batch_time_limit) becomes the ceiling, a soft one that is no positive number or is
    past the hard one becomes soft_limit(hard)."""
    hard, soft = requested if isinstance(requested, list | tuple) and len(requested) == 2 else (None, None)
    hard = hard if _positive(hard) and hard <= ceiling else ceiling
    soft = soft if _positive(soft) and soft <= hard else min(soft_limit(math.ceil(hard)), hard)
    return hard, soft


def _positive(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)
