"""Prometheus metrics of one wirehub app, in a registry of its own (several apps may share a process).

Served at ``GET /metrics`` in the Prometheus text format; docs/operations.md lists every metric and what to
alert on. Counters are exported with the ``_total`` suffix (``wirehub_messages_in_total``).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from wirehub import __version__
from wirehub.bus import HistoryUsage

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Tally:
    """A count kept as a plain int on the hot path (a frame in or out) and added to its Prometheus
    counter at scrape time: ``Counter.inc`` takes a lock, twice per echoed frame."""

    __slots__ = ("counter", "n")

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.n = 0

    def fold(self) -> None:
        if self.n:
            n, self.n = self.n, 0
            self.counter.inc(n)


class TallyHistogram(Collector):
    """A histogram whose :meth:`observe` is a bisect and two additions on plain numbers (the fan-out observes
    once per bus message; ``Histogram.observe`` takes a lock and updates a value object per bucket), read
    at scrape time. Exported as Prometheus's own histogram would be: ``_bucket`` (cumulative, ``le``),
    ``_count``, ``_sum`` and ``_created`` (unless created series are disabled)."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = tuple(sorted(buckets))
        #: observations per bucket (not cumulative); the last one is ``+Inf``
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # a value equal to a bound belongs to that bound's bucket (``le``): bisect_left
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def collect(self) -> Iterator[Metric]:
        cumulative, buckets = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += n
            buckets.append((_le(bound), cumulative))
        family = HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)
        if prometheus_metrics._use_created:  # PROMETHEUS_DISABLE_CREATED_SERIES, as for the other metrics
            family.add_sample(f"{self.name}_created", {}, self.created)
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation)


