"""Prometheus metrics of the delivery service (served on the HTTP side at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """One registry per DS instance, so tests can run several in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lkmls_requests_total",
            "gRPC requests by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.commits_accepted = Counter(
            "lkmls_commits_accepted_total", "Commits accepted (one per epoch)", registry=r
        )
        self.commits_rejected = Counter(
            "lkmls_commits_rejected_total", "Commits rejected, by reason", ["reason"], registry=r
        )
        self.proposals_issued = Counter(
            "lkmls_proposals_issued_total", "External proposals issued", ["kind"], registry=r
        )
        self.events_delivered = Counter(
            "lkmls_events_delivered_total", "Log entries written to member streams", registry=r
        )
        self.subscribers_cut = Counter(
            "lkmls_subscribers_cut_total",
            "Streams closed because the reader fell behind",
            registry=r,
        )
        self.transitions = Counter(
            "lkmls_transitions_total", "Transitions executed, by trigger", ["trigger"], registry=r
        )
        self.presence_removals = Counter(
            "lkmls_presence_removals_total",
            "Participants removed because their event stream was gone past the presence timeout",
            registry=r,
        )
        self.webhooks = Counter(
            "lkmls_webhooks_total",
            "LiveKit webhooks received, by event and outcome",
            ["event", "outcome"],
            registry=r,
        )
        self.subscribers = Gauge("lkmls_subscribers", "Open member streams", registry=r)
        self.rooms_cached = Gauge("lkmls_rooms_cached", "Rooms held in memory", registry=r)
        self.commit_latency = Histogram(
            "lkmls_commit_seconds",
            "SubmitCommit handling time (validation + durable write)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
