"""Prometheus metrics for one bridge: operations, latency split into queue wait and token time, token state.

A registry per bridge (not the global one) so that tests and tools can run
several bridges in one process. Gauges are read at scrape time from the
owner's cached state: a scrape never touches the token.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tokenbridge.services.keys import Validity, certificate_validity
from tokenbridge.services.tokens import KeyState

if TYPE_CHECKING:
    from tokenbridge.services.tokens import TokenSet

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _TokenCollector(Collector):
    """Each token's gauges carry its name (``token``): one hub may own several cards."""

    def __init__(self, tokens: TokenSet, expiry_warning_days: int) -> None:
        self.tokens = tokens
        self.expiry_warning_days = expiry_warning_days

    def collect(self) -> Iterable[Metric]:
        present = GaugeMetricFamily("tokenbridge_token_present", "1 when the token is present", labels=["token"])
        logged = GaugeMetricFamily("tokenbridge_token_logged_in", "1 when the service is logged in",
                                   labels=["token"])
        state = GaugeMetricFamily("tokenbridge_token_state", "current token state", labels=["token", "state"])
        depth = GaugeMetricFamily("tokenbridge_queue_depth", "requests waiting for the token",
                                  labels=["token", "client"])
        service = GaugeMetricFamily("tokenbridge_token_service_seconds", "moving average of one token operation",
                                    labels=["token"])
        for process in self.tokens:
            name, status = process.name, process.status()
            present.add_metric([name], 0.0 if status.state.value in ("absent", "error", "starting") else 1.0)
            logged.add_metric([name], 1.0 if status.logged_in else 0.0)
            state.add_metric([name, status.state.value], 1.0)
            depth.add_metric([name, "all"], float(status.queue_depth))
            for client, n in process.queued_by_client().items():
                depth.add_metric([name, client], float(n))
            service.add_metric([name], process.service_time)
        yield from (present, logged, state, depth, service)
        yield from self._certificates()

    def _certificates(self) -> Iterable[Metric]:
        """Dates as Unix timestamps, so that alert rules can compare them with ``time()`` themselves."""
        labels = ["key", "label", "token"]
        days = GaugeMetricFamily("tokenbridge_certificate_days_left", "days until the certificate expires",
                                 labels=labels)
        not_after = GaugeMetricFamily("tokenbridge_certificate_not_after_seconds",
                                      "the certificate's notAfter, as a Unix timestamp", labels=labels)
        not_before = GaugeMetricFamily("tokenbridge_certificate_not_before_seconds",
                                       "the certificate's notBefore, as a Unix timestamp", labels=labels)
        expiring = GaugeMetricFamily("tokenbridge_certificate_expiring",
                                     "1 when the certificate expires within server.expiry_warning_days "
                                     "or has expired: renew it (0 for a retiring key)", labels=labels)
        retiring = GaugeMetricFamily("tokenbridge_key_retiring", "1 when the key is retiring or retired "
                                     "(renewal: it only decrypts, or is no longer used)", labels=labels)
        for key in self.tokens.list_keys():
            values = [key.id, key.label, key.token]
            old = self.tokens.state(key) is not KeyState.ACTIVE
            retiring.add_metric(values, 1.0 if old else 0.0)
            check = certificate_validity(key, self.expiry_warning_days)
            if check is None:
                continue
            days.add_metric(values, float(check.days_left))
            not_after.add_metric(values, check.not_after.timestamp())
            not_before.add_metric(values, check.not_before.timestamp())
            # The old card's certificate expiring is what renewal is for: no alert once it is retiring.
            soon = check.state in (Validity.EXPIRING, Validity.EXPIRED) and not old
            expiring.add_metric(values, 1.0 if soon else 0.0)
        yield from (days, not_after, not_before, expiring, retiring)


class Metrics:
    def __init__(self, expiry_warning_days: int = 30) -> None:
        """``expiry_warning_days``: ``server.expiry_warning_days``, for ``tokenbridge_certificate_expiring``."""
        self.expiry_warning_days = expiry_warning_days
        self.registry = CollectorRegistry()
        self.operations = Counter("tokenbridge_operations", "private-key operations",
                                  ["operation", "key", "client", "outcome"], registry=self.registry)
        self.queue_wait = Histogram("tokenbridge_queue_wait_seconds", "time waiting for the token",
                                    ["operation"], buckets=_BUCKETS, registry=self.registry)
        self.token_time = Histogram("tokenbridge_token_seconds", "time spent in the token",
                                    ["operation"], buckets=_BUCKETS, registry=self.registry)
        self.handshakes = Counter("tokenbridge_upstream_handshakes", "TLS handshakes signed on the token",
                                  ["upstream", "outcome"], registry=self.registry)

        # Labelled children, kept: looking one up through ``labels()`` costs more than the update itself.
        self._counters: dict[tuple[str, ...], Any] = {}
        self._timers: dict[str, tuple[Any, Any]] = {}

    def count(self, operation: str, key: str, client: str, outcome: str) -> None:
        labels = (operation, key, client, outcome)
        child = self._counters.get(labels)
        if child is None:
            child = self._counters[labels] = self.operations.labels(*labels)
        child.inc()

    def watch(self, tokens: TokenSet) -> None:
        self.registry.register(_TokenCollector(tokens, self.expiry_warning_days))

    def observe_job(self, client: str, kind: str, wait: float, token: float, outcome: str) -> None:
        """Called on the event loop for each answer from the token: two histogram updates, nothing else."""
        timers = self._timers.get(kind)
        if timers is None:
            timers = self._timers[kind] = (self.queue_wait.labels(kind), self.token_time.labels(kind))
        timers[0].observe(wait)
        timers[1].observe(token)
