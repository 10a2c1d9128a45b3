"""Prometheus metrics of a fleet, read from the broker at scrape time.

Flower shows workers and tasks but no queue lengths, and an autoscaler needs them, so a
small HTTP endpoint (``/metrics``) exposes what only Redis knows:

- ``actionfleet_queue_depth{queue,primitive}``: messages waiting, summed over kombu's
  per-priority lists (``queue``, ``queue\\x06\\x169`` ...).
- ``actionfleet_actions_in_flight{queue,primitive}``: delivered but not yet acknowledged
  (kombu's ``unacked`` hash). Workers ack late, so this is the work being executed or
  prefetched. A scaler that reads only the list length (KEDA's redis-lists trigger) sees 0
  while every worker is busy and scales a saturated pool to its minimum.
- ``actionfleet_queue_backlog{queue,primitive}``: depth + in flight: what to scale on.
- ``actionfleet_rate_limit_deferrals_total{primitive}``: actions put back because of a rate
  limit. The rate limiter records them with :func:`record_rate_limit_deferral` (a Redis
  hash, so every worker process adds to one number).
- ``actionfleet_dead_letters``: actions whose retries ran out (``workers.guarantees.deadletter``'s
  index), waiting for an operator's ``actionfleet dead replay|purge``.
- ``actionfleet_audit_stream_length`` / ``actionfleet_audit_stream_lag`` /
  ``actionfleet_audit_dead_letters``: the audit pipeline's backlog and rejects.
- ``actionfleet_broker_up``: 1 when Redis answered this scrape.

Everything is read per scrape (a handful of O(1) Redis calls plus one HSCAN of the unacked
hash, which holds at most workers x prefetch entries), so the numbers are never stale and
the exporter holds no state: run one per fleet, anywhere that reaches Redis.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from audit.config import DEAD_STREAM, GROUP
from producer.models import PRIMITIVES, queue_for
from producer.transport import REDIS_PRIORITY_SEP, redis_queue_keys
from workers.guarantees.deadletter import INDEX as DEAD_LETTER_INDEX

__all__ = [
    "RATE_LIMIT_DEFERRALS_KEY",
    "UNACKED_KEY",
    "FleetCollector",
    "MetricsServer",
    "record_rate_limit_deferral",
    "start_metrics_server",
]

log = logging.getLogger(__name__)

# kombu's Redis transport keeps delivered-but-unacked messages in this hash
# (delivery tag -> JSON [message, exchange, routing_key]).
UNACKED_KEY = "unacked"
# The counter hook for rate limiting: HINCRBY <key> <primitive> 1 per deferral.
RATE_LIMIT_DEFERRALS_KEY = "actionfleet:metrics:rate_limit_deferrals"
REDIS_TIMEOUT_S = 2.0


def record_rate_limit_deferral(client: redis.Redis, primitive: str, n: int = 1) -> None:
    """Count an action deferred by a rate limit (called by the rate limiter)."""
    client.hincrby(RATE_LIMIT_DEFERRALS_KEY, primitive, n)


def _unacked_per_queue(client: redis.Redis, queues: set[str]) -> dict[str, int]:
    counts = dict.fromkeys(queues, 0)
    for _tag, raw in client.hscan_iter(UNACKED_KEY, count=500):
        try:
            routing_key = json.loads(raw)[2]
        except (ValueError, IndexError, TypeError):
            continue  # not kombu's shape: not ours to count
        # With priorities the routing key is still the bare queue name.
        base = str(routing_key).split(REDIS_PRIORITY_SEP)[0]
        if base in counts:
            counts[base] += 1
    return counts


class FleetCollector(Collector):
    """Reads the broker on every ``collect()`` (i.e. every scrape)."""

    def __init__(
        self,
        broker_url: str,
        *,
        primitives: list[str] | None = None,
        audit_stream: str = "actionfleet:audit",
        dead_stream: str = DEAD_STREAM,
        group: str = GROUP,
    ) -> None:
        self.broker_url = broker_url
        self.primitives = list(primitives or PRIMITIVES)
        self.audit_stream, self.dead_stream, self.group = audit_stream, dead_stream, group
        self._client = redis.Redis.from_url(
            broker_url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S
        )

    def close(self) -> None:
        self._client.close()

    def snapshot(self) -> dict[str, Any]:
        """The raw numbers (also what ``actionfleet metrics show`` prints)."""
        c = self._client
        queues = {p: queue_for(p) for p in self.primitives}
        with c.pipeline(transaction=False) as pipe:
            for q in queues.values():
                for key in redis_queue_keys(q):
                    pipe.llen(key)
            pipe.xlen(self.audit_stream)
            pipe.xlen(self.dead_stream)
            pipe.hgetall(RATE_LIMIT_DEFERRALS_KEY)
            pipe.zcard(DEAD_LETTER_INDEX)
            replies = pipe.execute()
        steps = len(redis_queue_keys("x"))
        depth = {
            q: sum(replies[i * steps : (i + 1) * steps]) for i, q in enumerate(queues.values())
        }
        audit_len, dead_len, deferrals, dead_actions = replies[len(queues) * steps :]
        return {
            "depth": depth,
            "in_flight": _unacked_per_queue(c, set(queues.values())),
            "audit_stream_length": int(audit_len),
            "audit_stream_lag": self._audit_lag(),
            "audit_dead_letters": int(dead_len),
            "rate_limit_deferrals": {k.decode(): int(v) for k, v in deferrals.items()},
            "dead_letters": int(dead_actions),
        }

    def _audit_lag(self) -> int | None:
        """Entries the ingesters have not read yet (Redis 7 ``XINFO GROUPS`` lag)."""
        try:
            groups = self._client.xinfo_groups(self.audit_stream)
        except redis.ResponseError:
            return None  # no stream yet: nothing was ever emitted
        for g in groups:
            name = g.get("name")
            if (name.decode() if isinstance(name, bytes) else name) == self.group:
                lag = g.get("lag")
                return int(lag) if lag is not None else None
        return None

    def collect(self) -> Iterator[Any]:
        up = GaugeMetricFamily("actionfleet_broker_up", "1 if Redis answered this scrape")
        try:
            snap = self.snapshot()
        except redis.RedisError as exc:
            log.warning("metrics: broker does not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        labels = ["queue", "primitive"]
        depth = GaugeMetricFamily(
            "actionfleet_queue_depth", "Actions waiting in the queue", labels=labels
        )
        flight = GaugeMetricFamily(
            "actionfleet_actions_in_flight",
            "Actions delivered to a worker and not yet acknowledged",
            labels=labels,
        )
        backlog = GaugeMetricFamily(
            "actionfleet_queue_backlog",
            "Waiting plus in-flight actions: the number to scale workers on",
            labels=labels,
        )
        deferrals = CounterMetricFamily(
            "actionfleet_rate_limit_deferrals",
            "Actions deferred by a rate limit",
            labels=["primitive"],
        )
        for p in self.primitives:
            q = queue_for(p)
            d, f = snap["depth"][q], snap["in_flight"][q]
            depth.add_metric([q, p], d)
            flight.add_metric([q, p], f)
            backlog.add_metric([q, p], d + f)
            deferrals.add_metric([p], snap["rate_limit_deferrals"].get(p, 0))
        yield from (depth, flight, backlog, deferrals)
        yield GaugeMetricFamily(
            "actionfleet_dead_letters",
            "Actions whose retries ran out, kept for `actionfleet dead replay|purge`",
            value=snap["dead_letters"],
        )
        yield GaugeMetricFamily(
            "actionfleet_audit_stream_length",
            "Audit events in the Redis stream (read or not)",
            value=snap["audit_stream_length"],
        )
        if snap["audit_stream_lag"] is not None:
            yield GaugeMetricFamily(
                "actionfleet_audit_stream_lag",
                "Audit events no ingester has read yet",
                value=snap["audit_stream_lag"],
            )
        yield GaugeMetricFamily(
            "actionfleet_audit_dead_letters",
            "Audit entries the ingester rejected (dead-letter stream length)",
            value=snap["audit_dead_letters"],
        )


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint (a daemon thread of this process)."""

    host: str
    port: int
    collector: FleetCollector
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        self.collector.close()


def start_metrics_server(
    broker_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    audit_stream: str = "actionfleet:audit",
    primitives: list[str] | None = None,
) -> MetricsServer:
    """Serve ``/metrics`` on ``host:port`` (0: a free port) from a daemon thread."""
    from prometheus_client import start_http_server

    collector = FleetCollector(broker_url, primitives=primitives, audit_stream=audit_stream)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_address[1])
    return MetricsServer(host, bound, collector, server, thread)
