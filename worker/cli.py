"""`sdbatch`: run | enqueue | worker | status | failed | retry | resume | cancel | pause | unpause | gallery.

    sdbatch run examples/prompts.txt --config configs/demo.yaml          # embedded: no Redis, no S3
    sdbatch enqueue prompts.jsonl --config configs/sd15-fp16.yaml        # prints the run id last
    sdbatch worker --config configs/sd15-fp16.yaml --devices all         # one Celery worker per GPU
    sdbatch status RUN_ID --config configs/sd15-fp16.yaml --wait         # 0 all done, 2 some failed

Exit codes and environment variables: EPILOG (what `sdbatch --help` prints).

Worker node names are unique per host: `cpu@host` and `gpuN@host` for the first supervisor, `cpu-2@host` ...
for further ones on the same host (Celery and Flower need unique names), or `--name NAME` (env
SDBATCH_NODE_NAME): `NAME@host` on the CPU, `NAME-gpuN@host` per GPU.
"""

from __future__ import annotations

import argparse
import fcntl
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

from worker.config import ConfigError, Settings, load_config, redact_url
from worker.validate import check_run_id

EXIT_OK, EXIT_PENDING, EXIT_FAILED, EXIT_INPUT, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4
EPILOG = """\
exit codes: 0 success; 1 still pending (status without --wait); 2 some jobs failed; 3 bad input or config
  (missing or refused S3 credentials included); 4 Redis or the store unavailable (after retries; nothing
  half-done is lost: `resume` finishes an enqueue)
environment: SDBATCH_CONFIG (the config when --config is left out), SDBATCH_BROKER_URL (with the Redis
  password), SDBATCH_STORAGE_URL, SDBATCH_S3_ENDPOINT_URL, SDBATCH_NODE_NAME (worker --name),
  SDBATCH_METRICS_PORT (workers' Prometheus port base, 0: none), SDBATCH_HOOK_SECRET (workers: signs the
  --notify POST); S3 credentials only from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE"""