def _le(bound: float) -> str:
    """A bucket bound as Prometheus's client writes it (``0.005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))


class Metrics:
    """Every metric wirehub exports; docs/operations.md lists them."""

    def __init__(self, endpoints: Iterable[str] = ()) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.build = Info("wirehub_build", "The running wirehub version", registry=r)
        self.build.info({"version": __version__})
        self.sessions = Gauge("wirehub_sessions", "Open WebSocket sessions", ["endpoint"], registry=r)
        self.sessions_opened = Counter(
            "wirehub_sessions_opened", "WebSocket sessions opened", ["endpoint"], registry=r
        )
        self.sessions_closed = Counter(
            "wirehub_sessions_closed", "WebSocket sessions closed, by close code", ["endpoint", "code"], registry=r
        )
        self.messages_in = Counter("wirehub_messages_in", "Frames received from clients", ["endpoint"], registry=r)
        self.messages_out = Counter("wirehub_messages_out", "Frames sent to clients", registry=r)
        self._tallies: dict[int, Tally] = {}
        #: per endpoint, the tally of its frames in (``labels()`` takes a lock and checks its arguments)
        self._messages_in: dict[str, Tally] = {}
        #: per (endpoint, close code label), its sessions-closed child, for the same reason
        self._closed: dict[tuple[str, str], Counter] = {}
        #: frames sent, counted without a lock (see Tally)
        self.sent = self.tally(self.messages_out)
        self.deliveries = Counter("wirehub_deliveries", "Bus messages written to local members", registry=r)
        self.bus_messages = Counter("wirehub_bus_messages", "Messages received from the bus", registry=r)
        #: the hub's fan-out counts every bus message and its deliveries without a lock (see Tally)
        self.delivered = self.tally(self.deliveries)
        self.bus_received = self.tally(self.bus_messages)
        self.published = Counter("wirehub_published", "Messages published to the bus", ["source"], registry=r)
        #: per source, the tally of ``wirehub_published_total`` (a publish is counted without a lock)
        self._published: dict[str, Tally] = {}
        self.dropped = Counter("wirehub_dropped", "Messages not delivered, by reason", ["reason"], registry=r)
        self.slow_consumers = Counter(
            "wirehub_slow_consumer_closes", "Sessions closed with 4008 (send queue over its cap)", registry=r
        )
        self.errors = Counter("wirehub_errors", "error frames sent, by code", ["code"], registry=r)
        self.auth_failures = Counter("wirehub_auth_failures", "Refused upgrades, by reason", ["reason"], registry=r)
        self.bus_up = Gauge("wirehub_bus_up", "1 while the bus is connected", registry=r)
        self.bus_reconnects = Counter("wirehub_bus_reconnects", "Bus transitions from down to up", registry=r)
        self.rooms = Gauge("wirehub_rooms", "Rooms with local members", registry=r)
        #: observed once per bus message by the fan-out: a lock-free histogram read at scrape time
        self.latency = TallyHistogram(
            "wirehub_publish_to_delivery_seconds",
            "Time from publish (any replica) to fan-out on this replica",
            LATENCY_BUCKETS,
        )
        r.register(self.latency)
        self.plugin_errors = Counter(
            "wirehub_plugin_errors", "Exceptions raised by plugin hooks and handler methods", ["plugin", "hook"],
            registry=r,
        )
        self.draining = Gauge("wirehub_draining", "1 while the replica drains", registry=r)
        self.drain_remaining = Gauge("wirehub_drain_sessions_remaining", "Sessions left to close", registry=r)
        # the network edge (service/accept.py)
        self.connections = Gauge("wirehub_connections", "Open TCP connections, before and after the upgrade",
                                 registry=r)
        self.connections_max = Gauge("wirehub_connections_max", "The connection cap (0 = none)", registry=r)
        self.connections_refused = Counter(
            "wirehub_connections_refused", "Connections closed at the edge before a request was served, by reason",
            ["reason"],
            registry=r,
        )
        self.connections_evicted = Counter(
            "wirehub_connections_evicted", "Connections waiting for a request head, closed at the cap", registry=r
        )
        self.accept_paused = Counter(
            "wirehub_accept_paused", "Pauses of accepting after an accept error such as EMFILE", registry=r
        )
        # admission control (service/overload.py)
        self.loop_lag = Histogram(
            "wirehub_loop_lag_seconds", "Lateness of a timer due every 10 ms: how long a callback waits for the loop",
            buckets=LAG_BUCKETS, registry=r,
        )
        self.connections_deferred = Counter(
            "wirehub_connections_deferred", "New connections queued by admission control while the loop lagged",
            registry=r,
        )
        self.connections_deferred_now = Gauge(
            "wirehub_connections_deferred_queued", "New connections in the admission queue now", registry=r
        )
        self.admission_limiting = Gauge(
            "wirehub_admission_limiting", "1 while new connections wait in the admission queue (the loop lags)",
            registry=r,
        )
        for reason in ("over_cap", "headers_too_large", "header_timeout", "overloaded"):
            self.connections_refused.labels(reason)
        for endpoint in endpoints:  # every configured endpoint is exported from the start, at 0
            self.sessions.labels(endpoint)
            self.sessions_opened.labels(endpoint)
            self.messages_in.labels(endpoint)

    def track_history(self, usage: HistoryUsage) -> None:
        """Export the bytes and evictions of a history kept in this replica's memory."""
        self.registry.register(_HistoryCollector(usage))

    def tally(self, counter: Counter) -> Tally:
        """A :class:`Tally` of ``counter`` (a counter or one of its labelled children), folded in at scrape time."""
        tally = self._tallies.get(id(counter))
        if tally is None:
            tally = self._tallies[id(counter)] = Tally(counter)
        return tally

    def messages_in_tally(self, endpoint: str) -> Tally:
        """The :class:`Tally` of ``wirehub_messages_in_total{endpoint}``, looked up once per endpoint."""
        tally = self._messages_in.get(endpoint)
        if tally is None:
            tally = self._messages_in[endpoint] = self.tally(self.messages_in.labels(endpoint))
        return tally

    def published_tally(self, source: str) -> Tally:
        """The :class:`Tally` of ``wirehub_published_total{source}``, looked up once per source."""
        tally = self._published.get(source)
        if tally is None:
            tally = self._published[source] = self.tally(self.published.labels(source))
        return tally

    def session_closed(self, endpoint: str, code: str) -> Counter:
        """``wirehub_sessions_closed_total{endpoint, code}``, its child looked up once per pair."""
        child = self._closed.get((endpoint, code))
        if child is None:
            child = self._closed[endpoint, code] = self.sessions_closed.labels(endpoint, code)
        return child

    def render(self) -> bytes:
        for tally in self._tallies.values():
            tally.fold()
        return generate_latest(self.registry)


class _HistoryCollector(Collector):
    """Reads the history's own counters at scrape time (nothing to keep in step)."""

    def __init__(self, usage: HistoryUsage) -> None:
        self.usage = usage

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "wirehub_history_bytes", "Bytes of history held in this replica's memory", value=self.usage.bytes_held
        )
        yield CounterMetricFamily(
            "wirehub_history_rooms_evicted",
            "Rooms whose history was dropped to keep under the memory bus's history_max_bytes",
            value=self.usage.rooms_evicted,
        )
