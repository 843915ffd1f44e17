"""The generate task: one micro-batch message -> worker.batch.process -> PNGs + metadata in storage ->
progress counters. Only workers import this module; clients send the task by name (worker.messages).

What a worker process needs (its settings, resident pipeline, store and Redis client) lives on `BatchTask`,
each made once per process on first use: Celery instantiates a task class once per process, so its cached
properties are per-process resources (Celery docs, "Tasks: Instantiation"). A pool process makes its
pipeline as it starts (`worker_process_init`), after the fork, so the first batch does not pay the model
load and the GPU context and sockets are its own. The worker's main process never loads a model: it runs only
`on_failure` for a batch killed by its hard time limit, which needs the settings and the Redis client.

A store that is down makes the task retry later; a malformed message is rejected with a log line. Whatever
else ends a batch (its hard time limit, a bug, a store down for an hour) is recorded by
`BatchTask.on_failure` as the failure of its unfinished jobs, so no consumed job stays pending: `status`
finishes and `retry` takes them again.
"""

from __future__ import annotations

import logging
import socket
from functools import cached_property

from celery import Task, shared_task
from celery.exceptions import Reject, TimeLimitExceeded
from celery.signals import worker_process_init
from redis import Redis

from worker import config, progress
from worker.adapters import Adapters
from worker.batch import BatchRunner, load_pipeline, process
from worker.config import Settings
from worker.messages import TASK_NAME, MessageError, from_message
from worker.storage import StorageUnavailable, open_storage

log = logging.getLogger(__name__)
STORAGE_RETRY_DELAYS = (1, 2, 5, 10, 20)  # seconds; kept below the visibility timeout (see worker.app)
STORAGE_MAX_RETRIES = 180  # ~1 hour of outage before the jobs are recorded as failed


class BatchTask(Task):
    @cached_property
    def settings(self) -> Settings:
        """The config named by $SDBATCH_CONFIG, as for the worker's app (worker.app)."""
        return config.from_env()

    @cached_property
    def redis(self) -> Redis:
        """The client of the run counters."""
        return progress.connect(self.settings.broker.url)

    @cached_property
    def runner(self) -> BatchRunner:
        """The resident pipeline and the store; made in a pool process only."""
        adapters = Adapters(self.settings.adapters, self.settings.storage.endpoint_url) \
            if self.settings.adapters.configured else None
        pipe = load_pipeline(self.settings.model, adapters)
        return BatchRunner(pipe, open_storage(self.settings.storage), socket.gethostname(), adapters)

    def recorder(self, run_id: str) -> progress.RunProgress:
        return progress.RunProgress(self.redis, run_id)

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        """A batch that ended by an exception: its jobs not done are recorded as failed. Celery calls this in
        the pool process for an exception, and in the worker's main process for the hard time limit (which
        kills the pool process, so nothing of the batch could record itself)."""
        if isinstance(exc, TimeLimitExceeded):
            limit = f"{exc.args[0]:g} s" if exc.args and isinstance(exc.args[0], int | float) else "?"
            reason = (f"hard time limit ({limit}) exceeded; accepted: a batch that fits "
                      "limits.batch_time_limit (or a larger limits.step_seconds)")
        else:
            reason = f"{type(exc).__name__}: {exc}"
        try:
            run_id, jobs, _ = from_message(args[0] if args else None, self.settings.limits)
            recorder = self.recorder(run_id)
            for job in jobs:
                recorder.failed(job.job_id, reason)
        except Exception as error:  # a message that never was usable, or Redis gone: `resume` finds them
            log.error("task %s failed (%s) and its jobs could not be recorded as failed: %s", task_id, reason,
                      error)
            return
        log.error("run %s: %d jobs of task %s recorded as failed: %s", run_id, len(jobs), task_id, reason)


@shared_task(name=TASK_NAME, bind=True, base=BatchTask, max_retries=STORAGE_MAX_RETRIES)
def generate_batch(self: BatchTask, message):
    runner = self.runner
    runner.hostname = self.request.hostname or runner.hostname
    try:
        process(message, runner, self.settings.limits, self.recorder)
    except MessageError as error:
        log.error("rejected message %s: %s", self.request.id, error)
        raise Reject(str(error), requeue=False) from None
    except StorageUnavailable as error:
        if self.request.retries >= self.max_retries:
            raise  # on_failure records the batch's jobs as failed
        delay = STORAGE_RETRY_DELAYS[min(self.request.retries, len(STORAGE_RETRY_DELAYS) - 1)]
        log.warning("storage unavailable (%s); retrying the batch in %d s", error, delay)
        raise self.retry(countdown=delay) from None


@worker_process_init.connect
def _load_model_at_process_start(**_) -> None:
    runner = generate_batch.runner
    log.info("model %s loaded (%s)", runner.pipe.name, runner.pipe.precision)
