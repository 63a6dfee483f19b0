"""The engine host's output stream over a real Unix socket: frames whole and in order, a
sender that never blocks, the newest reader written to, nothing half-sent to a new one."""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors.engine_host.output_stream import MAX_FRAME, FrameReader, OutputStream, connect


@pytest.fixture
def stream(tmp_path: Path) -> Iterator[OutputStream]:
    out = OutputStream(str(tmp_path / "out.sock"))
    try:
        yield out
    finally:
        out.close()


def read_frames(sock: socket.socket, count: int) -> list[bytes]:
    reader = FrameReader()
    sock.settimeout(10)
    frames: list[bytes] = []
    while len(frames) < count:
        data = sock.recv(1 << 16)
        assert data, f"the stream ended after {len(frames)} of {count} frames"
        frames += reader.feed(data)
    return frames


def test_frames_cut_from_any_split_of_the_bytes() -> None:
    rng = random.Random(7)
    sent = [rng.randbytes(rng.randrange(0, 300)) for _ in range(200)]
    wire = b"".join(struct.pack("<I", len(f)) + f for f in sent)
    reader, got, at = FrameReader(), [], 0
    buffer = bytearray(64)  # reused for every read, as the node's reader does
    while at < len(wire):
        step = min(rng.randrange(1, 40), len(wire) - at)
        buffer[:step] = wire[at : at + step]
        got += reader.feed(memoryview(buffer)[:step])
        at += step
    assert got == sent


def test_a_length_beyond_the_bound_is_a_broken_stream() -> None:
    with pytest.raises(ValueError, match="broken"):
        FrameReader().feed(struct.pack("<I", MAX_FRAME + 1) + b"x")


def test_with_no_reader_frames_are_dropped_and_a_reader_gets_whole_frames_after(
    stream: OutputStream,
) -> None:
    stream.send(b"lost")
    assert stream.unsent == 1
    with connect(stream.path) as sock:
        for i in range(100):
            stream.send(b"frame %d" % i)
        assert read_frames(sock, 100) == [b"frame %d" % i for i in range(100)]
    assert stream.unsent == 1


def test_the_sender_never_waits_for_a_reader_that_does_not_read(stream: OutputStream) -> None:
    frame = b"x" * 65536
    count = 400  # 26 MB: far more than the socket's buffers hold
    with connect(stream.path) as sock:
        sender = threading.Thread(target=lambda: [stream.send(frame) for _ in range(count)])
        sender.start()
        sender.join(30)
        assert not sender.is_alive(), "send blocked on a reader that was not reading"
        frames = read_frames(sock, count)  # everything comes once it reads, in order
    assert frames == [frame] * count
    assert stream.unsent == 0


def test_the_newest_reader_is_written_to_and_the_older_one_closed(stream: OutputStream) -> None:
    with connect(stream.path) as old:
        stream.send(b"to the old one")
        assert read_frames(old, 1) == [b"to the old one"]
        with connect(stream.path) as new:
            deadline = time.monotonic() + 10
            while stream.connections < 2 and time.monotonic() < deadline:
                time.sleep(0.01)  # the stream's thread takes it (send only when it has none)
            stream.send(b"to the new one")
            assert read_frames(new, 1) == [b"to the new one"]
            old.settimeout(10)
            assert old.recv(100) == b""  # closed by the host


def test_a_reader_that_went_away_costs_frames_not_the_stream(stream: OutputStream) -> None:
    with connect(stream.path) as first:
        stream.send(b"one")
        assert read_frames(first, 1) == [b"one"]
    sent = 0
    while stream.unsent == 0 and sent < 1000:  # until the host sees it gone
        stream.send(b"into the void")
        sent += 1
    assert stream.unsent >= 1
    with connect(stream.path) as second:
        stream.send(b"two")
        assert read_frames(second, 1) == [b"two"]


def test_connecting_to_a_host_that_does_not_listen_names_the_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "nobody.sock")
    with pytest.raises(ConnectionError, match=f"output socket {path} took no connection"):
        connect(path, timeout=0.1)


def test_close_writes_what_waits(tmp_path: Path) -> None:
    stream = OutputStream(str(tmp_path / "out.sock"))
    frame = b"y" * 65536
    with connect(stream.path) as sock:
        for _ in range(20):  # more than the socket's buffers: some of it waits in memory
            stream.send(frame)
        closing = threading.Thread(target=stream.close)
        closing.start()
        time.sleep(0.2)  # the reader begins only after the close did
        got = read_frames(sock, 20)
        closing.join(10)
    assert got == [frame] * 20
    assert not Path(stream.path).exists()
