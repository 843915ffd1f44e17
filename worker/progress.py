"""Run counters in Redis, for `sdbatch status`.

Completion is idempotent: a finished job is a member of the run's `done` set (SADD), so a micro-batch that
reruns after its worker was killed counts each job once and status never passes 100%. A failure is a field of
the `failed` hash (job id -> reason), removed when the job later succeeds.

    sdbatch:run:{run_id}:info       hash: total, created, started (first task start), last_done (time),
                                    state (absent while the run is active; "paused" or "cancelled"),
                                    finished ("1" from the claim of a finish until jobs are pending again),
                                    finishes (how many times it finished), finished_at, and
                                    finish:{n}:{step} marks of worker.finish's steps done, sent (time
                                    the enqueue or resume that began the run sent its last message)
    sdbatch:run:{run_id}:done       set of job ids
    sdbatch:run:{run_id}:images     hash job id -> SHA-256 of its PNG, for the results manifest
    sdbatch:run:{run_id}:failed     hash job id -> reason
    sdbatch:run:{run_id}:cancelled  set of job ids a worker dropped, unrun, because the run was cancelled
    sdbatch:run:{run_id}:held       list of the messages of a paused run that workers set aside

Cancel and pause act where a worker takes a batch (worker.batch.process): a cancelled run's batch is
recorded as cancelled without running the model, a paused run's message is moved to `held` (the queue moves
on to other runs' batches) and `unpause` sends the held messages again. Both checks are Lua scripts, so a
message is either held before `unpause` takes the list or runs after it, never stranded in between.

Every write refreshes a TTL of RUN_TTL_S (30 days) on the run's keys, so the counters of a finished or
abandoned run leave Redis by themselves a month after its last activity; its images and run record stay in
storage, and `sdbatch resume` rebuilds the counters from them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.retry import Retry
from redis.sentinel import Sentinel

from worker.config import parse_sentinel_url

RUN_TTL_S = 30 * 24 * 3600
REPLICA_WAIT_MS = 2000  # how long `replicate` waits for a replica (a lagging one): then it goes on without

# Record a failure only for a job not already done: a late duplicate of a finished job must not undo it.
_FAIL_UNLESS_DONE = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
for _, key in ipairs(KEYS) do
    redis.call('EXPIRE', key, ARGV[3])
end
"""

# Set a paused run's message aside: 1 when held, 0 when the run is no longer paused (the worker runs it).
_HOLD_IF_PAUSED = """
if redis.call('HGET', KEYS[1], 'state') ~= 'paused' then
    return 0
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""

# Leave the paused state and take the held messages, in one step (a hold after it finds the run active).
_UNPAUSE = """
if redis.call('HGET', KEYS[1], 'state') == 'paused' then
    redis.call('HDEL', KEYS[1], 'state')
end
local held = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
return held
"""

# Cancel the jobs not done already (a job done before the cancel stays done).
_CANCEL_UNLESS_DONE = """
for i = 1, #ARGV - 1 do
    if redis.call('SISMEMBER', KEYS[1], ARGV[i]) == 0 then
        redis.call('SADD', KEYS[2], ARGV[i])
        redis.call('HDEL', KEYS[3], ARGV[i])
    end
