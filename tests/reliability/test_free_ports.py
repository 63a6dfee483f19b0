"""Where chaos runs and test fabrics take their ports: below the kernel's ephemeral range,
never the same one twice in a process, and inside `SGLNODE_PORT_RANGE` when it is set
(parallel test workers each get a disjoint slice)."""

from __future__ import annotations

import itertools

import pytest

from supervisor import chaos_nodes
from supervisor.chaos_nodes import PORT_RANGE_ENV, ephemeral_low, free_ports, port_slice


def _bounds(spec: str) -> tuple[int, int]:
    low, high = spec.split("-")
    return int(low), int(high)


def test_ports_come_from_the_range_set_and_never_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chaos_nodes, "_HANDED_OUT", set())
    monkeypatch.setenv(PORT_RANGE_ENV, "21000-21999")
    singles = [free_ports() for _ in range(40)]
    spans = [free_ports(4) for _ in range(5)]
    taken = singles + [p + k for p in spans for k in range(4)]
    assert len(set(taken)) == len(taken) == 60
    assert all(21000 <= p <= 21999 for p in taken), taken


def test_a_bad_range_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PORT_RANGE_ENV, "21000:21099")
    with pytest.raises(ValueError, match="SGLNODE_PORT_RANGE='21000:21099': expected LOW-HIGH"):
        free_ports()


def test_without_a_range_ports_stay_below_the_ephemeral_range(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PORT_RANGE_ENV, raising=False)
    ports = [free_ports(2) for _ in range(50)]
    assert all(p >= 10000 and p + 1 < ephemeral_low() for p in ports)


def test_worker_slices_are_disjoint_and_cover_the_range() -> None:
    slices = [_bounds(port_slice(i, 3)) for i in range(3)]
    assert slices[0][0] == 10000
    for (_, high), (low, _) in itertools.pairwise(slices):
        assert low == high + 1
    assert slices[-1][1] <= ephemeral_low() - 1
    assert all(high - low > 5000 for low, high in slices)
