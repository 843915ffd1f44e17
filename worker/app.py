"""The Celery app. `celery -A worker.app worker|flower|inspect ...` builds it from the config file named by
$SDBATCH_CONFIG (`sdbatch worker --config CFG` sets it); clients build their own with `make_app(settings)`.

Delivery guarantees (no message is lost to a killed worker, a restarted Redis or a malformed message, and a
message only runs twice where that is harmless) come from these settings and from the transport below:
- json only, both ways (`accept_content`): no pickle on the wire, a pickled message is refused unread;
- `task_acks_late` + `task_reject_on_worker_lost`: a message is acknowledged after its images are stored;
  if the pool process dies mid-batch the message goes straight back to the queue;
- if the whole worker dies, Redis keeps the message in its unacked set and kombu restores it once it is older
  than `visibility_timeout` (= limits.batch_time_limit + 15 s, so never while a live worker still runs it),
  scanning every `unacked_restore_interval` seconds: with the default 40 s limit a lost batch is back in the
  queue within a minute;
- a message that carries no time limits (from another client) gets limits.batch_time_limit as its hard limit;
  a batch that hits it is recorded as failed (worker.tasks.BatchTask), `sdbatch retry` takes it again;
- `worker_prefetch_multiplier=1`: a worker holds one batch, so a killed worker strands at most that one;
- the Redis transport drops (with a log line) a queue entry that is not a message at all, and returns to its
  queue a message that Redis lost track of by dying between handing it out and recording it as unacked
  (`RedisTransport`); with a `sentinel://` URL, the same on the primary the Sentinels name
  (`SentinelTransport`), which it follows through a failover (what one can lose: docs/scaling.md).
"""

from __future__ import annotations

import logging
import os
import ssl
from urllib.parse import quote, urlsplit

from celery import Celery
from kombu.transport import redis as kombu_redis

from worker.config import SentinelURL, Settings, from_env, parse_sentinel_url
from worker.messages import PRIORITIES, soft_limit

log = logging.getLogger(__name__)
RESTORE_INTERVAL_S = 5
VISIBILITY_MARGIN_S = 15


# Messages this process took off a queue but could not record as unacked, as (payload, exchange, routing key).
# Pool processes forked later do not consume, so they start without the parent's.
_unregistered: list[tuple[dict, str, str]] = []
os.register_at_fork(after_in_child=_unregistered.clear)


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS, except that a message whose unacked entry cannot be written is kept, not dropped.

    BRPOP takes the message off the queue; a separate command then records it in the unacked hash, from which
    it would come back if this worker died. If Redis goes down between the two (a restart, a crash, a
    failover), stock kombu raises and the message is in neither place: measured with a Redis SIGKILLed in
    that window, and seen once as a run that never finished. Here it is kept in this process and pushed
    back onto its queue by the next channel that reaches Redis (`RecoveringChannel.__init__`). Should the
    entry have been written after all (the reply lost, not the command), the message also comes back from the
    unacked hash: it runs twice, which a batch allows (same bytes, counted once)."""

    def append(self, message, delivery_tag):
        try:
            super().append(message, delivery_tag)
        except self.channel.connection_errors:
            info = message.delivery_info
            _unregistered.append((message._raw, info["exchange"], info["routing_key"]))
            log.warning("broker lost while taking message %s; it goes back to its queue on reconnection",
                        message.headers.get("id", delivery_tag))
            raise


class Recovering:
    """What our channels add to kombu's Redis channels (plain and Sentinel alike): the QoS above, and two
    more duties:
    - on creation (kombu has just PINGed Redis), it returns the messages QoS.append could not record;
    - a queue entry which is not a kombu message (not JSON, not an envelope) is logged and dropped. Stock
      kombu lets the decode error escape its event loop and the worker stops ("Unrecoverable error"). BRPOP
      has already removed the entry, so dropping it loses nothing usable. Messages that are envelopes but
      carry a bad body or bad task arguments are Celery's and the task's to reject (worker.tasks)."""

    QoS = QoS

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        while _unregistered:
            payload, exchange, routing_key = _unregistered[0]
            with self.conn_or_acquire() as client:
                pipe = client.pipeline()
                # rpush: the end BRPOP takes from, so it runs next, as it was about to
                self._do_restore_message(payload, exchange, routing_key, pipe)
                pipe.execute()
            _unregistered.pop(0)
            log.warning("returned message %s to its queue", payload.get("headers", {}).get("id", "?"))

    def _brpop_read(self, **options):
        try:
            return super()._brpop_read(**options)
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # JSONDecodeError is a ValueError
            log.error("dropped a queue entry that is not a Celery message: %s: %s",
                      type(error).__name__, error)
            return True


class RecoveringChannel(Recovering, kombu_redis.Channel):
    pass


class RecoveringSentinelChannel(Recovering, kombu_redis.SentinelChannel):
    """The same, on the primary that the Sentinels name: after a failover it reconnects to the new one."""


class RedisTransport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above. QoS.append, Channel.__init__ and _brpop_read are
    kombu 5.7's private methods (pinned in pyproject.toml): check them again before allowing another kombu."""

    Channel = RecoveringChannel


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's Sentinel transport (sentinel:// URLs) with the channel above; the same kombu caveat."""

    Channel = RecoveringSentinelChannel


