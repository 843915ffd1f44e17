"""After the broker changed under the fleet (a Sentinel failover, a restart): every pending job that no
message holds any more is made whole again, without a person. Torch-free.

What such a change can lose, which no retry of ours would find: kombu takes a message off its queue with
BRPOP and records it as unacked with a second command. A primary killed after its BRPOP but before its reply
reached the worker has handed the pop to its replica (replication is asynchronous, so it may as well not
have), and the promoted replica then holds the message nowhere: not queued, not unacked, never run (seen in
tests/test_failover.py). The same asynchrony can lose a done mark of a batch whose unacked entry was lost
too: its image is stored, its job pending for ever.

A reconcile, run by one worker (the `sdbatch.reconcile` task, which worker.app's consumer step sends once per
change, `request`) reads:
1. every message Redis holds for a generate task: waiting in the fleet's queues (every priority), delivered
   and not acked (kombu's unacked hash), held for a paused run; in that order, so that a message moving on
   while the reconcile reads (a worker takes it, then holds it) is seen at least once;
2. for each run that was sent whole (its enqueue or resume got to its end: `RunProgress.mark_sent`) and is not
   finished: the pending jobs (neither done, failed nor cancelled) that none of those messages holds;
3. of those, one whose image and metadata are in storage is recorded done with the SHA-256 its metadata
   records; the others are enqueued again, at the run's priority.
A job that was only in flight as it read (between a worker's BRPOP and its unacked entry, or in the hands of
a worker whose unacked entry was lost) is enqueued again too: its batch runs twice, which a batch allows
(same bytes, counted once).
"""

from __future__ import annotations

import base64
import json
import logging
import time

from worker.client import load_run, send
from worker.finish import finish_if_done
from worker.messages import TASK_NAME, queue_lists
from worker.progress import RunProgress

log = logging.getLogger(__name__)
SERVER_KEY = "sdbatch:broker:server"  # the run id (INFO server) of the Redis server the fleet last saw
REQUEST_KEY = "sdbatch:reconcile:requested:{server}"  # a reconcile sent for this server and not started yet
REQUEST_TTL_S = 600  # a request whose task was lost (a second failover) stops blocking the next one
UNACKED_KEY = "unacked"  # kombu's Redis transport: delivery tag -> [payload, exchange, routing key]
CHUNK = 500

# Record the server a worker connected to; 1 when a reconcile is to be sent: the server is another than the
# one the fleet saw last (a promoted replica holds its primary's key, a restarted server its AOF's), or the
# worker reconnected (ARGV[2]), and no reconcile is waiting for this server already.
_REQUEST = """
local changed = redis.call('GET', KEYS[1]) ~= ARGV[1]
if changed then
    redis.call('SET', KEYS[1], ARGV[1])
end
if (changed or ARGV[2] == '1') and redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then
    return 1
end
return 0
"""


def request(client, reconnected: bool) -> bool:
    """For a worker that has just (re)connected to the broker: whether it should send a reconcile."""
    server = client.info("server")["run_id"]
    keys = [SERVER_KEY, REQUEST_KEY.format(server=server)]
    return bool(client.eval(_REQUEST, len(keys), *keys, server, int(reconnected), REQUEST_TTL_S))


def started(client) -> None:
    """The reconcile task has begun: a later change or reconnection sends another."""
    client.delete(REQUEST_KEY.format(server=client.info("server")["run_id"]))


def _batch_jobs(payload: bytes | str) -> tuple[str, list[str]] | None:
    """(run id, job ids) of a kombu message of the generate task; None for anything else."""
    try:
        envelope = json.loads(payload)
        if envelope.get("headers", {}).get("task") != TASK_NAME:
            return None
        body = envelope["body"]
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        message = json.loads(body)[0][0]
        return message["run_id"], [job["job_id"] for job in message["jobs"]]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None  # not ours to judge: the worker that takes it refuses it


