"""Supervision events as Prometheus metrics (restarts, exits by reason, escalations, up)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from supervisor.core._events import (
    ChildExitedEvent,
    ChildReadyEvent,
    ChildRestarted,
    ChildStarted,
    EventBus,
    RestartIntensityExceededEvent,
    SupervisionEvent,
)

__all__ = ["SupervisionMetrics"]


class SupervisionMetrics:
    """Subscribes to a bus and keeps the supervision counters of one tree, named
    `{prefix}_child_starts_total` and so on."""

    def __init__(self, bus: EventBus, registry: CollectorRegistry, prefix: str) -> None:
        labels = ["supervisor", "child"]
        self.starts = Counter(
            f"{prefix}_child_starts", "Child incarnations started", labels, registry=registry
        )
        self.exits = Counter(
            f"{prefix}_child_exits", "Child exits by reason", [*labels, "reason"], registry=registry
        )
        self.restarts = Counter(
            f"{prefix}_child_restarts", "Child restarts decided", labels, registry=registry
        )
        self.escalations = Counter(
            f"{prefix}_restart_intensity_exceeded",
            "Supervisors that gave up (escalations)",
            ["supervisor"],
            registry=registry,
        )
        self.up = Gauge(f"{prefix}_child_up", "1 while a child is ready", labels, registry=registry)
        self._unsubscribe = bus.subscribe(self._on_event)

    def _on_event(self, event: SupervisionEvent) -> None:
        match event:
            case ChildStarted(supervisor=sup, child_id=child):
                self.starts.labels(sup, child).inc()
                # The restart counter exists at 0 from the start: a rate or increase over a
                # series that appears at 1 would miss that first restart.
                self.restarts.labels(sup, child)
            case ChildReadyEvent(supervisor=sup, child_id=child):
                self.up.labels(sup, child).set(1)
            case ChildExitedEvent(supervisor=sup, child_id=child, reason=reason):
                self.up.labels(sup, child).set(0)
                kind = type(reason).__name__.lower()
                self.exits.labels(sup, child, kind).inc()
            case ChildRestarted(supervisor=sup, child_id=child):
                self.restarts.labels(sup, child).inc()
            case RestartIntensityExceededEvent(supervisor=sup):
                self.escalations.labels(sup).inc()
            case _:
                pass

    def close(self) -> None:
        """Stop counting."""
        self._unsubscribe()
