"""The peer benchmark's load generator, in its own process: plain asyncio HTTP/1.1 with
keep-alive (one connection per concurrent stream) and a minimal SSE parser, so that the
client is not the bottleneck (an httpx client was, at 64 streams).

    python -m tests.benchmarks._peer_load load HOST PORT MODEL CONC SECONDS MAX_TOKENS PROMPTS
    python -m tests.benchmarks._peer_load fault HOST PORT MODEL STREAMS MAX_TOKENS PROMPTS

PROMPTS is a JSON file: a list of chat message lists, taken in turn. `load` prints one JSON
line of per-request figures; `fault` prints `streaming` once every stream has its first
token (the caller then kills a worker), then one JSON line of outcomes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import sys
import time
from typing import Any

SILENCE = 30.0  # seconds without a byte: the stream hung


class Stream:
    """What one streamed response brought."""

    def __init__(self) -> None:
        self.sent = time.monotonic()
        self.ttft: float | None = None
        self.gaps: list[float] = []
        self.tokens = 0
        self.usage: dict[str, Any] | None = None
        self.finish: str | None = None
        self.error = ""
        self._last = self.sent

    def on_event(self, data: bytes) -> None:
        if data == b"[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            self.error = str(event["error"])[:200]
            return
        if event.get("usage"):
            self.usage = event["usage"]
        for choice in event.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                now = time.monotonic()
                if self.ttft is None:
                    self.ttft = now - self.sent
                else:
                    self.gaps.append(now - self._last)
                self._last = now
                self.tokens += 1
            if choice.get("finish_reason"):
                self.finish = choice["finish_reason"]


async def _connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the frontends' side
    return reader, writer


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]) -> Any:
    """The response body's pieces as they come (chunked or Content-Length)."""
    if "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
        return
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        if size == 0:
            await reader.readline()
            return
        piece = await reader.readexactly(size + 2)
        yield piece[:-2]


async def one_request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes, stream: Stream
) -> None:
    """Send one request on a keep-alive connection and read its SSE stream to the end."""
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json"
        b"\r\nAccept: text/event-stream\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
    )
    status = (await reader.readline()).split(b" ", 2)
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    buffer = b""
    async for piece in _body(reader, headers):
        buffer += piece
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    stream.on_event(line[5:].strip())
    if len(status) < 2 or status[1] != b"200":
        stream.error = stream.error or f"HTTP {status[1:2]!r}: {buffer[:200]!r}"


def payload(model: str, messages: list[dict[str, str]], max_tokens: int) -> bytes:
    return json.dumps(
        {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
    ).encode()


async def load(
    host: str, port: int, model: str, conc: int, seconds: float, max_tokens: int, prompts: list[Any]
) -> dict[str, Any]:
    """`conc` streams back to back for `seconds`; per-request figures."""
    turns = itertools.cycle(prompts)
    done: list[Stream] = []
    stop_at = time.monotonic() + seconds

    async def worker() -> None:
        reader, writer = await _connect(host, port)
        while time.monotonic() < stop_at:
            stream = Stream()
            try:
                request = payload(model, next(turns), max_tokens)
                await asyncio.wait_for(one_request(reader, writer, request, stream), SILENCE * 4)
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
                stream.error = stream.error or f"{type(exc).__name__}: {exc}"
                writer.close()
                reader, writer = await _connect(host, port)
            done.append(stream)
        writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return {
        "elapsed": time.monotonic() - started,
        "requests": sum(1 for s in done if not s.error),
        "errors": [s.error for s in done if s.error][:5],
        "error_count": sum(1 for s in done if s.error),
        "tokens": sum(_tokens(s) for s in done if not s.error),
        "ttft": [s.ttft for s in done if s.ttft is not None and not s.error],
        "itl": [g for s in done if not s.error for g in s.gaps],
        "prompt_tokens": sum((s.usage or {}).get("prompt_tokens", 0) for s in done),
        "cached_tokens": sum(_cached(s) for s in done),
    }


def _tokens(stream: Stream) -> int:
    return int((stream.usage or {}).get("completion_tokens", stream.tokens))


def _cached(stream: Stream) -> int:
    details = (stream.usage or {}).get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


async def fault(
    host: str, port: int, model: str, streams: int, max_tokens: int, prompts: list[Any]
) -> dict[str, Any]:
    """`streams` long streams at once; prints `streaming` when all have begun."""
    states = [Stream() for _ in range(streams)]

    async def run(i: int) -> str:
        reader, writer = await _connect(host, port)
        request = payload(model, prompts[i % len(prompts)], max_tokens)
        try:
            await _read_watched(one_request(reader, writer, request, states[i]), states[i])
        except TimeoutError:
            return "hung"
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            states[i].error = states[i].error or f"{type(exc).__name__}: {exc}"
        finally:
            writer.close()
        ok = not states[i].error and _tokens(states[i]) == max_tokens
        return "completed" if ok else "errors"

    tasks = [asyncio.create_task(run(i)) for i in range(streams)]
    while not all(s.ttft is not None for s in states) and not all(t.done() for t in tasks):
        await asyncio.sleep(0.01)
    print("streaming", flush=True)
    outcomes = await asyncio.gather(*tasks)
    return {
        "outcomes": {k: outcomes.count(k) for k in ("completed", "errors", "hung")},
        "errors": [s.error for s in states if s.error][:5],
    }


async def _read_watched(reading: Any, stream: Stream) -> None:
    """Run `reading`, failing with TimeoutError once no token came for SILENCE seconds."""
    task = asyncio.ensure_future(reading)
    seen, quiet_since = -1, time.monotonic()
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if stream.tokens != seen:
            seen, quiet_since = stream.tokens, time.monotonic()
        elif time.monotonic() - quiet_since > SILENCE:
            task.cancel()
            raise TimeoutError
    task.result()


def main(argv: list[str]) -> None:
    mode, host, port, model = argv[0], argv[1], int(argv[2]), argv[3]
    with open(argv[-1]) as f:
        prompts = json.load(f)
    if mode == "load":
        conc, seconds, max_tokens = int(argv[4]), float(argv[5]), int(argv[6])
        result = asyncio.run(load(host, port, model, conc, seconds, max_tokens, prompts))
    else:
        streams, max_tokens = int(argv[4]), int(argv[5])
        result = asyncio.run(fault(host, port, model, streams, max_tokens, prompts))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
