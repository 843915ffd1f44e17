"""One micro-batch made and stored: the library under the generate task (worker.tasks) and `sdbatch run`.

`process` is the task's whole body, shared by the Celery task and by `sdbatch run`, which calls it
in-process. Failure isolation: a batch that raises is split when out of memory and otherwise retried job by
job once; a job that still fails, or whose image came out NaN, is recorded with its reason, its neighbours
are not. A store that is down raises StorageUnavailable (the task retries the batch later); a malformed
message raises MessageError.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from celery.exceptions import SoftTimeLimitExceeded

from worker import metrics
from worker.adapters import AdapterError, Adapters, loras_named
from worker.config import ModelSettings
from worker.jobs import Job
from worker.messages import from_message, message_model
from worker.storage import StorageError, StorageUnavailable
from worker.validate import Limits

log = logging.getLogger(__name__)
UPLOAD_THREADS = 8  # concurrent PUTs per batch (image + metadata of each job)
NON_FINITE = "non-finite output: the latents held NaN or inf after the last step (fp16 overflow?)"


class Recorder(Protocol):
    def started(self) -> None: ...

    def done(self, job_id: str, image_sha256: str | None = None) -> None: ...

    def failed(self, job_id: str, reason: str) -> None: ...

    def state(self) -> str: ...  # worker.progress.STATES

    def hold(self, message: str) -> bool: ...

    def cancelled(self, job_ids: list[str]) -> None: ...


def load_pipeline(model: ModelSettings, adapters: Adapters | None = None):
    """The pipeline `model:` names, as configured: sdcore itself resolves device auto, the precision it
    implies and where winograd and the backend can run; with every embedding of the adapter locations added
    (the prompt word is the file's stem). LoRAs are added by the batches that name them (BatchRunner)."""
    import sdcore

    pipe = sdcore.load(model.checkpoint, device=model.device, dtype=model.precision, winograd=model.winograd,
                       vae=model.vae, backend=model.backend)
    if adapters is not None:
        for name in adapters.available("embeddings"):
            pipe.add_embedding(adapters.path("embeddings", name), name)
    return pipe


def is_out_of_memory(error: BaseException) -> bool:
    # torch.cuda.OutOfMemoryError is a RuntimeError; the CPU allocator says "can't allocate memory"
    text = str(error)
    return isinstance(error, MemoryError) or "out of memory" in text or "can't allocate memory" in text


class BatchRunner:
    """Makes the images of micro-batches with one resident pipeline and writes them to one store."""

    def __init__(self, pipe, store, hostname: str, adapters: Adapters | None = None,
                 model: str | None = None):
        self.pipe, self.store, self.hostname, self.adapters = pipe, store, hostname, adapters
        self.model = model  # the name jobs call the pipeline's model (model.name); None: take any message
        self.uploads = ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="upload")

    def load_adapters(self, jobs: list[Job]) -> None:
        """Add every LoRA and VAE the jobs name that the pipeline lacks, from the adapter locations
        (downloaded into the cache on first use). One that cannot be had is left out: its jobs fail with
        sdcore's reason. A store that is down raises StorageUnavailable (the batch is retried later)."""
        loras, vaes = set(), set()
        for job in jobs:
            if job.request.generation.vae is not None:
                vaes.add(job.request.generation.vae)
            try:
                loras.update(loras_named(job.request.prompt, job.request.generation.loras))
            except ValueError:
                pass  # a malformed tag: the job fails in the pipeline, naming it
        if self.adapters is None:
            return
        for kind, names, add in (("loras", loras - set(self.pipe.loras), self.pipe.add_lora),
                                 ("vaes", vaes - set(self.pipe.vaes), self.pipe.add_vae)):
            for name in sorted(names):
                try:
                    add(self.adapters.path(kind, name), name)
                except (AdapterError, KeyError, ValueError) as error:  # CheckpointError: sdcore refuses it
                    log.error("%s %s could not be loaded: %s", kind[:-1], name, error)
                    continue
                metrics.adapter_loads.labels(kind[:-1]).inc()

    def run(self, run_id: str, jobs: list[Job], recorder: Recorder) -> None:
        recorder.started()
        self.load_adapters(jobs)
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
                    image_sha256 = upload.result()
                except StorageError as error:
                    if isinstance(error, StorageUnavailable):
                        raise
                    recorder.failed(job.job_id, f"storage: {error}")
                    continue
                recorder.done(job.job_id, image_sha256)
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
        metrics.batch_ran(self.pipe.name, time.perf_counter() - start, generate_s * len(jobs),
                          jobs[0].request.generation.steps)

    def _generate(self, jobs: list[Job]) -> list[tuple[Job, object]]:
        """One pipeline pass: [(job, PIL image, or NON_FINITE when its latents were not finite)]."""
        results = self.pipe.run([job.request for job in jobs], progress=False)
        return [(job, result.image if result.finite else NON_FINITE)
                for job, result in zip(jobs, results, strict=True)]

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

    def _write(self, run_id: str, job: Job, image, batch_size: int, generate_s: float) -> str:
        """Store the PNG and its metadata; returns the PNG's SHA-256."""
        from sdcore.png import png_bytes

        settings = self.pipe.metadata(job.request)
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
        return meta["image_sha256"]


