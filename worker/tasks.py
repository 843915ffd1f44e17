"""The generate task: one micro-batch message -> worker.batch.process -> PNGs + metadata in storage ->
progress counters. Only workers import this module; clients send the task by name (worker.messages).

What a worker process needs (its settings, resident pipeline, store and Redis client) lives on `BatchTask`,
each made once per process on first use: Celery instantiates a task class once per process, so its cached
properties are per-process resources (Celery docs, "Tasks: Instantiation"). A pool process makes its
pipeline as it starts (`worker_process_init`), after the fork, so the first batch does not pay the model
load and the GPU context and sockets are its own. The worker's main process never loads a model: it runs only
`on_failure` for a batch killed by its hard time limit, which needs the settings and the Redis client.

Each time a worker's consumer (re)connects to the broker, `ReconcileOnConnect` asks whether the fleet's Redis
changed (a failover, a restart) and, once per change, sends the reconcile task (worker.reconcile), which
enqueues again the jobs such a change lost.

A store or a Redis that is down makes the task retry later; a malformed message is rejected with a log
line. Whatever else ends a batch (its hard time limit, a bug, a store down for an hour) is recorded by
`BatchTask.on_failure` as the failure of its unfinished jobs (a job whose image is stored is done), so no
consumed job stays pending: `status` finishes and `retry` takes them again.
"""

from __future__ import annotations

import logging
import socket
import time
from functools import cached_property

from celery import Task, bootsteps, shared_task
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import worker_init, worker_process_init
from celery.worker.request import Request
from redis import Redis, RedisError

from worker import config, metrics, progress, reconcile
from worker.adapters import Adapters
from worker.batch import BatchRunner, load_pipeline, process
from worker.config import Settings
from worker.finish import conclude, finish_if_done, notify
from worker.messages import (
    FINISH_TASK_NAME,
    PRIORITIES,
    RECONCILE_TASK_NAME,
    TASK_NAME,
    MessageError,
    capped_time_limits,
    from_message,
)
from worker.storage import StorageError, StorageUnavailable, open_storage

log = logging.getLogger(__name__)
STORAGE_RETRY_DELAYS = (1, 2, 5, 10, 20)  # seconds; kept below the visibility timeout (see worker.app)
STORAGE_MAX_RETRIES = 180  # ~1 hour of outage before the jobs are recorded as failed
HOOK_RETRY_DELAYS = (1, 2, 5, 10, 20, 30)  # seconds; below the visibility timeout, as the storage's
HOOK_MAX_RETRIES = 120  # ~1 hour of a receiver down before the hook is given up (logged)
RECONCILE_DELAY_S = 5  # the other workers reconnect meanwhile, and return what they took as the broker went
RECONCILE_RETRY_S, RECONCILE_MAX_RETRIES = 10, 60  # a store or Redis down: again for ~10 minutes


class BatchRequest(Request):
    """Celery's request, except that a message's own time limits cannot pass the deployment's
    (messages.capped_time_limits): a hard limit above limits.batch_time_limit (1e9 s) would outlive the
    visibility timeout, so the batch would be delivered twice, and one that is no positive number (-5) kills
    the pool process at once, which then reloads the model."""

    @property
    def time_limits(self) -> tuple[float | None, float | None]:
        return self.__dict__.get("_capped_time_limits", (None, None))

    @time_limits.setter
    def time_limits(self, requested) -> None:
        # task_time_limit is limits.batch_time_limit (worker.app.celery_config)
        self.__dict__["_capped_time_limits"] = capped_time_limits(requested, self._app.conf.task_time_limit)


class JobsFailed(Exception):
    """A batch that ran to its end with failed jobs, each recorded with its reason in the run's counters:
    raised after that and after the images of the others are stored, so that the task's state (in Flower)
    is FAILURE, not SUCCESS. Its message is acknowledged all the same (task_acks_late acks a task that
    raised unless task_acks_on_failure_or_timeout is False, and worker.app leaves it True), so it is not
    delivered again; `on_failure` leaves its jobs as recorded."""