def celery_config(settings: Settings) -> dict:
    limits = settings.limits
    transport = {
        "visibility_timeout": limits.batch_time_limit + VISIBILITY_MARGIN_S,
        # kombu scans for expired unacked messages every interval * throttle seconds (10 * 10 by default)
        "unacked_restore_interval": RESTORE_INTERVAL_S,
        "unacked_restore_throttle": 1,
        # priorities (messages.PRIORITIES) are lists QUEUE, QUEUE:3, QUEUE:6 (kombu's default separator is
        # "\x06\x16", awkward in redis-cli and in KEDA's listName)
        "sep": ":",
        # a publish to a broker that vanished without closing the socket fails instead of hanging
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
    }
    broker_url, transport_class = settings.broker.url, "RedisTransport"  # for redis:// and rediss:// alike
    if urlsplit(broker_url).scheme == "sentinel":
        broker_url, transport_class = kombu_sentinel_url(parse_sentinel_url(broker_url)), "SentinelTransport"
        transport["master_name"] = settings.broker.master_name
    conf = {
        "broker_url": broker_url,
        "broker_transport": f"{__name__}:{transport_class}",
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # ride out a Redis restart however long it takes
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,  # results live in storage and in the progress counters
        "task_time_limit": limits.batch_time_limit,
        "task_soft_time_limit": soft_limit(limits.batch_time_limit),
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": settings.broker.queue,
        "task_default_priority": PRIORITIES["normal"],
        "task_routes": {"sdbatch.*": {"queue": settings.broker.queue}},
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 10, "interval_start": 0.2, "interval_step": 0.5,
                                      "interval_max": 3},
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": True,
        # the pool process loads the model in worker_process_init, which takes longer than the default 4 s
        "worker_proc_alive_timeout": 600,
        "worker_max_memory_per_child": limits.max_memory_per_child_mb * 1024 or None,  # KiB
    }
    if urlsplit(settings.broker.url).scheme == "rediss":
        # our transport means kombu no longer infers TLS from the scheme: ask for it, certificates checked
        conf["broker_use_ssl"] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return conf


def kombu_sentinel_url(sentinel: SentinelURL) -> str:
    """The sentinels as kombu takes them, the credentials and db on every one: kombu reads them from the
    sentinel it is at, and moves on to the next one after a connection error."""
    user = quote(sentinel.username or "", safe="")
    auth = f"{user}:{quote(sentinel.password, safe='')}@" if sentinel.password is not None else ""
    return ";".join(f"sentinel://{auth}{host}:{port}/{sentinel.db}" for host, port in sentinel.nodes)


def make_app(settings: Settings) -> Celery:
    # `include` names the task module only: a worker imports it when it starts, a client never does
    app = Celery("sdbatch", include=["worker.tasks"], set_as_current=False)
    app.conf.update(celery_config(settings))
    app.on_after_finalize.connect(_serve_only_sdbatch_tasks)
    return app


def _serve_only_sdbatch_tasks(sender: Celery, **_) -> None:
    """Unregister Celery's built-in tasks (celery.accumulate, celery.chord_unlock, celery.starmap ...):
    anyone who can write to the queue could otherwise make a GPU worker run them. A message naming one is
    then refused as an unregistered task, like any other name but sdbatch's own."""
    for name in [name for name in sender.tasks if not name.startswith("sdbatch.")]:
        sender.tasks.unregister(name)


def __getattr__(name: str):
    # PEP 562: the module-level `app` is made on first access, so importing this module (for make_app) needs
    # no config, while `celery -A worker.app` finds `app` built from $SDBATCH_CONFIG.
    if name in ("app", "celery"):
        app = make_app(from_env())
        app.set_current()
        globals().update(app=app, celery=app)
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
