"""What happens once when a run finishes (every job done, failed or cancelled): its results manifest in
storage, an event on a Redis stream, and the run's `--notify` hook. Torch- and Celery-free.

    results.jsonl   one line per job of run.jsonl, in input order: job_id, line, image, seed, status (done |
                    failed | cancelled), image_key, image_sha256 and meta_key (the job's settings) when
                    done, reason when failed; rewritten at every finish, so after `retry` it is whole again
    sdbatch:events  a Redis stream (XADD, capped at EVENTS_MAXLEN) of {"event": "run.finished", "summary"}
    hook            POST of the summary as JSON, signed: header X-Sdbatch-Signature = "sha256=" + the hex
                    HMAC-SHA256 of the body with $SDBATCH_HOOK_SECRET (the worker's environment)

Exactly once per finish: the worker that records a run's last job claims the finish in Redis (a Lua script,
so of workers racing on the last jobs one wins; worker.progress.RunProgress.claim_finish) and sends the
finish task, which writes the manifest and marks each of the stream event and the hook done under the
finish's number. A retried finish task (a receiver that was down, a worker that died) skips what is marked;
the summary's `event_id` (run id and finish number) lets a receiver drop the one duplicate that a worker
killed between the receiver's 2xx and the mark would send.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import urllib.request

from worker.jobs import read_run_record
from worker.messages import FINISH_TASK_NAME, PRIORITIES

EVENTS_STREAM = "sdbatch:events"
EVENTS_MAXLEN = 10_000
HOOK_TIMEOUT_S = 10
HOOK_SECRET_ENV = "SDBATCH_HOOK_SECRET"
SIGNATURE_HEADER = "X-Sdbatch-Signature"


def conclude(store, counters, client, run_id: str, finish: int) -> tuple[dict, str | None]:
    """Finish number `finish` of a run: write the manifest, add the stream event (unless this finish's is
    marked). Returns the summary and the run's hook URL (None without one), which the caller POSTs with
    retries (`notify`)."""
    key = f"{run_id}/run.jsonl"
    header, jobs = read_run_record(store.get(key), store.location(key))
    manifest, counts = write_manifest(store, counters, run_id, jobs)
    status = counters.status()
    report = {
        "event": "run.finished", "event_id": f"{run_id}/{finish}", "run_id": run_id, "finish": finish,
        "total": status.total, **{name: counts[name] for name in ("done", "failed", "cancelled")},
        "storage": store.location(run_id), "manifest": manifest,
        "manifest_location": store.location(manifest),
        "elapsed_s": round(status.finished_at - status.created, 3) if status.created else None,
    }
    if not counters.finish_step_done(finish, "event"):
        client.xadd(EVENTS_STREAM, {"summary": json.dumps(report, sort_keys=True)}, maxlen=EVENTS_MAXLEN,
                    approximate=True)
        counters.mark_finish_step(finish, "event")
    return report, header.get("notify")


def write_manifest(store, counters, run_id: str, jobs) -> tuple[str, dict[str, int]]:
    """Write {run_id}/results.jsonl for the jobs of run.jsonl; returns its key and the count per status."""
    done, failures, cancelled = counters.done_ids(), counters.failures(), counters.cancelled_ids()
    hashes = counters.image_hashes()
    lines, counts = [], {"done": 0, "failed": 0, "cancelled": 0, "pending": 0}
    for job in jobs:
        entry = {"job_id": job.job_id, "line": job.line, "image": job.image, "seed": job.request.seed}
        if job.job_id in done:
            image_key = f"{run_id}/images/{job.job_id}.png"
            meta_key = f"{run_id}/meta/{job.job_id}.json"
            # recorded when the image was stored; a run resumed after Redis lost it reads the metadata
            sha = hashes.get(job.job_id) or json.loads(store.get(meta_key))["image_sha256"]
            entry.update(status="done", image_key=image_key, image_sha256=sha, meta_key=meta_key)
        elif job.job_id in failures:
            entry.update(status="failed", reason=failures[job.job_id])
        elif job.job_id in cancelled:
            entry.update(status="cancelled")
        else:
            entry.update(status="pending")  # not finished after all: a resume made it pending again
        counts[entry["status"]] += 1
        lines.append(json.dumps(entry, sort_keys=True, ensure_ascii=False))
    manifest = f"{run_id}/results.jsonl"
    store.put(manifest, ("\n".join(lines) + "\n").encode(), "application/x-ndjson")
    return manifest, counts


def finish_if_done(app, settings, counters) -> int:
    """After jobs of the run were recorded: when they were its last, claim the finish and send the finish
    task (ahead of every batch: high priority). Returns the finish's number, or 0."""
    finish = counters.claim_finish()
    if finish:
        app.send_task(FINISH_TASK_NAME, args=[counters.run_id, finish], queue=settings.broker.queue,
                      priority=PRIORITIES["high"])
    return finish


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def notify(url: str, report: dict, environ=os.environ) -> None:
    """POST the summary; raises OSError (urllib's URLError, HTTPError for a non-2xx answer) to be retried."""
    body = json.dumps(report, sort_keys=True).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "sdbatch"})
    secret = environ.get(HOOK_SECRET_ENV)
    if secret:
        request.add_header(SIGNATURE_HEADER, sign(body, secret))
    with urllib.request.urlopen(request, timeout=HOOK_TIMEOUT_S):
        pass  # urlopen raises HTTPError for any status >= 400