def wrong_model(message: dict, runner: BatchRunner) -> str | None:
    """Why this runner must not render the message, or None."""
    name, sha256 = message_model(message)
    if name is None or runner.model is None:
        return None
    if name != runner.model:
        return (f"a batch for model {name} reached a worker holding {runner.model}; accepted: the queue of "
                f"{name}'s workers (models.{name}.queue of the enqueueing config)")
    if sha256 and runner.pipe.sha256 and sha256 != runner.pipe.sha256:
        return (f"a batch for model {name} with sha256 {sha256[:12]}... reached a worker whose {name} has "
                f"sha256 {runner.pipe.sha256[:12]}...; accepted: the same weights under one name")
    return None


def wrong_store(message: dict, runner: BatchRunner) -> str | None:
    """Why this runner must not write the message's images: its run lives in another store (the enqueuing
    config's), which this worker would fill with orphans while the run record waits elsewhere."""
    wanted = message.get("storage")
    if wanted is None or wanted == runner.store.identity:
        return None
    return (f"the run lives in {wanted}, this worker writes to {runner.store.identity}; accepted: workers "
            "whose storage (storage.url, SDBATCH_STORAGE_URL) is the run's")


def process(message: object, runner: BatchRunner, limits: Limits, recorder_for) -> str:
    """The task body: check the message, record its unusable jobs as failed, run the rest, unless the run is
    cancelled (its jobs are recorded as cancelled, the model never runs) or paused (the message is held for
    `sdbatch unpause`). A message for another model than the runner's fails whole, naming both: it reached
    the wrong queue, and no image is made with the wrong model. Returns the run id; raises MessageError for
    a message that cannot be used at all."""
    run_id, jobs, rejected = from_message(message, limits)
    recorder = recorder_for(run_id)
    for job_id, reason in rejected:
        log.error("run %s: rejected job %s: %s", run_id, job_id or "?", reason)
        if job_id:
            recorder.failed(job_id, reason)
    if not jobs:
        return run_id
    wrong = wrong_model(message, runner) or wrong_store(message, runner)
    if wrong:
        log.error("run %s: %s", run_id, wrong)
        for job in jobs:
            recorder.failed(job.job_id, wrong)
        return run_id
    state = recorder.state()
    if state == "cancelled":
        recorder.cancelled([job.job_id for job in jobs])
        log.info("run %s is cancelled: dropped %d jobs", run_id, len(jobs))
    elif state == "paused" and recorder.hold(json.dumps(message)):
        log.info("run %s is paused: held a batch of %d jobs", run_id, len(jobs))
    else:
        runner.run(run_id, jobs, recorder)
    return run_id
