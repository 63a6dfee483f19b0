"""The RegistrarActor's pure core: when the instance is written to discovery, or withdrawn."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.discovery.lease import Lease


def test_a_lease_is_renewed_only_while_the_record_is_written() -> None:
    lease = Lease()
    assert lease.heartbeat() == "none"
    assert lease.written() == "registered"
    assert lease.heartbeat() == "write"
    assert lease.written() == "renewed"


def test_a_first_registration_that_failed_is_tried_again_at_each_heartbeat() -> None:
    # a replicated bucket just made has no leader for a moment: the first put may fail
    lease = Lease()
    assert lease.write_failed() == 1
    assert lease.heartbeat() == "write"
    assert lease.write_failed() == 2
    assert lease.heartbeat() == "write"
    assert lease.written() == "registered"
    # a failure before a withdrawal is not retried after it
    lease = Lease()
    lease.write_failed()
    assert lease.engine_down() == "delete"
    assert lease.deleting() is False
    assert lease.heartbeat() == "none"


def test_the_engine_going_down_withdraws_the_instance_and_its_return_restores_it() -> None:
    lease = Lease()
    lease.written()
    assert lease.engine_down() == "delete"
    assert lease.deleting() is True
    assert lease.heartbeat() == "none"
    assert lease.engine_back() == "write"


def test_released_memory_keeps_the_instance_out_even_when_the_engine_comes_back() -> None:
    lease = Lease()
    assert lease.memory_released() == "delete"
    assert lease.engine_down() == "delete"
    assert lease.engine_back() == "none"  # still released
    assert lease.reconnected() == "none"
    assert lease.memory_resumed() == "write"


def test_a_write_after_failures_is_a_restore_and_resets_the_count() -> None:
    lease = Lease()
    lease.written()
    assert lease.write_failed() == 1
    assert lease.write_failed() == 2
    assert lease.written() == "restored"
    assert lease.write_failures == 0


def test_deleting_twice_deletes_once() -> None:
    lease = Lease()
    lease.written()
    assert lease.deleting() is True
    assert lease.deleting() is False


EVENTS = ["engine_down", "engine_back", "memory_released", "memory_resumed", "reconnected"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(EVENTS), max_size=30))
def test_after_any_events_the_instance_is_wanted_exactly_when_the_engine_is_up_and_serving(
    events: list[str],
) -> None:
    lease = Lease()
    engine_up, released = True, False  # the model: the last word on each fact counts
    for event in events:
        action = getattr(lease, event)()
        engine_up = {"engine_down": False, "engine_back": True}.get(event, engine_up)
        released = {"memory_released": True, "memory_resumed": False}.get(event, released)
        assert lease.wanted == (engine_up and not released)
        if action == "write":
            assert lease.wanted
        if action == "delete":
            assert not lease.wanted
