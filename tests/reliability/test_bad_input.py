"""Bad input, property-based: whatever arrives, the node answers precisely and keeps going.

- the request plane: arbitrary bytes, wrong types, huge and negative numbers, unknown
  fields, invalid UTF-8, deep nesting → one `invalid_request` chunk, no restart;
- the relays' ZMQ input: arbitrary frames → counted and dropped, no restart;
- every configuration field: a wrong value → exit 2 naming the key path, nothing started.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import threading
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
import zmq
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from messages.codec import DecodeError, decode_json
from messages.kv import (
    AllBlocksCleared,
    SglangEventBatch,
    decode_sglang_batch,
    encode_sglang_batch,
    sequence_number,
)
from messages.request import StreamChunk
from supervisor.config import ConfigError, NodeConfig, loads
from tests.node.harness import ROOT, NodeProcess, start_node
from tests.supervision.children import wait_until

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


class Sender:
    """A NATS connection on its own loop thread, for synchronous hypothesis examples."""

    def __init__(self, url: str) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.nc: Any = self.call(nats.connect(url))

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def request(self, data: bytes) -> list[StreamChunk]:
        async def go() -> list[StreamChunk]:
            inbox = self.nc.new_inbox()
            sub = await self.nc.subscribe(inbox)
            await self.nc.publish("dynamo.backend.generate", data, reply=inbox)
            chunks = []
            while True:
                msg = await sub.next_msg(timeout=20)
                chunks.append(decode_json(msg.data, StreamChunk))
                if chunks[-1].finish_reason is not None:
                    await sub.unsubscribe()
                    return chunks

        result: list[StreamChunk] = self.call(go())
        return result

    def close(self) -> None:
        self.call(self.nc.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, Sender]]:
    proc = start_node(tmp_path_factory.mktemp("bad-input"), handlers={"max_request_bytes": 65536})
    sender = None
    try:
        proc.wait_ready(60)
        sender = Sender(proc.url)
        yield proc, sender
    finally:
        if sender is not None:
            sender.close()
        proc.kill()


def _restarts(node: NodeProcess) -> int:
    _, body = node.http("/tree")

    def total(rows: list[dict[str, Any]]) -> int:
        return sum(r["restarts"] + total(r.get("children", [])) for r in rows)

    return total(json.loads(body)["children"])


def _answered_precisely(chunks: list[StreamChunk]) -> None:
    last = chunks[-1]
    if last.error is not None:
        assert len(chunks) == 1
        assert last.finish_reason == "error"
        assert last.error.code == "invalid_request", last.error
        assert last.error.message
    else:  # hypothesis stumbled on a valid request: it must have been served to the end
        assert last.finish_reason in ("stop", "length")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    [
        "request_id",
        "prompt",
        "token_ids",
        "messages",
        "stop",
        "sampling",
        "output",
        "timeout",
        "dp_rank",
        "colour",
    ]
)
requests = st.dictionaries(field_names, json_values, max_size=6)


@SETTINGS
@given(data=st.binary(max_size=2048))
def test_arbitrary_bytes_get_invalid_request(node: tuple[NodeProcess, Sender], data: bytes) -> None:
    _answered_precisely(node[1].request(data))


@SETTINGS
@given(body=requests)
def test_wrong_types_unknown_fields_and_extreme_numbers_get_invalid_request(
    node: tuple[NodeProcess, Sender], body: dict[str, Any]
) -> None:
    _answered_precisely(node[1].request(json.dumps(body).encode()))


@SETTINGS
@given(prefix=st.binary(min_size=1, max_size=8).filter(lambda b: not _utf8(b)))
def test_invalid_utf8_in_a_string_gets_invalid_request(
    node: tuple[NodeProcess, Sender], prefix: bytes
) -> None:
    data = b'{"request_id": "r", "prompt": "' + prefix + b'"}'
    _answered_precisely(node[1].request(data))


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("depth", [10, 1000, 20000])
def test_deep_nesting_gets_invalid_request(node: tuple[NodeProcess, Sender], depth: int) -> None:
    data = b'{"request_id": "r", "prompt": "x", "sampling": ' + b"[" * depth + b"]" * depth + b"}"
    _answered_precisely(node[1].request(data))


def test_after_all_that_the_node_restarted_nothing_and_still_serves(
    node: tuple[NodeProcess, Sender],
) -> None:
    proc, sender = node
    _answered_precisely(sender.request(b"\xff{not json"))  # some bad input even when run alone
    assert _restarts(proc) == 0
    chunks = sender.request(b'{"request_id": "fine", "prompt": "ok", "stop": {"max_tokens": 3}}')
    assert chunks[-1].finish_reason == "length"


# --- the relays' ZMQ input ----------------------------------------------------------------


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[zmq.Socket[bytes], Any, Any]]:
    from tests.node.test_kv_relay import relay_tree

    with relay_tree(tmp_path_factory.mktemp("relay")) as parts:
        yield parts


SENTINELS = itertools.count(10**6)


def _dropped() -> float:
    from actors.telemetry import node_metrics

    value = node_metrics.REGISTRY.get_sample_value(
        "sgl_node_zmq_messages_dropped_total", {"socket": "kv_events_0"}
    )
    return value or 0.0


def _decodes(frames: list[bytes]) -> bool:
    """Whether hypothesis made a valid SGLang message by chance (then nothing is dropped)."""
    if len(frames) != 2:
        return False
    try:
        sequence_number(frames[0])
        decode_sglang_batch(frames[1])
    except DecodeError:
        return False
    return True


def _relayed_after(relay: tuple[zmq.Socket[bytes], Any, Any], frames: list[bytes]) -> float:
    """Send `frames`, then a valid batch behind them on the same socket; once the valid one
    is relayed, the relay has handled `frames` (one SUB, in order). The drops they caused."""
    pub, collector, _ = relay
    before, seen = _dropped(), len(collector.batches)
    pub.send_multipart([b"kv-events", *frames])
    seq = next(SENTINELS)
    payload = encode_sglang_batch(SglangEventBatch(ts=1.0, events=[AllBlocksCleared()], dp_rank=0))
    pub.send_multipart([b"kv-events", seq.to_bytes(8, "big"), payload])
    assert wait_until(lambda: any(b.seq == seq for b in collector.batches[seen:]), timeout=10), (
        f"the valid batch {seq} sent behind the garbage was not relayed"
    )
    return _dropped() - before


@SETTINGS
@given(frames=st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_arbitrary_zmq_frames_at_a_relay_are_dropped_and_counted(
    relay: tuple[zmq.Socket[bytes], Any, Any], frames: list[bytes]
) -> None:
    assume(not _decodes(frames))
    assert _relayed_after(relay, frames) == 1


def test_after_garbage_the_relay_still_relays_and_never_restarted(
    relay: tuple[zmq.Socket[bytes], Any, Any],
) -> None:
    _, _, root = relay
    for garbage in ([], [b"x"], [b"short", b"\x00" * 9], [b"\x00" * 8, b"\xc1"], [b"a"] * 5):
        assert _relayed_after(relay, garbage) == 1, garbage
    assert all(row.restarts == 0 for row in root.which_children())


# --- every configuration field ------------------------------------------------------------


def _leaves(struct: type[Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for field in msgspec.structs.fields(struct):
        path = f"{prefix}{field.name}"
        kind = field.type
        if isinstance(kind, type) and issubclass(kind, msgspec.Struct):
            yield from _leaves(kind, path + ".")
        else:
            yield path, kind


def _wrong_value(kind: Any) -> Any:
    origin = typing.get_origin(kind)
    if origin is typing.Annotated:
        kind = typing.get_args(kind)[0]
        origin = typing.get_origin(kind)
    if origin is typing.Literal:
        return "not-a-choice"
    if kind is bool:
        return "yes"
    if kind is str:
        return 12345
    if kind in (int, float):
        return "two"
    if origin is list:
        return 5
    if origin is dict:
        return 5
    return [[["deep"]]]


def _nested(path: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _toml(data: dict[str, Any], prefix: str = "") -> str:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    text = "".join(f"{k} = {_toml_value(v)}\n" for k, v in scalars.items())
    for key, value in data.items():
        if isinstance(value, dict):
            text += f"[{prefix}{key}]\n" + _toml(value, f"{prefix}{key}.")
    return text


def _toml_value(value: Any) -> str:
    if isinstance(value, str):  # TOML strings: control characters must be escaped
        escaped = "".join(
            c
            if c.isprintable() and c not in '"\\'
            else f"\\u{ord(c):04x}"
            if ord(c) < 0x10000
            else f"\\U{ord(c):08x}"
            for c in value
        )
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)


LEAVES = list(_leaves(NodeConfig))


@pytest.mark.parametrize(("path", "kind"), LEAVES, ids=[p for p, _ in LEAVES])
def test_every_config_field_refuses_a_wrong_value_naming_its_key(path: str, kind: Any) -> None:
    with pytest.raises(ConfigError) as info:
        loads(_toml(_nested(path, _wrong_value(kind))))
    assert info.value.key == path


toml_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
toml_values = toml_scalars | st.lists(toml_scalars, max_size=4)


@SETTINGS
@given(index=st.integers(0, len(LEAVES) - 1), value=toml_values)
def test_random_values_anywhere_are_accepted_or_refused_naming_the_key(
    index: int, value: Any
) -> None:
    path, _ = LEAVES[index]
    try:
        loads(_toml(_nested(path, value)))
    except ConfigError as exc:
        assert exc.key.startswith(path.split(".")[0]), (exc.key, path)  # noqa: PT017


@pytest.mark.parametrize(
    "path", ["engine.dp_size", "nats.url", "chaos.seed", "handlers.count", "system.host"]
)
def test_the_cli_exits_2_and_starts_nothing(tmp_path: Path, path: str) -> None:
    kind = dict(LEAVES)[path]
    config = tmp_path / "bad.toml"
    config.write_text(_toml(_nested(path, _wrong_value(kind))))
    result = subprocess.run(
        [sys.executable, "-m", "supervisor", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert f"{path}:" in result.stderr
    assert "process spawned" not in result.stderr


def test_max_request_bytes_must_stay_below_the_embedded_servers_max_payload() -> None:
    with pytest.raises(ConfigError) as info:
        loads("[handlers]\nmax_request_bytes = 8388608\n")
    assert info.value.key == "handlers.max_request_bytes"
    with pytest.raises(ConfigError) as info:
        loads("[nats]\nmax_payload = 65536\n")
    assert info.value.key == "nats.max_payload"
    loads("[nats]\nembedded = false\n[handlers]\nmax_request_bytes = 8388608\n")  # theirs


@pytest.mark.parametrize(
    ("fault", "key"),
    [
        ('fault = "fail_requests"\ncount = 0', "chaos.faults[0].count"),
        ('fault = "drop_zmq"\nfraction = 1.5', "chaos.faults[0].fraction"),
        ('fault = "hang_actor"\nduration = -1.0', "chaos.faults[0].duration"),
        ('fault = "no_such_fault"', "chaos.faults"),
    ],
)
def test_a_scheduled_fault_out_of_range_is_refused_naming_its_key(fault: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads(f"[chaos]\nenabled = true\n[[chaos.faults]]\n{fault}\n")
    assert info.value.key.startswith(key), info.value
