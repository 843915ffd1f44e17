"""Prometheus metrics of the workers: every metric's one definition, the per-worker set-up of the multiprocess
files, and the HTTP endpoint that serves them.

Under the prefork pool the images are made in pool processes while the Celery worker's main process is the one
that lives for the whole worker: each process writes its values to files in $PROMETHEUS_MULTIPROC_DIR
(prometheus_client's multiprocess mode, chosen when prometheus_client is imported, hence set in the
environment before the worker starts) and the main process serves their sum on $SDBATCH_METRICS_PORT. `sdbatch
worker` sets both for each device's worker (`WorkerMetrics`): port 9808 + the GPU index (9808 for the CPU)
unless $SDBATCH_METRICS_PORT gives another base, 0 turning the endpoint off, and a directory emptied at each
(re)start so that a restarted worker starts its counters from zero, as Prometheus expects of a new process.

The endpoint is also the workers' liveness check on Kubernetes (deploy/k8s/worker.yaml): it answers without
the broker, so a Redis outage does not restart a healthy GPU pod.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tempfile

from celery.signals import task_postrun, task_prerun, worker_init
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from worker import progress
from worker.config import ConfigError
from worker.messages import TASK_NAME

log = logging.getLogger(__name__)
PORT_ENV = "SDBATCH_METRICS_PORT"
DIRECTORY_ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT_PORT = 9808
OUTCOMES = ("done", "failed", "cancelled")

images = Counter("sdbatch_images", "Jobs recorded by this worker, by outcome: done (image and metadata "
                 "stored), failed, cancelled (dropped unrun: its run was cancelled)", ["model", "outcome"])
batch_seconds = Histogram("sdbatch_batch_seconds", "Seconds from a micro-batch's model start to its last "
                          "image stored, for each batch the model ran", ["model"],
                          buckets=(0.5, 1, 2, 5, 10, 20, 40, 60, 120, 300, 600))
step_seconds = Histogram("sdbatch_step_seconds", "A micro-batch's generation seconds divided by its sampler "
                         "steps (text encoding and VAE decode included), once per batch", ["model"],
                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
model_load_seconds = Gauge("sdbatch_model_load_seconds", "Seconds a pool process took to load its model and "
                           "embeddings at its start", ["model"], multiprocess_mode="livemax")
adapter_loads = Counter("sdbatch_adapter_loads", "LoRAs and VAEs added to the resident pipeline for the "
                        "batches that name them", ["kind"])
batch_size = Gauge("sdbatch_batch_size", "Jobs in the micro-batches the pool processes are running now (0 "
                   "between batches)", multiprocess_mode="livesum")
gpu_memory = Gauge("sdbatch_gpu_memory_bytes", "CUDA memory of the pool process after its last batch "
                   "(torch.cuda.memory_allocated / memory_reserved); absent without CUDA", ["kind"],
                   multiprocess_mode="livemax")


class CountedProgress(progress.RunProgress):
    """Run counters that also count each job recorded in `sdbatch_images_total`, and keep the failures
    recorded through them (for the batch's task state, worker.tasks)."""

    def __init__(self, client, run_id: str, model: str):
        super().__init__(client, run_id)
        self.model, self.recorded_failures = model, {}

    def done(self, job_id: str, image_sha256: str | None = None) -> None:
        super().done(job_id, image_sha256)
        images.labels(self.model, "done").inc()

    def failed(self, job_id: str, reason: str) -> None:
        super().failed(job_id, reason)
        self.recorded_failures[job_id] = reason
        images.labels(self.model, "failed").inc()

    def cancelled(self, job_ids: list[str]) -> None:
        super().cancelled(job_ids)
        images.labels(self.model, "cancelled").inc(len(job_ids))


def model_loaded(model: str, seconds: float) -> None:
    """A pool process's model is loaded: its load time, and every outcome's count shown from 0 on, so that
    rate() and alerts on failures see the first one."""
    model_load_seconds.labels(model).set(seconds)
    for outcome in OUTCOMES:
        images.labels(model, outcome)


def batch_ran(model: str, seconds: float, generate_seconds: float, steps: int) -> None:
    """A micro-batch the model ran: its time, its time per step and, on a GPU, the memory it left held."""
    batch_seconds.labels(model).observe(seconds)
    step_seconds.labels(model).observe(generate_seconds / max(steps, 1))
    import torch  # loaded already: the batch ran on it

    if torch.cuda.is_available():
        gpu_memory.labels("allocated").set(torch.cuda.memory_allocated())
        gpu_memory.labels("reserved").set(torch.cuda.memory_reserved())


def metrics_port(device: str, environ) -> int:
    """The port of the worker of `device` (a GPU index or "cpu"); 0: no endpoint."""
    text = environ.get(PORT_ENV, str(DEFAULT_PORT))
    if not re.fullmatch(r"\d{1,5}", text) or int(text) > 65535:
        raise ConfigError(f"{PORT_ENV}: {text!r} is not a port; accepted: 0 (no metrics endpoint) or the "
                          f"base port 1-65535 (default {DEFAULT_PORT}; a GPU's worker adds its index)")
    base = int(text)
    return base + (0 if device == "cpu" else int(device)) if base else 0


class WorkerMetrics:
    """What `sdbatch worker` gives one device's Celery worker: its metrics port and multiprocess directory
    (removed when the supervisor exits)."""

    def __init__(self, device: str, environ):
        self.port = metrics_port(device, environ)
        self._directory = tempfile.TemporaryDirectory(prefix="sdbatch-metrics-")

    def env(self) -> dict[str, str]:
        """The worker's variables, at each (re)start: the files of the previous worker are gone."""
        for name in os.listdir(self._directory.name):
            os.remove(os.path.join(self._directory.name, name))
        return {PORT_ENV: str(self.port), DIRECTORY_ENV: self._directory.name}


class LiveCollector(MultiProcessCollector):
    """prometheus_client's multiprocess collector, first dropping the live gauges of pool processes that died
    without a word (killed by the hard time limit, or recycled): their last batch size would count forever."""

    def collect(self):
        for path in glob.glob(os.path.join(self._path, "gauge_live*_*.db")):
            pid = int(path.rsplit("_", 1)[1].removesuffix(".db"))
            if not _alive(pid):
                mark_process_dead(pid, self._path)
        return super().collect()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # a process of another user holds that pid now, not ours: keep the file rather than guess
    return True


@worker_init.connect
def _serve(**_) -> None:
    """In the Celery worker's main process, before the pool starts: the endpoint answers while the pool
    processes load the model, and for as long as the worker lives."""
    port, directory = os.environ.get(PORT_ENV, "0"), os.environ.get(DIRECTORY_ENV)
    if not directory or not port.isdigit() or int(port) == 0:
        return  # not started by `sdbatch worker`, or the endpoint is off
    registry = CollectorRegistry()
    LiveCollector(registry, directory)
    try:
        start_http_server(int(port), registry=registry)
    except OSError as error:  # images matter more than their metrics: the worker runs on without them
        log.error("metrics endpoint not started on port %s: %s; accepted: a free port in %s", port, error,
                  PORT_ENV)
        return


@task_prerun.connect
def _batch_started(sender=None, args=(), **_) -> None:
    if getattr(sender, "name", None) == TASK_NAME:
        message = args[0] if args else None
        jobs = message.get("jobs") if isinstance(message, dict) else None
        batch_size.set(len(jobs) if isinstance(jobs, list) else 0)


@task_postrun.connect
def _batch_ended(sender=None, **_) -> None:
    if getattr(sender, "name", None) == TASK_NAME:
        batch_size.set(0)
