"""EngineActor's start-up handshake over the real channel (commands on ZMQ, outputs on the
host's output stream): the host's first answers can be lost (a host with no reader
connected drops them); the actor asks again and starts. A host that never answers fails
the start with an error that says what was missing."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

import actors.engine
from actors.engine import EngineActor
from actors.engine_host.channel import HostChannel
from messages.engine import EngineInfo, HostControl, HostControlReply
from supervisor.config import HealthSection
from supervisor.core import ActorStart, ChildSpec, Root, SupervisorFlags
from supervisor.plan import EngineSettings

INFO = EngineInfo(
    backend="sim",
    model_name="m",
    context_length=1024,
    page_size=16,
    total_kv_blocks=10,
    max_batch_size=4,
    dp_size=1,
    kv_event_endpoints=[],
    kv_event_topic="kv-events",
    metrics_endpoints=[],
)


@dataclass
class ScriptedHost:
    """A real HostChannel on a thread that ignores the first `ignore` info requests."""

    channel: HostChannel
    ignore: int
    seen: list[int] = field(default_factory=list)
    halt: threading.Event = field(default_factory=threading.Event)

    def serve(self) -> None:
        while not self.halt.is_set():
            command = self.channel.recv(0.05)
            if not isinstance(command, HostControl) or command.op != "info":
                continue
            self.seen.append(command.op_id)
            if len(self.seen) > self.ignore:
                data = msgspec.to_builtins(INFO)
                self.channel.send(HostControlReply(op_id=command.op_id, ok=True, data=data))


@pytest.fixture
def endpoints(tmp_path: Path) -> tuple[str, str]:
    return f"ipc://{tmp_path}/cmd", f"{tmp_path}/out"


def run_host(endpoints: tuple[str, str], ignore: int) -> Iterator[ScriptedHost]:
    host = ScriptedHost(HostChannel(*endpoints), ignore)
    thread = threading.Thread(target=host.serve, daemon=True)
    thread.start()
    try:
        yield host
    finally:
        host.halt.set()
        thread.join(5)
        host.channel.close()


def engine_root(endpoints: tuple[str, str]) -> Root:
    health = HealthSection(canary_after_idle=600.0)
    command, output = endpoints
    settings = EngineSettings(
        command_endpoint=command, output_socket=output, health=health, max_inflight=16
    )
    spec = ChildSpec("engine", ActorStart(EngineActor, (settings,)))
    return Root("handshake", SupervisorFlags(intensity=0), [spec])


def test_a_lost_info_answer_is_asked_again_and_the_engine_starts(
    endpoints: tuple[str, str],
) -> None:
    for host in run_host(endpoints, ignore=2):
        root = engine_root(endpoints)
        try:
            assert root.wait_ready(15), root.exit_reason
            assert len(host.seen) == 3  # two unanswered, the third answered
            assert len(set(host.seen)) == 3  # each ask is a new operation
        finally:
            root.stop_and_wait(10)


def test_a_host_that_never_answers_fails_the_start_naming_the_cause(
    endpoints: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(actors.engine, "INFO_TIMEOUT", 2.5)
    for host in run_host(endpoints, ignore=1000):
        root = engine_root(endpoints)
        try:
            assert not root.wait_ready(15)
            assert "did not answer 'info' within 2.5s" in str(root.exit_reason)
            assert len(host.seen) >= 2  # asked again meanwhile
        finally:
            root.stop_and_wait(10)