class BatchTask(Task):
    Request = f"{__name__}:BatchRequest"

    @cached_property
    def settings(self) -> Settings:
        """The config named by $SDBATCH_CONFIG, as for the worker's app (worker.app)."""
        return config.from_env()

    @cached_property
    def redis(self) -> Redis:
        """The client of the run counters."""
        return progress.connect(self.settings.broker.url, self.settings.broker.master_name)

    @cached_property
    def store(self):
        return open_storage(self.settings.storage)

    @cached_property
    def runner(self) -> BatchRunner:
        """The resident pipeline and the store; made in a pool process only."""
        adapters = Adapters(self.settings.adapters, self.settings.storage.endpoint_url) \
            if self.settings.adapters.configured else None
        pipe = load_pipeline(self.settings.model, adapters)
        return BatchRunner(pipe, self.store, socket.gethostname(), adapters, self.settings.model.name)

    @cached_property
    def model(self) -> str:
        """The model's name (model.name: what jobs call it), the `model` label of the metrics."""
        return self.settings.model.name

    def recorder(self, run_id: str) -> progress.RunProgress:
        return metrics.CountedProgress(self.redis, run_id, self.model)

    def record_refusal(self, error: MessageError) -> None:
        """The jobs of a refused message that can be named fail with its reason: they were consumed, so
        nothing else would ever end them (status would wait forever, retry could not take them)."""
        if error.run_id is None:
            return
        recorder = self.recorder(error.run_id)
        for job_id in error.job_ids:
            recorder.failed(job_id, f"message refused by the worker: {error}")
        finish_if_done(self.app, self.settings, recorder)

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        """A batch that ended by an exception: its jobs not done are recorded as failed, except those whose
        image and metadata are stored (the batch ended as it recorded them: waiting on a broker that failed
        over, say), which are done. Celery calls this in the pool process for an exception, and in the
        worker's main process for the hard time limit (which kills the pool process, so nothing of the batch
        could record itself)."""
        if isinstance(exc, JobsFailed):
            return  # every job is recorded already, a failed one with its own reason
        if isinstance(exc, TimeLimitExceeded):
            limit = f"{exc.args[0]:g} s" if exc.args and isinstance(exc.args[0], int | float) else "?"
            reason = (f"hard time limit ({limit}) exceeded; accepted: a batch that fits "
                      "limits.batch_time_limit (or a larger limits.step_seconds)")
        else:
            reason = f"{type(exc).__name__}: {exc}"
        try:
            try:
                run_id, jobs, _ = from_message(args[0] if args else None, self.settings.limits)
            except MessageError as refused:  # e.g. a task called with other arguments than one message
                self.record_refusal(refused)
                raise
            recorder = self.recorder(run_id)
            for job in jobs:
                try:
                    sha256 = reconcile.stored_image(self.store, run_id, job.job_id)
                except StorageError:  # cannot tell: failed, and `sdbatch retry` makes the same bytes again
                    sha256 = None
                if sha256 is None:
                    recorder.failed(job.job_id, reason)
                else:
                    recorder.done(job.job_id, sha256)
            finish_if_done(self.app, self.settings, recorder)
        except Exception as error:  # a message that never was usable, or Redis gone: `resume` finds them
            log.error("task %s failed (%s) and its jobs could not be recorded as failed: %s", task_id, reason,
                      error)
            return
        log.error("run %s: %d jobs of task %s recorded as failed: %s", run_id, len(jobs), task_id, reason)


# throws: JobsFailed is logged as an expected outcome, without a traceback (each failed job is logged already)
@shared_task(name=TASK_NAME, bind=True, base=BatchTask, max_retries=STORAGE_MAX_RETRIES, throws=(JobsFailed,))
def generate_batch(self: BatchTask, message):
    runner = self.runner
    runner.hostname = self.request.hostname or runner.hostname
    recorders: list[metrics.CountedProgress] = []

    def recorder_for(run_id: str) -> metrics.CountedProgress:
        recorders.append(self.recorder(run_id))
        return recorders[-1]

    try:
        run_id = process(message, runner, self.settings.limits, recorder_for)
        finish_if_done(self.app, self.settings, self.recorder(run_id))
    except MessageError as error:
        self.record_refusal(error)
        log.error("rejected message %s: %s", self.request.id, error)
        raise Reject(str(error), requeue=False) from None
    except (StorageUnavailable, RedisError, SoftTimeLimitExceeded) as error:
        # The model's own time limit is recorded where it runs (worker.batch); one that escapes came while
        # the batch waited on the store or on Redis (a failover: redis-py retries for ~40 s), as do
        # RedisErrors after those retries. Neither is the batch's fault: it runs again later.
        if self.request.retries >= self.max_retries:
            raise  # on_failure records the batch's jobs as failed
        delay = STORAGE_RETRY_DELAYS[min(self.request.retries, len(STORAGE_RETRY_DELAYS) - 1)]
        what = "storage" if isinstance(error, StorageUnavailable) else "broker"
        log.warning("%s unavailable (%s: %s); retrying the batch in %d s", what, type(error).__name__, error,
                    delay)
        raise self.retry(countdown=delay) from None
    failures = {job: reason for recorder in recorders for job, reason in recorder.recorded_failures.items()}
    if failures:
        job_id, reason = next(iter(failures.items()))
        raise JobsFailed(f"run {run_id}: {len(failures)} of {len(message['jobs'])} jobs failed "
                         f"(`sdbatch failed {run_id}` lists them), {job_id}: {reason[:300]}")


