"""Enqueueing runs, from scripts or from the CLI.

    from worker.client import enqueue
    run_id = enqueue(["a red fox", {"prompt": "a blue bird", "seed": 7}], "configs/sd15-fp16.yaml")

Order of writes: the run record ({run_id}/run.jsonl, every job and setting) goes to storage first, then the
counters to Redis, then the messages; so a run that was enqueued at all can be rebuilt from storage alone
(`resume`), and `status` never sees a message before its run's total.
"""

from __future__ import annotations

import os
import platform
import time

import redis
from kombu.exceptions import OperationalError

from sdcore.errors import InvalidField
from sdcore.params import MAX_SEED, check_int
from worker import progress
from worker.app import make_app
from worker.config import Settings, load_config, redact_url
from worker.jobs import (
    Job,
    PromptFileError,
    check_records,
    expand,
    micro_batches,
    new_run_id,
    read_prompt_file,
    read_run_record,
    run_record,
)
from worker.messages import TASK_NAME, time_limits, to_message
from worker.storage import open_storage
from worker.validate import check_run_id

# what redis-py and kombu raise when Redis is down or refuses us (their messages carry no password)
BROKER_ERRORS = (redis.RedisError, OperationalError)


class RunError(ValueError):
    """A run that cannot be enqueued, retried or resumed as asked."""


class BrokerUnavailable(RuntimeError):
    """Redis did not answer (after the clients' own retries, ~40 s): nothing is lost, but the run waits."""


def _settings(config: str | os.PathLike | Settings) -> Settings:
    return config if isinstance(config, Settings) else load_config(config)


def prepare(prompts, settings: Settings, run_id: str | None = None, images_per_prompt: int = 1,
            seed: int | None = None, skip_invalid: bool = False) -> tuple[str, list[Job], list[str], dict]:
    """Parse and check the input; returns (run id, jobs, errors of skipped lines, run header)."""
    try:
        run_id = check_run_id(run_id) if run_id is not None else new_run_id()
        base_seed = check_int("--seed", seed, 0, MAX_SEED) if seed is not None else settings.sampling.seed
    except InvalidField as error:
        raise RunError(str(error)) from None
    defaults, limits = settings.sampling.generation, settings.limits
    check = adapter_check(settings)
    if isinstance(prompts, str | os.PathLike):
        entries, errors = read_prompt_file(prompts, defaults, limits, images_per_prompt, skip_invalid, check)
    else:
        records = [(n, {"prompt": p} if isinstance(p, str) else p) for n, p in enumerate(prompts, start=1)]
        entries, errors = check_records(records, "prompts", defaults, limits, images_per_prompt, skip_invalid,
                                        check)
    jobs = expand(entries, base_seed)
    header = {"created": time.time(), "base_seed": base_seed, "jobs": len(jobs),
              "source": os.fspath(prompts) if isinstance(prompts, str | os.PathLike) else "python",
              "model": settings.model.checkpoint, "precision": settings.model.precision,
              "micro_batch": settings.sampling.micro_batch, "enqueued_by": platform.node()}
    return run_id, jobs, errors, header


def adapter_check(settings: Settings):
    """check_entry for the prompt readers: every LoRA a line names (its `loras` field, its <lora:> tags) and
    its `vae` must be in the adapter locations, which are listed once, on the first line that names one."""
    from worker.adapters import Adapters, loras_named

    adapters = None

    def check(entry) -> None:
        nonlocal adapters
        wanted = [("loras", "LoRA", name) for name in loras_named(entry.prompt, entry.generation.loras)]
        if entry.generation.vae is not None:
            wanted.append(("vaes", "VAE", entry.generation.vae))
        if not wanted:
            return
        if adapters is None:
            adapters = Adapters(settings.adapters, settings.storage.endpoint_url)
        for kind, what, name in wanted:
            known = adapters.available(kind) if settings.adapters.configured else {}
            if name not in known:
                field = "loras" if kind == "loras" else "vae"
                raise InvalidField(field, f"{what} {name!r} is not in {adapters.where(kind)}",
                                   ", ".join(known) or "none there")

    return check