end
for _, key in ipairs(KEYS) do
    redis.call('EXPIRE', key, ARGV[#ARGV])
end
"""
STATES = ("active", "paused", "cancelled")

# The finish of a run, claimed once: by the first caller that sees every job done, failed or cancelled.
# Returns the finish's number (1, then 2 after a retry made jobs pending and they ended again), or 0.
_CLAIM_FINISH = """
local total = tonumber(redis.call('HGET', KEYS[1], 'total') or '0')
if total == 0 or redis.call('HGET', KEYS[1], 'finished') == '1' then
    return 0
end
if redis.call('SCARD', KEYS[2]) + redis.call('HLEN', KEYS[3]) + redis.call('SCARD', KEYS[4]) < total then
    return 0
end
redis.call('HSET', KEYS[1], 'finished', '1', 'finished_at', ARGV[1])
return redis.call('HINCRBY', KEYS[1], 'finishes', 1)
"""


class RetryUnlessRefused(Retry):
    """redis-py's retry, except for a refused password or user (AuthenticationError and AuthorizationError
    are ConnectionErrors to redis-py): retrying those only delays the message by ~40 s."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def retryable(error: Exception) -> bool:
            refused = isinstance(error, AuthenticationError | AuthorizationError)
            return not refused and (is_retryable is None or is_retryable(error))

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def connect(url: str, master_name: str | None = None) -> redis.Redis:
    """A client that rides out a broker restart or a Sentinel failover of ~40 s (12 retries, backoff 0.2 s
    doubling up to 4 s; AOF keeps the counters); a wrong password fails at once. With a sentinel:// URL
    (config.parse_sentinel_url) it is a client of the primary the Sentinels name as `master_name`, the one
    kombu's Sentinel transport uses, and it asks them again at each reconnection."""
    options = {"socket_connect_timeout": 5, "socket_timeout": 30, "health_check_interval": 15,
               "retry": RetryUnlessRefused(ExponentialBackoff(cap=4, base=0.2), retries=12),
               "retry_on_error": [redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError]}
    if urlsplit(url).scheme != "sentinel":
        return redis.Redis.from_url(url, **options)
    if master_name is None:
        raise ValueError("a sentinel:// broker URL needs broker.master_name; accepted: the name the "
                         "Sentinels monitor the primary under")
    sentinel = parse_sentinel_url(url)
    sentinels = Sentinel(sentinel.nodes, sentinel_kwargs={"socket_connect_timeout": 5, "socket_timeout": 5},
                         username=sentinel.username, password=sentinel.password, db=sentinel.db, **options)
    return sentinels.master_for(master_name)


@dataclass(frozen=True)
class Status:
    total: int
    done: int
    failed: int
    created: float | None = None
    started: float | None = None
    last_done: float | None = None
    cancelled: int = 0
    state: str = "active"  # one of STATES
    finished_at: float | None = None  # when the last finish was claimed

    @property
    def pending(self) -> int:
        return max(self.total - self.done - self.failed - self.cancelled, 0)

    @property
    def finished(self) -> bool:
        return self.total > 0 and self.pending == 0

    def images_per_second(self) -> float | None:
        if self.started is None or self.last_done is None or self.last_done <= self.started:
            return None
        return self.done / (self.last_done - self.started)

    def eta_seconds(self) -> float | None:
        rate = self.images_per_second()
        return self.pending / rate if rate else None


class RunProgress:
    def __init__(self, client: redis.Redis, run_id: str):
        self.client, self.run_id = client, run_id
        prefix = f"sdbatch:run:{run_id}"
        self.info_key, self.done_key, self.failed_key = f"{prefix}:info", f"{prefix}:done", f"{prefix}:failed"
        self.cancelled_key, self.held_key = f"{prefix}:cancelled", f"{prefix}:held"
        self.images_key = f"{prefix}:images"
        self.keys = (self.info_key, self.done_key, self.failed_key, self.cancelled_key, self.images_key)
        self._fail = client.register_script(_FAIL_UNLESS_DONE)
        self._hold = client.register_script(_HOLD_IF_PAUSED)
        self._unpause = client.register_script(_UNPAUSE)
        self._cancel = client.register_script(_CANCEL_UNLESS_DONE)
        self._claim_finish = client.register_script(_CLAIM_FINISH)

    def _refresh(self, pipe) -> None:
        for key in self.keys:
            pipe.expire(key, RUN_TTL_S)

    def exists(self) -> bool:
        return bool(self.client.exists(self.info_key))

    def begin(self, total: int, done: list[str] = (), pending: list[str] = ()) -> None:
        """A run's totals, at enqueue; at resume also the jobs found complete in storage (done) and the
        ones about to be enqueued again (pending: neither done, failed nor cancelled; a cancelled run is
        active again)."""
        cancelled = self.state() == "cancelled"
        pipe = self.client.pipeline()
        pipe.hset(self.info_key, mapping={"total": total})
        pipe.hsetnx(self.info_key, "created", time.time())
        pipe.hdel(self.info_key, "finished", "sent")
        if cancelled:
            pipe.hdel(self.info_key, "state")
        if done:
            pipe.sadd(self.done_key, *done)
        if pending:
            pipe.srem(self.done_key, *pending)
        for ids in (done, pending):
            if ids:
                pipe.hdel(self.failed_key, *ids)
                pipe.srem(self.cancelled_key, *ids)
        self._refresh(pipe)
        pipe.execute()

    def mark_sent(self) -> None:
        """Every message of the enqueue (or resume) that `begin` began is sent: from now on a pending job that
        no message holds was lost (worker.reconcile), not yet to be sent."""
        self.client.hset(self.info_key, "sent", time.time())

    def is_sent(self) -> bool:
        return bool(self.client.hexists(self.info_key, "sent"))

    def server_id(self) -> str:
        """The run id of the Redis server that answers: another one after a failover or a restart, which may
        have lost the last writes before it (replication and AOF fsync are asynchronous)."""
        return self.client.info("server")["run_id"]

    def replicate(self) -> str:
        """Wait until a replica holds every write that the primary took so far, from any client (the
        messages kombu sent included: WAIT waits for this connection's last write, the TTL refresh, which
        comes after them), if it has replicas; then returns `server_id`. A caller who compares it with the one
        read before its writes knows whether they are all on this server (and its replica) or whether a
        failover came in between and some may be lost. The write, the wait and the read are one pipeline: on a
        connection error redis-py sends it all again, to whichever server answers then."""
        replicas = self.client.info("replication")["connected_slaves"]
        pipe = self.client.pipeline(transaction=False)
        self._refresh(pipe)
        if replicas:
            pipe.wait(1, REPLICA_WAIT_MS)
        pipe.info("server")
        return pipe.execute()[-1]["run_id"]

    def started(self) -> None:
        pipe = self.client.pipeline()
        pipe.hsetnx(self.info_key, "started", time.time())
        self._refresh(pipe)
        pipe.execute()

    def done(self, job_id: str, image_sha256: str | None = None) -> None:
        pipe = self.client.pipeline()
        pipe.sadd(self.done_key, job_id)
        if image_sha256:
            pipe.hset(self.images_key, job_id, image_sha256)
        pipe.hdel(self.failed_key, job_id)
        pipe.hset(self.info_key, "last_done", time.time())
        self._refresh(pipe)
        pipe.execute()

    def failed(self, job_id: str, reason: str) -> None:
        self._fail(keys=[self.done_key, self.failed_key, self.info_key],
                   args=[job_id, reason[:2000], RUN_TTL_S])

    def forget_failures(self, job_ids: list[str]) -> None:
        """Before re-enqueueing failed jobs: they are pending again."""
        if job_ids:
            pipe = self.client.pipeline()
            pipe.hdel(self.failed_key, *job_ids)
            pipe.hdel(self.info_key, "finished")
            self._refresh(pipe)
            pipe.execute()

    def state(self) -> str:
        state = self.client.hget(self.info_key, "state")
        return state.decode() if state else "active"

    def pause(self) -> None:
        """Workers set the run's batches aside from now on (`hold`); a cancelled run stays cancelled."""
        if self.state() != "cancelled":
            self.client.hset(self.info_key, "state", "paused")

    def hold(self, message: str) -> bool:
        """Keep a batch's message (JSON) for `unpause` if the run is paused; False: run it."""
        return bool(self._hold(keys=[self.info_key, self.held_key], args=[message, RUN_TTL_S]))

    def unpause(self) -> list[str]:
        """The run is active again; returns the held messages, which the caller sends again."""
        return [message.decode() for message in self._unpause(keys=[self.info_key, self.held_key])]

    def cancel(self) -> list[str]:
        """Workers drop the run's batches from now on; returns the held messages (a paused run's), whose
        jobs the caller records as cancelled."""
        held = self.unpause()
        self.client.hset(self.info_key, "state", "cancelled")
        return held

    def cancelled(self, job_ids: list[str]) -> None:
        if job_ids:
            self._cancel(keys=[self.done_key, self.cancelled_key, self.failed_key],
                         args=[*job_ids, RUN_TTL_S])

    def cancelled_ids(self) -> set[str]:
        return {member.decode() for member in self.client.smembers(self.cancelled_key)}

    def image_hashes(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.client.hgetall(self.images_key).items()}

    def claim_finish(self) -> int:
        """The number of the finish this caller claimed (worker.finish then runs once for it), or 0: the
        run is not finished, or another caller claimed this finish."""
        keys = [self.info_key, self.done_key, self.failed_key, self.cancelled_key]
        return int(self._claim_finish(keys=keys, args=[time.time()]))

    def finish_step_done(self, finish: int, step: str) -> bool:
        return bool(self.client.hexists(self.info_key, f"finish:{finish}:{step}"))

    def mark_finish_step(self, finish: int, step: str) -> None:
        self.client.hset(self.info_key, f"finish:{finish}:{step}", time.time())

    def failures(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in sorted(self.client.hgetall(self.failed_key).items())}

    def done_ids(self) -> set[str]:
        return {member.decode() for member in self.client.smembers(self.done_key)}

    def status(self) -> Status:
        pipe = self.client.pipeline()
        pipe.hgetall(self.info_key)
        pipe.scard(self.done_key)
        pipe.hlen(self.failed_key)
        pipe.scard(self.cancelled_key)
        info, done, failed, cancelled = pipe.execute()
        info = {k.decode(): v.decode() for k, v in info.items()}
        times = {key: float(info[key]) for key in ("created", "started", "last_done", "finished_at")
                 if key in info}
        return Status(total=int(info.get("total", 0)), done=done, failed=failed, cancelled=cancelled,
                      state=info.get("state", "active"), **times)
