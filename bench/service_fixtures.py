"""A private service for the benchmarks: Redis, SeaweedFS S3 and `sdbatch worker` processes (optionally pinned
to one core each with taskset), started with the test fixtures' server classes outside pytest.

    with Service.running() as service:
        config, env, settings = service.config("bench", {"steps": 10, "width": 128, "height": 128})
        service.start_workers(config, env, cpus=[0, 1])
        timing = service.timed_run(settings, prompts, "run-1")   # .seconds, .status, .core_share

Redis runs with `appendfsync everysec`, as deploy/ configures it, instead of the fixtures' fsync on every
write (which tests need for crash-safety, and which would make every published message wait on the disk).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis
import yaml

from tests.fixtures_servers import (
    RedisServer,
    S3Server,
    WorkerProcess,
    WorkerProcesses,
    sdbatch_env,
    worker_command,
)
from worker import client, progress
from worker.config import Settings, load_config

POLL_S = 0.1  # the end time is the worker's own stamp, so polling only has to notice it (cheaply)
RUN_DEADLINE_S = 600.0


class Service:
    def __init__(self, root: Path, redis_server: RedisServer, s3: S3Server, bucket: str):
        self.root, self.redis, self.s3, self.bucket = root, redis_server, s3, bucket
        self.workers = WorkerProcesses(root)

    @classmethod
    @contextmanager
    def running(cls) -> Iterator[Service]:
        root = Path(tempfile.mkdtemp(prefix="sdbatch-bench-"))
        redis_server = RedisServer(dir=root / "redis")
        s3 = S3Server(data_dir=root / "s3", log_path=root / "weed.log")
        service = None
        try:
            redis_server.start()
            redis.Redis.from_url(redis_server.url()).config_set("appendfsync", "everysec")
            s3.start()
            # this process enqueues and reads metadata as a client would: credentials in the AWS variables
            os.environ.update(s3.env())
            service = cls(root, redis_server, s3, s3.create_bucket())
            yield service
        finally:
            if service is not None:
                service.stop_workers()
            s3.stop()
            redis_server.stop()

    def redis_client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis.url())

    def config(self, name: str, sampling: dict, queue: str = "sdbatch-bench") -> tuple[Path, dict, Settings]:
        """A config for tiny-random on the CPU with these sampling settings, storage in this service's bucket;
        (path, worker/CLI environment, settings). Generous time limits: a loaded machine must not fail
        batches, it only makes them slower."""
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": {"checkpoint": "tiny-random", "device": "cpu"},
            "sampling": sampling,
            "broker": {"queue": queue},
            "storage": {"url": f"s3://{self.bucket}/{name}"},
            "limits": {"batch_time_limit": 300, "step_seconds": 1.0},
        }))
        env = sdbatch_env(path, self.redis.url(), self.s3)
        return path, env, load_config(path, environ=env)

    def start_workers(self, config: Path, env: dict, cpus: list[int | None]) -> list[WorkerProcess]:
        """One `sdbatch worker --devices cpu` per entry, pinned to that core (`taskset -c`) unless None;
        returns once every one is online (model loaded)."""
        started = []
        for cpu in cpus:
            pin = [] if cpu is None else ["taskset", "-c", str(cpu)]
            worker = WorkerProcess(argv=[*pin, *worker_command(config)], env=env,
                                   log_path=self.root / f"worker{len(self.workers.started)}.log")
            self.workers.started.append(worker)
            worker.spawn()
            started.append(worker)
        for worker in started:
            worker.wait_online()
        return started

    def stop_workers(self) -> None:
        self.workers.kill_all()
        self.workers.started.clear()

    def timed_run(self, settings: Settings, prompts: list[str], run_id: str) -> RunTiming:
        """Enqueue `prompts` and wait until every job is counted. Raises if any job failed."""
        counters = progress.RunProgress(progress.connect(settings.broker.url), run_id)
        cpu_before = [cpu_seconds(w) for w in self.workers.started]
        start = time.time()  # the worker stamps last_done with time.time() on this same machine
        client.enqueue(prompts, settings, run_id=run_id)
        deadline = time.monotonic() + RUN_DEADLINE_S
        while not (status := counters.status()).finished:
            dead = [w.log_path for w in self.workers.started if not w.running]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"run {run_id}: {status.done}/{status.total} done; "
                                   f"{'workers died: see ' + str(dead) if dead else 'deadline passed'}")
            time.sleep(POLL_S)
        observed_s = time.time() - start
        if status.failed:
            raise RuntimeError(f"run {run_id}: {status.failed} jobs failed: {counters.failures()}")
        core_share = [(cpu_seconds(worker) - before) / observed_s
                      for worker, before in zip(self.workers.started, cpu_before, strict=True)]
        return RunTiming(status.last_done - start, status, core_share)


@dataclass(frozen=True)
class RunTiming:
    seconds: float  # from just before the enqueue to the last job's completion, as the worker stamped it
    status: progress.Status
    # CPU seconds each worker's process tree used per wall second of the run: how much of a core it got
    # (on a machine that other work shares, a pinned worker gets less than 1.0)
    core_share: list[float]


def cpu_seconds(worker: WorkerProcess) -> float:
    """User + system CPU seconds used so far by the live processes of a worker's tree."""
    total = 0.0
    try:
        leader = psutil.Process(worker.process.pid)
        tree = [leader, *leader.children(recursive=True)]
    except psutil.NoSuchProcess:
        return total
    for process in tree:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total
