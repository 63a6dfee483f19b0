"""Supervisor flags from the `[supervision]` section: the one place they are built, for
the node's supervisors, the frontend's and the demonstration tree's."""

from __future__ import annotations

from supervisor.config import SupervisionSection
from supervisor.core import Backoff, Strategy, SupervisorFlags

__all__ = ["supervisor_flags"]


def supervisor_flags(section: SupervisionSection, strategy: Strategy) -> SupervisorFlags:
    """A supervisor's flags from the `[supervision]` section (the one place they are built)."""
    backoff = Backoff(
        initial=section.backoff_initial,
        max=section.backoff_max,
        multiplier=section.backoff_multiplier,
        jitter=section.backoff_jitter,
        reset_after=section.backoff_reset_after,
    )
    return SupervisorFlags(
        strategy=strategy, intensity=section.intensity, period=section.period, backoff=backoff
    )
