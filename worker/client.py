"""Enqueueing runs, from scripts or from the CLI.

    from worker.client import enqueue
    run_id = enqueue(["a red fox", {"prompt": "a blue bird", "seed": 7}], "configs/sd15-fp16.yaml")

Order of writes: the run record ({run_id}/run.jsonl, every job and setting) goes to storage first, then the
counters to Redis, then the messages; so a run that was enqueued at all can be rebuilt from storage alone
(`resume`), and `status` never sees a message before its run's total. An enqueue returns once a replica
of the primary (if it has one) holds all of that, and resumes the run itself if a failover came in between
(docs/scaling.md, "Sentinel and failover").
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from urllib.parse import urlsplit

import redis
from kombu.exceptions import OperationalError

from sdcore.errors import InvalidField
from sdcore.params import MAX_SEED, Generation, check_int
from worker import progress
from worker.app import make_app
from worker.config import Settings, load_config, redact_url, shown
from worker.finish import finish_if_done
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
from worker.messages import PRIORITIES, TASK_NAME, time_limits, to_message
from worker.storage import open_storage
from worker.validate import check_run_id

log = logging.getLogger(__name__)

# what redis-py and kombu raise when Redis is down or refuses us (their messages carry no password)
BROKER_ERRORS = (redis.RedisError, OperationalError)


class RunError(ValueError):
    """A run that cannot be enqueued, retried or resumed as asked."""


class BrokerUnavailable(RuntimeError):
    """Redis did not answer (after the clients' own retries, ~40 s): nothing is lost, but the run waits."""


def _settings(config: str | os.PathLike | Settings) -> Settings:
    return config if isinstance(config, Settings) else load_config(config)


def prepare(prompts, settings: Settings, run_id: str | None = None, images_per_prompt: int = 1,
            seed: int | None = None, skip_invalid: bool = False, priority: str = "normal",
            notify: str | None = None) -> tuple[str, list[Job], list[str], dict]:
    """Parse and check the input; returns (run id, jobs, errors of skipped lines, run header)."""
    try:
        run_id = check_run_id(run_id) if run_id is not None else new_run_id()
        base_seed = check_int("--seed", seed, 0, MAX_SEED) if seed is not None else settings.sampling.seed
        if priority not in PRIORITIES:
            raise InvalidField("--priority", f"{shown(priority)} is not a priority", ", ".join(PRIORITIES))
        if notify is not None:
            check_hook_url(notify)
    except InvalidField as error:
        raise RunError(str(error)) from None
    defaults, limits = settings.sampling.generation, settings.limits
    check = adapter_check(settings)
    if isinstance(prompts, str | os.PathLike):
        entries, errors = read_prompt_file(prompts, defaults, limits, images_per_prompt, skip_invalid, check)
    else:
        if not isinstance(prompts, list | tuple):
            raise RunError(f"prompts: a {type(prompts).__name__}; accepted: a prompt file path, or a list of "
                           "prompt strings and/or dicts with the .jsonl fields")
        records = [(n, _record(p)) for n, p in enumerate(prompts, start=1)]
        entries, errors = check_records(records, "prompts", defaults, limits, images_per_prompt, skip_invalid,
                                        check)
    jobs = expand(entries, base_seed, settings.model.name)
    header = {"created": time.time(), "base_seed": base_seed, "jobs": len(jobs),
              "source": os.fspath(prompts) if isinstance(prompts, str | os.PathLike) else "python",
              "model": settings.model.checkpoint, "precision": settings.model.precision,
              "micro_batch": settings.sampling.micro_batch, "priority": priority,
              "enqueued_by": platform.node(), **({"notify": notify} if notify else {})}
    return run_id, jobs, errors, header


def _record(prompt: object) -> dict | str:
    """A list item as check_records takes it: a record, or the text of why it is none."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if isinstance(prompt, dict):
        return prompt
    return (f"{shown(prompt)} is a {type(prompt).__name__}; accepted: a prompt string, or a dict with the "
            ".jsonl fields")


def adapter_check(settings: Settings):
    """check_entry for the prompt readers: a line's `model` must be one of the fleet's (config models:), and
    every LoRA it names (its `loras` field, its <lora:> tags) and its `vae` must be in the adapter locations,
    which are listed once, on the first line that names one."""
    from worker.adapters import Adapters, loras_named

    adapters = None

    def check(entry) -> None:
        nonlocal adapters
        if entry.model is not None and entry.model not in settings.models:
            raise InvalidField("model", f"{entry.model!r} is not a model of this fleet",
                               f"{', '.join(settings.models)} (model.name and the config's models:)")
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
            skip_invalid: bool = False, priority: str = "normal", notify: str | None = None) -> str:
    """Validate every prompt, then store the run record and enqueue its micro-batches. Returns the run id.

    `prompts`: a prompt-file path (.txt / .jsonl / .csv) or a list of prompt strings and/or dicts with the
    .jsonl fields. `priority`: "high" | "normal" | "low" (messages.PRIORITIES): a worker takes a queued
    batch of a higher-priority run before any of a lower one. `notify`: an http(s) URL that gets one POST
    of the run's summary each time it finishes (worker.finish). Raises PromptFileError (every bad line) or
    RunError.
    """
    settings = _settings(config)
    run_id, jobs, _, header = prepare(prompts, settings, run_id, images_per_prompt, seed, skip_invalid,
                                      priority, notify)
    enqueue_prepared(settings, run_id, jobs, header)
    return run_id


def enqueue_prepared(settings: Settings, run_id: str, jobs: list[Job], header: dict) -> None:
    store = open_storage(settings.storage)
    record_key = f"{run_id}/run.jsonl"
    # one conditional write both checks and claims the run id: of concurrent enqueues of one id, one wins
    if not store.create(record_key, run_record(run_id, header, jobs), "application/x-ndjson"):
        raise RunError(f"run {run_id} already exists at {store.location(record_key)}; "
                       f"accepted: a new --run-id, or `sdbatch resume {run_id}` to finish it")
    try:
        counters = run_counters(settings, run_id)
        server = counters.server_id()
        counters.begin(len(jobs))
        send(settings, run_id, jobs, header["priority"])
        counters.mark_sent()
        if counters.replicate() != server:
            # a failover (or a restart) came between the first write and the replica's acknowledgement of
            # the last: the new primary may lack the counters or some messages (replication is
            # asynchronous). Resuming rebuilds both from the run record and storage; a message that was not
            # lost after all only makes its batch run twice (same bytes, counted once).
            log.warning("run %s: the broker failed over while it was enqueued; resuming it", run_id)
            resume(settings, run_id)
    except BROKER_ERRORS as error:
        raise BrokerUnavailable(
            f"broker {redact_url(settings.broker.url)} unavailable ({error}); run {run_id} is recorded at "
            f"{store.location(record_key)}: once the broker answers, `sdbatch resume {run_id} --config "
            f"{settings.path}` enqueues it") from None
    except ValueError as error:  # the broker settings (redis-py, kombu) refused: name the recorded run
        raise RunError(f"broker {redact_url(settings.broker.url)}: {error}; run {run_id} is recorded at "
                       f"{store.location(record_key)}: with the broker settings fixed, `sdbatch resume "
                       f"{run_id} --config {settings.path}` enqueues it") from None


def send(settings: Settings, run_id: str, jobs: list[Job], priority: str = "normal") -> int:
    """Publish the micro-batches of `jobs` over one producer connection; returns the number of messages."""
    batches = micro_batches(jobs, settings.sampling.micro_batch)
    sha256 = {name: route.sha256 for name, route in settings.models.items()}
    storage = open_storage(settings.storage).identity
    return publish(settings, priority, (to_message(run_id, batch, sha256.get(batch[0].model), storage)
                                        for batch in batches))


def publish(settings: Settings, priority: str, messages) -> int:
    """Publish task messages (worker.messages.to_message's) at the run's priority; returns how many."""
    app = make_app(settings)
    count = 0
    with app.producer_or_acquire() as producer:
        for message in messages:
            run_id, jobs = message["run_id"], message["jobs"]
            soft, hard = time_limits(Generation(**message["generation"]), len(jobs), settings.limits)
            # A short argsrepr (what Flower and the task-sent event show) instead of Celery's saferepr of the
            # whole message: that repr took ~20 % of an enqueue and made every message twice its size.
            summary = f"[run {run_id}: {len(jobs)} jobs, {jobs[0]['job_id']}..{jobs[-1]['job_id']}]"
            # each model's workers consume its queue (config models:); a message without one: broker.queue
            model = (message.get("model") or {}).get("name")
            queue = settings.models[model].queue if model in settings.models else settings.broker.queue
            app.send_task(TASK_NAME, args=[message], queue=queue, producer=producer,
                          priority=PRIORITIES[priority], soft_time_limit=soft, time_limit=hard,
                          argsrepr=summary, kwargsrepr="{}")
            count += 1
    return count


def load_run(settings: Settings, run_id: str) -> tuple[dict, list[Job]]:
    try:
        check_run_id(run_id)
    except InvalidField as error:
        raise RunError(str(error)) from None
    store = open_storage(settings.storage)
    key = f"{run_id}/run.jsonl"
    try:
        return read_run_record(store.get(key), store.location(key))
    except KeyError:
        raise RunError(f"run {run_id}: no run record at {store.location(f'{run_id}/run.jsonl')}; "
                       "accepted: the id `sdbatch enqueue` printed, with the same storage settings") from None


def retry(config, run_id: str) -> int:
    """Re-enqueue the run's failed jobs; returns how many."""
    settings = _settings(config)
    header, jobs = load_run(settings, run_id)
    counters = run_counters(settings, run_id)
    if counters.state() == "cancelled":
        raise RunError(f"run {run_id} is cancelled; accepted: `sdbatch resume {run_id}`, which makes it "
                       "active again and enqueues every job without an image")
    failed = counters.failures()
    again = [job for job in jobs if job.job_id in failed]
    counters.forget_failures([job.job_id for job in again])
    if again:
        send(settings, run_id, again, header.get("priority", "normal"))
    return len(again)


def resume(config, run_id: str) -> int:
    """Re-enqueue every job of the run whose image or metadata is missing from storage (works after a total
    loss of Redis: the counters are rebuilt from storage; a cancelled run becomes active again); returns how
    many. Like `enqueue`, it returns once a replica holds what it wrote, and does it again if a failover came
    in between."""
    settings = _settings(config)
    header, jobs = load_run(settings, run_id)
    store = open_storage(settings.storage)
    counters = run_counters(settings, run_id)
    while True:
        server = counters.server_id()
        images, metas = set(store.list(f"{run_id}/images")), set(store.list(f"{run_id}/meta"))
        missing = [job for job in jobs if f"{run_id}/images/{job.job_id}.png" not in images
                   or f"{run_id}/meta/{job.job_id}.json" not in metas]
        missing_ids = {job.job_id for job in missing}
        counters.begin(len(jobs), done=[job.job_id for job in jobs if job.job_id not in missing_ids],
                       pending=sorted(missing_ids))
        if missing:
            send(settings, run_id, missing, header.get("priority", "normal"))
        counters.mark_sent()
        if counters.replicate() == server:
            return len(missing)
        log.warning("run %s: the broker failed over while it was resumed; resuming it again", run_id)


def run_counters(settings: Settings, run_id: str) -> progress.RunProgress:
    """The run's counters in the broker's Redis (with Sentinel, on its primary of the moment)."""
    return progress.RunProgress(progress.connect(settings.broker.url, settings.broker.master_name), run_id)


def cancel(config, run_id: str) -> int:
    """Cancel a run: workers drop its queued batches without running them (their jobs end cancelled), the
    batches in flight finish, other runs are not touched. Returns the jobs of a paused run's held batches,
    cancelled here."""
    settings = _settings(config)
    counters = _counters(settings, run_id)
    held = [json.loads(message) for message in counters.cancel()]
    job_ids = [job["job_id"] for message in held for job in message["jobs"]]
    counters.cancelled(job_ids)
    finish_if_done(make_app(settings), settings, counters)  # these may have been the run's last jobs
    return len(job_ids)


def pause(config, run_id: str) -> None:
    """Pause a run: workers set its batches aside as they reach them (other runs' batches go on), until
    `unpause`; the batches in flight finish."""
    _counters(_settings(config), run_id).pause()


def unpause(config, run_id: str) -> int:
    """Make a paused run active again: its set-aside batches are enqueued again, at the run's priority.
    Returns how many batches."""
    settings = _settings(config)
    header, _ = load_run(settings, run_id)
    held = [json.loads(message) for message in _counters(settings, run_id).unpause()]
    return publish(settings, header.get("priority", "normal"), held)  # as the worker took them


def check_hook_url(url: object) -> str:
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2000:
        raise InvalidField("--notify", f"{shown(url)} is not an http(s) URL",
                           "http://HOST[:PORT]/PATH or https://..., the receiver of the run's finish")
    if parts.username or parts.password:
        raise InvalidField("--notify", "holds credentials, which the run record would keep in storage",
                           "a URL without user:password (the POST is signed with $SDBATCH_HOOK_SECRET)")
    return url


def _counters(settings: Settings, run_id: str) -> progress.RunProgress:
    try:
        check_run_id(run_id)
    except InvalidField as error:
        raise RunError(str(error)) from None
    counters = run_counters(settings, run_id)
    if not counters.exists():
        raise RunError(f"run {run_id} has no counters on {redact_url(settings.broker.url)}; accepted: a run "
                       f"id that `sdbatch enqueue` printed (after losing Redis: `sdbatch resume {run_id}`)")
    return counters


def gallery(config, run_id: str, warn=None) -> str:
    """Write the run's gallery page (`{run_id}/index.html`, worker.gallery) into its storage; returns where
    it is. Failed and cancelled jobs come from Redis; when Redis does not answer (after its ~40 s of
    retries) or holds no counters for the run, the page is written from storage alone (jobs without an
    image show "no image") and `warn(text)` (default warnings.warn) says why."""
    import warnings

    from worker.gallery import build_gallery

    settings = _settings(config)
    try:
        check_run_id(run_id)
    except InvalidField as error:
        raise RunError(str(error)) from None
    failures, cancelled, problem = None, frozenset(), None
    try:
        counters = run_counters(settings, run_id)
        if counters.exists():
            failures = counters.failures()
            cancelled = {member.decode() for member in counters.client.smembers(counters.cancelled_key)}
        else:
            problem = f"run {run_id} has no counters on {redact_url(settings.broker.url)}"
    except BROKER_ERRORS as error:
        problem = f"broker {redact_url(settings.broker.url)} unavailable ({error})"
    store = open_storage(settings.storage)
    key = build_gallery(store, run_id, failures, cancelled)
    if problem:  # said once the page is written: a run without a record is an error, not a warning
        (warn or warnings.warn)(f"{problem}: failure reasons unknown, the page shows what storage holds")
    return store.location(key)


__all__ = ["enqueue", "enqueue_prepared", "retry", "resume", "cancel", "pause", "unpause", "prepare", "send",
           "publish", "load_run", "gallery", "run_counters", "RunError", "BrokerUnavailable", "BROKER_ERRORS",
           "PromptFileError"]
