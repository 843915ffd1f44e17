"""The generate task: one micro-batch message -> PNGs + metadata in storage -> progress counters.

`process` is the task's whole body, shared by the Celery task (`generate_batch`) and by `sdbatch run`, which
calls it in-process. Failure isolation (issue 5): a batch that raises is split when out of memory and
otherwise retried job by job once; a job that still fails, or whose image came out NaN, is recorded with its
reason, its neighbours are not. A store that is down makes the task retry later; a malformed message is
rejected with a log line. Whatever else ends a batch (its hard time limit, a bug, a store down for an hour) is
recorded by `BatchTask.on_failure` as the failure of its unfinished jobs, so no consumed job stays pending:
`status` finishes and `retry` takes them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from celery import Task, shared_task
from celery.exceptions import Reject, SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import worker_process_init

from worker import config, progress
from worker.config import ModelSettings, Settings
from worker.jobs import Job, MessageError, from_message
from worker.storage import StorageError, StorageUnavailable, open_storage
from worker.validate import Limits

log = logging.getLogger(__name__)
TASK_NAME = "sdbatch.generate_batch"
STORAGE_RETRY_DELAYS = (1, 2, 5, 10, 20)  # seconds; kept below the visibility timeout (see worker.app)
STORAGE_MAX_RETRIES = 180  # ~1 hour of outage before the jobs are recorded as failed
UPLOAD_THREADS = 8  # concurrent PUTs per batch (image + metadata of each job)
NON_FINITE = "non-finite output: the latents held NaN or inf after the last step (fp16 overflow?)"


class Recorder(Protocol):
    def started(self) -> None: ...

    def done(self, job_id: str) -> None: ...

    def failed(self, job_id: str, reason: str) -> None: ...


def time_limits(generation: dict, jobs: int, limits: Limits) -> tuple[int, int]:
    """(soft, hard) seconds for one micro-batch: 4x the expected time plus model warm-up, capped by
    limits.batch_time_limit (which the broker's visibility timeout exceeds)."""
    area = generation["width"] * generation["height"] / (512 * 512)
    expected = limits.step_seconds * generation["steps"] * jobs * area
    hard = max(min(limits.batch_time_limit, int(20 + 4 * expected)), 2)
    return soft_limit(hard), hard


def soft_limit(hard: int) -> int:
    """The soft limit that leaves the batch a tenth of its hard limit to record its jobs as failed."""
    return max(hard - max(hard // 10, 1), 1)


def load_pipeline(model: ModelSettings):
    import torch

    import sdcore

    device = model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    # winograd is a CPU fast path; with device auto a GPU worker leaves it off (cuDNN picks its own).
    winograd = model.winograd and device == "cpu"
    return sdcore.load(model.checkpoint, device=device, dtype=model.precision, winograd=winograd)


def is_out_of_memory(error: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError is a RuntimeError; the CPU allocator says "can't allocate memory"
    text = str(error)
    return isinstance(error, MemoryError) or "out of memory" in text or "can't allocate memory" in text


class BatchRunner:
    """Makes the images of micro-batches with one resident pipeline and writes them to one store."""

    def __init__(self, pipe, store, hostname: str):
        self.pipe, self.store, self.hostname = pipe, store, hostname
        self.uploads = ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="upload")

    def run(self, run_id: str, jobs: list[Job], recorder: Recorder) -> None:
        recorder.started()
        start = time.perf_counter()
        outcomes = self._generate_isolated(jobs)
        generate_s = (time.perf_counter() - start) / len(jobs)
        images = []
        for job, outcome in outcomes:
            if isinstance(outcome, str):
                log.error("job %s/%s failed: %s", run_id, job.job_id, outcome)
                recorder.failed(job.job_id, outcome)
            else:
                images.append((job, outcome))
        # Uploads wait on the network: side by side, a batch pays about one round trip instead of one per
        # file. All of them finish before the task returns, so the message is acked only once they are stored.
        pending = [(job, self.uploads.submit(self._write, run_id, job, image, len(jobs), generate_s))
                   for job, image in images]
        try:
            for job, upload in pending:
                try:
                    upload.result()
                except StorageError as error:
                    if isinstance(error, StorageUnavailable):
                        raise
                    recorder.failed(job.job_id, f"storage: {error}")
                    continue
                recorder.done(job.job_id)
        except SoftTimeLimitExceeded:
            # the images exist but the store took them too slowly for the batch's time limit: as for an
            # outage, retry the batch later (it makes the same bytes again)
            raise StorageUnavailable("the store was too slow: the batch's soft time limit hit during "
                                     "uploads") from None
        finally:
            # On an outage, do not wait for the other uploads' own retries: the batch is retried whole, and
            # an upload that still lands later writes the same bytes the retry will.
            for _, upload in pending:
                upload.cancel()

    def _generate(self, jobs: list[Job]) -> list[tuple[Job, object]]:
        """One pipeline pass: [(job, PIL image, or NON_FINITE when its latents are not finite)]."""
        finite = []

        def check_last_step(step: int, total: int, latents) -> None:
            # sdcore hands back PIL images, in which NaN has already become black pixels: judge each image by
            # its final latents instead (one reduction; the fp16 VAE overflow is redone in fp32 by sdcore)
            if step == total:
                finite.extend(latents.flatten(1).isfinite().all(1).tolist())

        images = self.pipe.generate([job.prompt for job in jobs], [job.seed for job in jobs],
                                    negative_prompts=[job.negative_prompt for job in jobs],
                                    progress=False, callback=check_last_step, **jobs[0].generation())
        return [(job, image if ok else NON_FINITE)
                for job, image, ok in zip(jobs, images, finite, strict=True)]

    def _generate_isolated(self, jobs: list[Job]) -> list[tuple[Job, object]]:
        """[(job, PIL image or failure reason)]."""
        try:
            return self._generate(jobs)
        except SoftTimeLimitExceeded:
            # no time left to retry anything: record the batch, `sdbatch retry` can take it again
            return [(job, "time limit exceeded (limits.batch_time_limit / step_seconds)") for job in jobs]
        except Exception as error:
            if is_out_of_memory(error):
                self._release_memory()
                if len(jobs) == 1:
                    return [(jobs[0], f"out of memory: {error}")]
                log.warning("out of memory on a batch of %d; splitting it", len(jobs))
                half = len(jobs) // 2
                return self._generate_isolated(jobs[:half]) + self._generate_isolated(jobs[half:])
            if len(jobs) == 1:
                return [(jobs[0], f"{type(error).__name__}: {error}")]
            log.warning("a batch of %d raised %s: %s; running each job alone", len(jobs),
                        type(error).__name__, error)
            outcomes = []
            for job in jobs:
                try:
                    outcomes += self._generate([job])
                except SoftTimeLimitExceeded:
                    raise
                except Exception as alone:
                    outcomes.append((job, f"{type(alone).__name__}: {alone}"))
            return outcomes

    def _release_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _write(self, run_id: str, job: Job, image, batch_size: int, generate_s: float) -> None:
        from sdcore.png import png_bytes

        settings = self.pipe.settings(job.prompt, job.seed, negative_prompt=job.negative_prompt,
                                      **job.generation())
        # ids in the PNG tie it to its run; nothing time- or host-dependent, so a rerun writes the same bytes
        png = png_bytes(image, {**settings, "run_id": run_id, "job_id": job.job_id})
        image_key = f"{run_id}/images/{job.job_id}.png"
        start = time.perf_counter()
        self.store.put(image_key, png, "image/png")
        upload_s = time.perf_counter() - start
        meta = {
            **settings, "run_id": run_id, "job_id": job.job_id, "index": job.index, "line": job.line,
            "image": job.image, "model_sha256": self.pipe.sha256, "image_key": image_key,
            "image_sha256": hashlib.sha256(png).hexdigest(), "worker": self.hostname,
            "timings": {"batch_size": batch_size, "generate_s": round(generate_s, 4),
                        "upload_s": round(upload_s, 4)},
        }
        meta_json = json.dumps(meta, sort_keys=True, ensure_ascii=False, indent=1).encode()
        self.store.put(f"{run_id}/meta/{job.job_id}.json", meta_json, "application/json")


def process(message: object, runner: BatchRunner, limits: Limits, recorder_for) -> str:
    """The task body: check the message, record its unusable jobs as failed, run the rest. Returns the run
    id; raises MessageError for a message that cannot be used at all."""
    run_id, jobs, rejected = from_message(message, limits)
    recorder = recorder_for(run_id)
    for job_id, reason in rejected:
        log.error("run %s: rejected job %s: %s", run_id, job_id or "?", reason)
        if job_id:
            recorder.failed(job_id, reason)
    if jobs:
        runner.run(run_id, jobs, recorder)
    return run_id


# --- the Celery side ----------------------------------------------------------------------------------------

@dataclass
class WorkerState:
    settings: Settings
    runner: BatchRunner
    redis: object


_state: WorkerState | None = None
_counters_client = None


def counters_client():
    """This process's Redis client for the run counters (the worker's main process has no WorkerState)."""
    global _counters_client
    if _counters_client is None:
        _counters_client = progress.connect(config.from_env().broker.url)
    return _counters_client


def worker_state(hostname: str | None = None) -> WorkerState:
    """This process's settings, resident pipeline, store and Redis client, made on first use. Made in the
    pool process that runs the tasks (after the fork), so the GPU context and sockets belong to it."""
    global _state
    if _state is None:
        settings = config.from_env()
        runner = BatchRunner(load_pipeline(settings.model), open_storage(settings.storage),
                             hostname or socket.gethostname())
        _state = WorkerState(settings, runner, counters_client())
        log.info("model %s loaded (%s)", runner.pipe.name, runner.pipe.precision)
    return _state


@worker_process_init.connect
def _load_model_at_process_start(**_) -> None:
    worker_state()


class BatchTask(Task):
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
            run_id, jobs, _ = from_message(args[0] if args else None, config.from_env().limits)
            recorder = progress.RunProgress(counters_client(), run_id)
            for job in jobs:
                recorder.failed(job.job_id, reason)
        except Exception as error:  # a message that never was usable, or Redis gone: `resume` finds them
            log.error("task %s failed (%s) and its jobs could not be recorded as failed: %s", task_id, reason,
                      error)
            return
        log.error("run %s: %d jobs of task %s recorded as failed: %s", run_id, len(jobs), task_id, reason)


@shared_task(name=TASK_NAME, bind=True, base=BatchTask, max_retries=STORAGE_MAX_RETRIES)
def generate_batch(self, message):
    state = worker_state()
    state.runner.hostname = self.request.hostname or state.runner.hostname
    try:
        process(message, state.runner, state.settings.limits,
                lambda run_id: progress.RunProgress(state.redis, run_id))
    except MessageError as error:
        log.error("rejected message %s: %s", self.request.id, error)
        raise Reject(str(error), requeue=False) from None
    except StorageUnavailable as error:
        if self.request.retries >= self.max_retries:
            raise  # on_failure records the batch's jobs as failed
        delay = STORAGE_RETRY_DELAYS[min(self.request.retries, len(STORAGE_RETRY_DELAYS) - 1)]
        log.warning("storage unavailable (%s); retrying the batch in %d s", error, delay)
        raise self.retry(countdown=delay) from None