class FinishTask(BatchTask):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        # no jobs to record: the run's counters are final already; only its announcement is missing
        log.error("finish task %s of %s failed: %s: %s", task_id, args, type(exc).__name__, exc)


@shared_task(name=FINISH_TASK_NAME, bind=True, base=FinishTask, max_retries=HOOK_MAX_RETRIES)
def finish_run(self: FinishTask, run_id: str, finish: int):
    """A run's finish (worker.finish): manifest, stream event, then the hook; a store that is down or a
    receiver that fails is tried again (below the visibility timeout, for about an hour)."""
    counters = self.recorder(run_id)
    try:
        report, url = conclude(self.runner.store, counters, self.redis, run_id, finish)
        if url is None or counters.finish_step_done(finish, "hook"):
            return
        notify(url, report)
    except (StorageUnavailable, OSError) as error:
        if self.request.retries >= self.max_retries:
            log.error("run %s: finish %d given up after %d attempts: %s", run_id, finish,
                      self.request.retries + 1, error)
            return
        delay = HOOK_RETRY_DELAYS[min(self.request.retries, len(HOOK_RETRY_DELAYS) - 1)]
        log.warning("run %s: finish %d failed (%s); again in %d s", run_id, finish, error, delay)
        raise self.retry(countdown=delay) from None
    counters.mark_finish_step(finish, "hook")
    log.info("run %s: finish %d announced to %s", run_id, finish, url)


class ReconcileTask(BatchTask):
    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        log.error("reconcile %s failed: %s: %s; the next change of the broker sends another", task_id,
                  type(exc).__name__, exc)


@shared_task(name=RECONCILE_TASK_NAME, bind=True, base=ReconcileTask, max_retries=RECONCILE_MAX_RETRIES)
def reconcile_runs(self: ReconcileTask):
    """worker.reconcile: the pending jobs that no message holds after the broker changed, enqueued again (or
    recorded done, when storage holds their images)."""
    try:
        reconcile.started(self.redis)
        reconcile.reconcile(self.app, self.settings, self.redis, self.store)
    except (StorageUnavailable, RedisError) as error:
        log.warning("reconcile: %s; again in %d s", error, RECONCILE_RETRY_S)
        raise self.retry(countdown=RECONCILE_RETRY_S) from None


class ReconcileOnConnect(bootsteps.StartStopStep):
    """A step of the worker's consumer, which Celery starts again at each connection to the broker: it
    records the Redis server in the broker (worker.reconcile.request) and sends the reconcile task when the
    server is another one than the fleet saw last, or on a reconnection, once for all workers that see it."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self.connections = 0

    def start(self, parent) -> None:
        self.connections += 1
        task = parent.app.tasks[TASK_NAME]
        try:
            if reconcile.request(task.redis, reconnected=self.connections > 1):
                parent.app.send_task(RECONCILE_TASK_NAME, queue=task.settings.broker.queue,
                                     priority=PRIORITIES["high"], countdown=RECONCILE_DELAY_S)
                log.info("broker changed or reconnected: reconcile sent")
        except Exception as error:  # the consumer must start all the same: the next reconnection asks again
            log.error("could not request a reconcile: %s: %s", type(error).__name__, error)


@worker_init.connect
def _add_reconcile_step(sender, **_) -> None:
    sender.app.steps["consumer"].add(ReconcileOnConnect)


@worker_process_init.connect
def _load_model_at_process_start(**_) -> None:
    start = time.perf_counter()
    runner = generate_batch.runner
    metrics.model_loaded(generate_batch.model, time.perf_counter() - start)
    log.info("model %s loaded (%s)", runner.pipe.name, runner.pipe.precision)