def enqueue(prompts, config, run_id: str | None = None, images_per_prompt: int = 1, seed: int | None = None,
            skip_invalid: bool = False) -> str:
    """Validate every prompt, then store the run record and enqueue its micro-batches. Returns the run id.

    `prompts`: a prompt-file path (.txt / .jsonl / .csv) or a list of prompt strings and/or dicts with the
    .jsonl fields. Raises PromptFileError (every bad line) or RunError.
    """
    settings = _settings(config)
    run_id, jobs, _, header = prepare(prompts, settings, run_id, images_per_prompt, seed, skip_invalid)
    enqueue_prepared(settings, run_id, jobs, header)
    return run_id


def enqueue_prepared(settings: Settings, run_id: str, jobs: list[Job], header: dict) -> None:
    store = open_storage(settings.storage)
    record_key = f"{run_id}/run.jsonl"
    if store.exists(record_key):
        raise RunError(f"run {run_id} already exists at {store.location(record_key)}; "
                       f"accepted: a new --run-id, or `sdbatch resume {run_id}` to finish it")
    store.put(record_key, run_record(run_id, header, jobs), "application/x-ndjson")
    try:
        progress.RunProgress(progress.connect(settings.broker.url), run_id).begin(len(jobs))
        send(settings, run_id, jobs)
    except BROKER_ERRORS as error:
        raise BrokerUnavailable(
            f"broker {redact_url(settings.broker.url)} unavailable ({error}); run {run_id} is recorded at "
            f"{store.location(record_key)}: once the broker answers, `sdbatch resume {run_id} --config "
            f"{settings.path}` enqueues it") from None


def send(settings: Settings, run_id: str, jobs: list[Job]) -> int:
    """Publish the micro-batches of `jobs` over one producer connection; returns the number of messages."""
    batches = micro_batches(jobs, settings.sampling.micro_batch)
    app = make_app(settings)
    with app.producer_or_acquire() as producer:
        for batch in batches:
            soft, hard = time_limits(batch[0].request.generation, len(batch), settings.limits)
            # A short argsrepr (what Flower and the task-sent event show) instead of Celery's saferepr of the
            # whole message: that repr took ~20 % of an enqueue and made every message twice its size.
            summary = f"[run {run_id}: {len(batch)} jobs, {batch[0].job_id}..{batch[-1].job_id}]"
            app.send_task(TASK_NAME, args=[to_message(run_id, batch)], queue=settings.broker.queue,
                          soft_time_limit=soft, time_limit=hard, producer=producer,
                          argsrepr=summary, kwargsrepr="{}")
    return len(batches)


def load_run(settings: Settings, run_id: str) -> tuple[dict, list[Job]]:
    try:
        check_run_id(run_id)
    except InvalidField as error:
        raise RunError(str(error)) from None
    store = open_storage(settings.storage)
    try:
        return read_run_record(store.get(f"{run_id}/run.jsonl"))
    except KeyError:
        raise RunError(f"run {run_id}: no run record at {store.location(f'{run_id}/run.jsonl')}; "
                       "accepted: the id `sdbatch enqueue` printed, with the same storage settings") from None


def retry(config, run_id: str) -> int:
    """Re-enqueue the run's failed jobs; returns how many."""
    settings = _settings(config)
    _, jobs = load_run(settings, run_id)
    counters = progress.RunProgress(progress.connect(settings.broker.url), run_id)
    failed = counters.failures()
    again = [job for job in jobs if job.job_id in failed]
    counters.forget_failures([job.job_id for job in again])
    if again:
        send(settings, run_id, again)
    return len(again)


def resume(config, run_id: str) -> int:
    """Re-enqueue every job of the run whose image or metadata is missing from storage (works after a total
    loss of Redis: the counters are rebuilt from storage); returns how many."""
    settings = _settings(config)
    _, jobs = load_run(settings, run_id)
    store = open_storage(settings.storage)
    images, metas = set(store.list(f"{run_id}/images")), set(store.list(f"{run_id}/meta"))
    missing = [job for job in jobs if f"{run_id}/images/{job.job_id}.png" not in images
               or f"{run_id}/meta/{job.job_id}.json" not in metas]
    missing_ids = {job.job_id for job in missing}
    counters = progress.RunProgress(progress.connect(settings.broker.url), run_id)
    counters.begin(len(jobs), done=[job.job_id for job in jobs if job.job_id not in missing_ids],
                   pending=sorted(missing_ids))
    if missing:
        send(settings, run_id, missing)
    return len(missing)


__all__ = ["enqueue", "enqueue_prepared", "retry", "resume", "prepare", "send", "load_run", "RunError",
           "BrokerUnavailable", "BROKER_ERRORS", "PromptFileError"]