NODE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def main(argv: list[str] | None = None) -> int:
    # $SDBATCH_CONFIG stands in for --config on every command (the variable `sdbatch worker` also sets)
    config = os.environ.get("SDBATCH_CONFIG")
    config_option = {"default": config} if config else {"required": True}
    config_option["help"] = "the YAML config (default: $SDBATCH_CONFIG)"
    parser = argparse.ArgumentParser(prog="sdbatch", description="Batch image generation with sdcore.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="generate a prompt file in this process into a local folder")
    run.add_argument("prompts", help="a .txt, .jsonl or .csv prompt file")
    run.add_argument("--out", help="output directory (default: the config's storage)")
    enqueue = commands.add_parser("enqueue", help="validate a prompt file and queue it for the workers")
    enqueue.add_argument("prompts", help="a .txt, .jsonl or .csv prompt file")
    for command in (run, enqueue):
        command.add_argument("--config", **config_option)
        command.add_argument("--run-id", help="[A-Za-z0-9_-]{1,64}; default: time + random suffix")
        command.add_argument("--images-per-prompt", type=int, default=1, metavar="N")
        command.add_argument("--seed", type=int, help="the run's base seed (default: sampling.seed)")
        command.add_argument("--skip-invalid", action="store_true",
                             help="report bad lines and go on with the good ones")
    enqueue.add_argument("--priority", choices=("high", "normal", "low"), default="normal",
                         help="workers take a queued batch of a higher-priority run first (default normal)")
    enqueue.add_argument("--notify", metavar="URL",
                         help="POST the run's summary here at its finish (signed with $SDBATCH_HOOK_SECRET)")

    worker = commands.add_parser("worker", help="start one Celery worker process per device")
    worker.add_argument("--config", **config_option)
    worker.add_argument("--devices", default="all", help="all | cpu | comma-separated GPU indices (0,1)")
    worker.add_argument("--concurrency", type=int, default=1, help="pool processes per device")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--name", default=os.environ.get("SDBATCH_NODE_NAME"),
                        help="node name base (env SDBATCH_NODE_NAME); default cpu / gpuN, unique per host")

    for name, text in (("status", "progress of a run"), ("failed", "list a run's failed jobs"),
                       ("retry", "re-enqueue a run's failed jobs"),
                       ("resume", "re-enqueue every job whose image is missing from storage"),
                       ("cancel", "drop a run's queued batches unrun (its other jobs end cancelled)"),
                       ("pause", "set a run's batches aside as workers reach them, until unpause"),
                       ("unpause", "enqueue a paused run's set-aside batches again"),
                       ("gallery", "write an HTML page of a run's images and failures into its storage")):
        command = commands.add_parser(name, help=text)
        command.add_argument("run_id")
        command.add_argument("--config", **config_option)
        if name == "status":
            command.add_argument("--wait", action="store_true",
                                 help="follow until every job is done or failed")

    args = parser.parse_args(argv)
    from worker.client import BROKER_ERRORS, BrokerUnavailable
    from worker.storage import StorageError, StorageUnavailable

    settings = None
    try:
        settings = load_config(args.config)
        return COMMANDS[args.command](args, settings)
    except ConfigError as error:
        print(f"sdbatch: {error}", file=sys.stderr)
        return EXIT_INPUT
    except ValueError as error:  # PromptFileError, RunError, InvalidField: they name the file, line or field
        print(f"sdbatch: {error}", file=sys.stderr)
        return EXIT_INPUT
    except (BrokerUnavailable, StorageUnavailable) as error:
        print(f"sdbatch: {error}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except StorageError as error:  # permanent: access denied, no such bucket: the settings are wrong
        print(f"sdbatch: storage: {error}", file=sys.stderr)
        return EXIT_INPUT
    except BROKER_ERRORS as error:
        print(f"sdbatch: broker {redact_url(settings.broker.url)} unavailable ({error}); accepted: a "
              "reachable Redis with the right password (in SDBATCH_BROKER_URL)", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except OSError as error:  # a file named on the command line or in the config: missing, unreadable ...
        print(f"sdbatch: {error}", file=sys.stderr)
        return EXIT_INPUT


def cmd_run(args, settings: Settings) -> int:
    from tqdm import tqdm

    from worker.adapters import Adapters
    from worker.batch import BatchRunner, load_pipeline, process
    from worker.client import prepare
    from worker.jobs import micro_batches, run_record
    from worker.messages import to_message
    from worker.storage import open_storage

    run_id, jobs, errors, header = prepare(args.prompts, settings, args.run_id, args.images_per_prompt,
                                           args.seed, args.skip_invalid)
    _print_skipped(errors)
    store = open_storage(settings.storage, args.out)
    adapters = Adapters(settings.adapters, settings.storage.endpoint_url) if settings.adapters.configured \
        else None
    # the model before the run record: a model that cannot load (no GPU for device cuda, a missing file)
    # leaves no run behind
    pipe = load_pipeline(settings.model, adapters)
    store.put(f"{run_id}/run.jsonl", run_record(run_id, header, jobs), "application/x-ndjson")
    if pipe.is_random:
        print(f"sdbatch: model {pipe.name} has random weights: its images are noise patterns, not art",
              file=sys.stderr)
    runner = BatchRunner(pipe, store, f"local@{socket.gethostname()}", adapters, settings.model.name)
    recorder = LocalRecorder(tqdm(total=len(jobs), unit="img", desc=run_id))
    for batch in micro_batches(jobs, settings.sampling.micro_batch):
        process(to_message(run_id, batch), runner, settings.limits, lambda _: recorder)
    recorder.bar.close()
    for job_id, reason in sorted(recorder.failures.items()):
        print(f"failed {job_id}: {reason}", file=sys.stderr)
    print(f"{recorder.bar.n} images, {len(recorder.failures)} failed: {store.location(run_id)}")
    return EXIT_FAILED if recorder.failures else EXIT_OK


class LocalRecorder:
    """Progress of `sdbatch run`: a tqdm bar instead of Redis counters."""

    def __init__(self, bar):
        self.bar, self.failures = bar, {}

    def started(self) -> None:
        pass  # the bar started when the run did

    def state(self) -> str:
        return "active"  # an in-process run is stopped with Ctrl-C, not cancelled or paused

    def done(self, job_id: str, image_sha256: str | None = None) -> None:
        self.bar.update(1)

    def failed(self, job_id: str, reason: str) -> None:
        self.failures[job_id] = reason
        self.bar.set_postfix(failed=len(self.failures))


def cmd_enqueue(args, settings: Settings) -> int:
    from worker import client

    start = time.perf_counter()
    run_id, jobs, errors, header = client.prepare(args.prompts, settings, args.run_id, args.images_per_prompt,
                                                  args.seed, args.skip_invalid, args.priority, args.notify)
    _print_skipped(errors)
    client.enqueue_prepared(settings, run_id, jobs, header)
    print(f"enqueued {len(jobs)} jobs on {redact_url(settings.broker.url)} queue {settings.broker.queue} "
          f"in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    print(run_id)
    return EXIT_OK


def _print_skipped(errors: list[str]) -> None:
    for error in errors:
        print(f"skipped {error}", file=sys.stderr)


def cmd_worker(args, settings: Settings) -> int:
    from worker.metrics import WorkerMetrics

    devices = _devices(args.devices, settings)
    _check_store(settings)
    if args.name is not None and not NODE_NAME_PATTERN.fullmatch(args.name):
        raise ConfigError(f"--name: {args.name!r} is not a node name; accepted: 1 to 64 characters from "
                          "A-Z a-z 0-9 _ . -")
    env = {**os.environ, "SDBATCH_CONFIG": os.path.abspath(args.config)}
    children: dict[int, tuple[str, subprocess.Popen]] = {}
    names = {device: claim_node_name(_node_base(device, args.name)) for device in devices}
    exporters = {device: WorkerMetrics(device, os.environ) for device in devices}

    def start(device: str) -> None:
        name = names[device][0]
        # one visible GPU per process: the model and every CUDA context of that process land on it
        visible = "" if device == "cpu" else device
        # Without gossip and mingle: gossip has every worker consume every other worker's events (O(workers²)
        # broker traffic with -E, and a traceback in the log at some broker reconnects in Celery 5.7); mingle
        # syncs revoked task ids, which sdbatch never uses, at a cost of 1 s at every start and reconnect.
        # Flower, `inspect ping` and heartbeats do not depend on either.
        argv = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-n", f"{name}@%h",
                "-Q", settings.broker.queue, "-P", "prefork", "-c", str(args.concurrency), "-E",
                "--without-gossip", "--without-mingle", "--loglevel", args.loglevel]
        process = subprocess.Popen(argv, env={**env, "CUDA_VISIBLE_DEVICES": visible,
                                              **exporters[device].env()})
        children[process.pid] = (device, process)
        print(f"sdbatch: started {name}@{socket.gethostname()} (pid {process.pid}) on "
              f"{redact_url(settings.broker.url)} queue {settings.broker.queue}", file=sys.stderr)

    stopping = False

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for _, process in children.values():  # SIGTERM = Celery's warm shutdown: finish the running batch
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for device in devices:
        start(device)
    status = 0
    while children:
        pid, wait_status = os.wait()
        if pid not in children:
            continue
        device, process = children.pop(pid)
        process.returncode = status = os.waitstatus_to_exitcode(wait_status)
        if not stopping:
            # a crashed worker leaves its GPU idle: start it again (its batch returns to the queue by itself)
            print(f"sdbatch: worker on device {device} exited with {status}; restarting it", file=sys.stderr)
            start(device)
    return status if status > 0 else 0


def _check_store(settings: Settings) -> None:
    """Missing or refused S3 credentials, a bucket that does not exist: configuration errors, said before any
    worker starts (StorageError, exit 3), not after each batch has retried them as an outage for an hour. A
    store that does not answer now may later: the workers start and retry their batches."""
    from worker.storage import StorageUnavailable, open_storage

    try:
        open_storage(settings.storage).list("sdbatch-worker-start-check")
    except StorageUnavailable as error:
        print(f"sdbatch: warning: storage unavailable ({error}); starting the workers, whose batches wait "
              "for it", file=sys.stderr)


def _node_base(device: str, name: str | None) -> str:
    if name is None:
        return "cpu" if device == "cpu" else f"gpu{device}"
    return name if device == "cpu" else f"{name}-gpu{device}"


def claim_node_name(base: str, lock_dir: str | None = None) -> tuple[str, object]:
    """(`base`, or `base-2`, `base-3` ...: the first name no other live `sdbatch worker` on this host
    holds, the held lock). A lock file per name, held for this supervisor's life and freed by the kernel when
    it dies, says which names are taken. A container has its own /tmp, so its one worker keeps the plain name
    that its healthcheck pings."""
    host = socket.gethostname()
    for number in itertools.count(1):
        name = base if number == 1 else f"{base}-{number}"
        lock = open(os.path.join(lock_dir or tempfile.gettempdir(), f"sdbatch-node-{name}@{host}.lock"), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return name, lock
        except BlockingIOError:
            lock.close()


def _devices(requested: str, settings: Settings) -> list[str]:
    if requested == "cpu":
        if settings.model.device == "cuda":
            raise ConfigError(f"{settings.path}: model.device: cuda conflicts with --devices cpu; accepted: "
                              "device auto or cpu in the config, or --devices all / GPU indices")
        return ["cpu"]
    if requested == "all":
        import torch

        count = torch.cuda.device_count()
        return [str(index) for index in range(count)] if count else _devices("cpu", settings)
    indices = requested.split(",")
    if not all(index.strip().isdigit() for index in indices):
        raise ConfigError(f"--devices: {requested!r} is not a device list; accepted: all, cpu or GPU indices "
                          "such as 0,1")
    return [index.strip() for index in indices]


def cmd_status(args, settings: Settings) -> int:
    from tqdm import tqdm

    from worker import client

    check_run_id(args.run_id)
    counters = client.run_counters(settings, args.run_id)
    if not counters.exists():
        print(f"sdbatch: run {args.run_id} has no counters on {redact_url(settings.broker.url)}; "
              f"accepted: a run id that `sdbatch enqueue` printed "
              f"(after losing Redis: `sdbatch resume {args.run_id}`)",
              file=sys.stderr)
        return EXIT_INPUT
    status = counters.status()
    if args.wait:
        bar = tqdm(total=status.total, unit="img", desc=args.run_id)
        while True:
            bar.n = status.done
            rate, eta = status.images_per_second(), status.eta_seconds()
            bar.set_postfix_str(f"{status.state} failed={status.failed} pending={status.pending} "
                                f"{rate or 0:.2f} img/s ETA {_duration(eta)}")
            if status.finished:
                break
            time.sleep(0.5)
            status = counters.status()
        bar.close()
    state = "" if status.state == "active" else f" ({status.state})"
    cancelled = f"{status.cancelled} cancelled, " if status.cancelled else ""
    print(f"{args.run_id}{state}: {status.done}/{status.total} done, {status.failed} failed, {cancelled}"
          f"{status.pending} pending, {status.images_per_second() or 0:.2f} img/s, "
          f"ETA {_duration(status.eta_seconds())}")
    if status.failed:
        return EXIT_FAILED
    return EXIT_OK if status.finished else EXIT_PENDING


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def cmd_failed(args, settings: Settings) -> int:
    from worker import client

    _, jobs = client.load_run(settings, args.run_id)
    failures = client.run_counters(settings, args.run_id).failures()
    lines = {job.job_id: job.line for job in jobs}
    for job_id, reason in failures.items():
        print(f"{job_id}\tline {lines.get(job_id, '?')}\t{reason}")
    return EXIT_OK


def cmd_retry(args, settings: Settings) -> int:
    from worker import client

    print(f"re-enqueued {client.retry(settings, args.run_id)} failed jobs of {args.run_id}")
    return EXIT_OK


def cmd_resume(args, settings: Settings) -> int:
    from worker import client

    print(f"re-enqueued {client.resume(settings, args.run_id)} missing jobs of {args.run_id}")
    return EXIT_OK


def cmd_cancel(args, settings: Settings) -> int:
    from worker import client

    held = client.cancel(settings, args.run_id)
    print(f"cancelled {args.run_id}: workers drop its queued batches as they reach them"
          + (f"; {held} set-aside jobs cancelled" if held else ""))
    return EXIT_OK


def cmd_pause(args, settings: Settings) -> int:
    from worker import client

    client.pause(settings, args.run_id)
    print(f"paused {args.run_id}: workers set its batches aside as they reach them; "
          f"`sdbatch unpause {args.run_id}` enqueues them again")
    return EXIT_OK


def cmd_unpause(args, settings: Settings) -> int:
    from worker import client

    print(f"unpaused {args.run_id}: re-enqueued {client.unpause(settings, args.run_id)} set-aside batches")
    return EXIT_OK


def cmd_gallery(args, settings: Settings) -> int:
    from worker import client

    def warn(text: str) -> None:
        print(f"sdbatch: warning: {text}", file=sys.stderr)

    print(client.gallery(settings, args.run_id, warn))
    return EXIT_OK


COMMANDS = {"run": cmd_run, "enqueue": cmd_enqueue, "worker": cmd_worker, "status": cmd_status,
            "failed": cmd_failed, "retry": cmd_retry, "resume": cmd_resume, "cancel": cmd_cancel,
            "pause": cmd_pause, "unpause": cmd_unpause, "gallery": cmd_gallery}

if __name__ == "__main__":
    sys.exit(main())
