"""Run counters in Redis, for `sdbatch status`.

Completion is idempotent: a finished job is a member of the run's `done` set (SADD), so a micro-batch that
reruns after its worker was killed counts each job once and status never passes 100%. A failure is a field of
the `failed` hash (job id -> reason), removed when the job later succeeds.

    sdbatch:run:{run_id}:info    hash: total, created, started (first task start), last_done (time)
    sdbatch:run:{run_id}:done    set of job ids
    sdbatch:run:{run_id}:failed  hash job id -> reason

Every write refreshes a TTL of RUN_TTL_S (30 days) on the run's keys, so the counters of a finished or
abandoned run leave Redis by themselves a month after its last activity; its images and run record stay in
storage, and `sdbatch resume` rebuilds the counters from them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, AuthorizationError
from redis.retry import Retry

RUN_TTL_S = 30 * 24 * 3600

# Record a failure only for a job not already done: a late duplicate of a finished job must not undo it.
_FAIL_UNLESS_DONE = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 then
    redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
for _, key in ipairs(KEYS) do
    redis.call('EXPIRE', key, ARGV[3])
end
"""


class RetryUnlessRefused(Retry):
    """redis-py's retry, except for a refused password or user (AuthenticationError and AuthorizationError
    are ConnectionErrors to redis-py): retrying those only delays the message by ~40 s."""

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        def retryable(error: Exception) -> bool:
            refused = isinstance(error, AuthenticationError | AuthorizationError)
            return not refused and (is_retryable is None or is_retryable(error))

        return super().call_with_retry(do, fail, retryable, with_failure_count)


def connect(url: str) -> redis.Redis:
    """A client that rides out a broker restart of ~40 s (12 retries, backoff 0.2 s doubling up to 4 s; AOF
    keeps the counters); a wrong password fails at once."""
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=15,
                                retry=RetryUnlessRefused(ExponentialBackoff(cap=4, base=0.2), retries=12),
                                retry_on_error=[redis.ConnectionError, redis.TimeoutError,
                                                redis.BusyLoadingError])


@dataclass(frozen=True)
class Status:
    total: int
    done: int
    failed: int
    created: float | None
    started: float | None
    last_done: float | None

    @property
    def pending(self) -> int:
        return max(self.total - self.done - self.failed, 0)

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
        self.keys = (self.info_key, self.done_key, self.failed_key)
        self._fail = client.register_script(_FAIL_UNLESS_DONE)

    def _refresh(self, pipe) -> None:
        for key in self.keys:
            pipe.expire(key, RUN_TTL_S)

    def exists(self) -> bool:
        return bool(self.client.exists(self.info_key))

    def begin(self, total: int, done: list[str] = (), pending: list[str] = ()) -> None:
        """A run's totals, at enqueue; at resume also the jobs found complete in storage (done) and the
        ones about to be enqueued again (pending: neither done nor failed)."""
        pipe = self.client.pipeline()
        pipe.hset(self.info_key, mapping={"total": total})
        pipe.hsetnx(self.info_key, "created", time.time())
        if done:
            pipe.sadd(self.done_key, *done)
            pipe.hdel(self.failed_key, *done)
        if pending:
            pipe.srem(self.done_key, *pending)
            pipe.hdel(self.failed_key, *pending)
        self._refresh(pipe)
        pipe.execute()

    def started(self) -> None:
        pipe = self.client.pipeline()
        pipe.hsetnx(self.info_key, "started", time.time())
        self._refresh(pipe)
        pipe.execute()

    def done(self, job_id: str) -> None:
        pipe = self.client.pipeline()
        pipe.sadd(self.done_key, job_id)
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
            self._refresh(pipe)
            pipe.execute()

    def failures(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in sorted(self.client.hgetall(self.failed_key).items())}

    def done_ids(self) -> set[str]:
        return {member.decode() for member in self.client.smembers(self.done_key)}

    def status(self) -> Status:
        pipe = self.client.pipeline()
        pipe.hgetall(self.info_key)
        pipe.scard(self.done_key)
        pipe.hlen(self.failed_key)
        info, done, failed = pipe.execute()
        info = {k.decode(): float(v) for k, v in info.items()}
        return Status(total=int(info.get("total", 0)), done=done, failed=failed, created=info.get("created"),
                      started=info.get("started"), last_done=info.get("last_done"))