def held_jobs(client, queues: list[str]) -> dict[str, set[str]]:
    """Run id -> the ids of its jobs that some message in Redis holds (steps 1 above)."""
    held: dict[str, set[str]] = {}

    def add(run_id: str, job_ids: list[str]) -> None:
        held.setdefault(run_id, set()).update(job_ids)

    for name in [name for queue in queues for name in queue_lists(queue)]:
        # from the left, where messages are pushed: a worker popping from the right shifts no index, a
        # push shifts them up, so an entry is read again but never skipped
        start = 0
        while entries := client.lrange(name, start, start + CHUNK - 1):
            for entry in entries:
                if (found := _batch_jobs(entry)) is not None:
                    add(*found)
            start += CHUNK
    for _, value in client.hscan_iter(UNACKED_KEY, count=CHUNK):
        try:
            payload = json.dumps(json.loads(value)[0])
        except (ValueError, TypeError, IndexError):
            continue
        if (found := _batch_jobs(payload)) is not None:
            add(*found)
    for key in client.scan_iter(match="sdbatch:run:*:held", count=CHUNK):
        for entry in client.lrange(key, 0, -1):
            try:
                message = json.loads(entry)
                add(message["run_id"], [job["job_id"] for job in message["jobs"]])
            except (ValueError, TypeError, KeyError):
                continue
    return held


def unfinished_runs(client) -> list[str]:
    """The runs sent whole whose counters show pending jobs."""
    runs = []
    for key in client.scan_iter(match="sdbatch:run:*:info", count=CHUNK):
        run_id = key.decode()[len("sdbatch:run:"):-len(":info")]
        counters = RunProgress(client, run_id)
        if counters.is_sent() and counters.status().pending:
            runs.append(run_id)
    return sorted(runs)


def reconcile(app, settings, client, store) -> dict[str, tuple[int, int]]:
    """Steps 1-3 above on every run of `client`'s Redis whose record is in `store`, for the jobs of the
    models that `settings` routes (config models:, whose queues it reads); returns run id -> (jobs found done
    in storage, jobs enqueued again), for the runs that had any."""
    start = time.perf_counter()
    queues = sorted({settings.broker.queue} | {route.queue for route in settings.models.values()})
    runs = unfinished_runs(client)
    held = held_jobs(client, queues) if runs else {}
    outcome = {}
    for run_id in runs:
        counters = RunProgress(client, run_id)
        status = counters.status()
        in_messages = held.get(run_id, set())
        if len(in_messages) >= status.pending and not _ended(counters, in_messages):
            continue  # every pending job may be in a message: nothing to read from storage
        try:
            header, jobs = load_run(settings, run_id)
        except (ValueError, KeyError) as error:  # another store's run, or a record gone
            log.warning("reconcile: run %s skipped: %s", run_id, error)
            continue
        ended = counters.done_ids() | set(counters.failures()) | counters.cancelled_ids()
        # a job of a model this worker's config does not route lives in a queue it did not read
        lost = [job for job in jobs if job.job_id not in ended and job.job_id not in in_messages
                and (job.model is None or job.model in settings.models)]
        if not lost:
            continue
        stored, again = [], []
        for job in lost:
            sha256 = stored_image(store, run_id, job.job_id)
            if sha256 is None:
                again.append(job)
            else:
                counters.done(job.job_id, sha256)
                stored.append(job)
        if again:
            send(settings, run_id, again, header.get("priority", "normal"))
        finish_if_done(app, settings, counters)
        log.warning("reconcile: run %s had %d pending jobs that no message held: %d found stored (done), %d "
                    "enqueued again", run_id, len(lost), len(stored), len(again))
        outcome[run_id] = (len(stored), len(again))
    log.info("reconcile: %d unfinished runs checked in %.1f s", len(runs), time.perf_counter() - start)
    return outcome


def _ended(counters: RunProgress, job_ids: set[str]) -> bool:
    """Whether any of these jobs is done, failed or cancelled already (a message that runs twice): then
    they do not all count as pending ones held."""
    ids = sorted(job_ids)
    for offset in range(0, len(ids), CHUNK):
        chunk = ids[offset:offset + CHUNK]
        pipe = counters.client.pipeline(transaction=False)
        pipe.smismember(counters.done_key, chunk)
        pipe.hmget(counters.failed_key, chunk)
        pipe.smismember(counters.cancelled_key, chunk)
        done, failed, cancelled = pipe.execute()
        if any(done) or any(reason is not None for reason in failed) or any(cancelled):
            return True
    return False


def stored_image(store, run_id: str, job_id: str) -> str | None:
    """The SHA-256 of a job's stored PNG, from its metadata, when both are stored whole; else None."""
    try:
        meta = json.loads(store.get(f"{run_id}/meta/{job_id}.json"))
    except (KeyError, ValueError):
        return None
    sha256 = meta.get("image_sha256") if isinstance(meta, dict) else None
    if not isinstance(sha256, str) or not store.exists(f"{run_id}/images/{job_id}.png"):
        return None
    return sha256
