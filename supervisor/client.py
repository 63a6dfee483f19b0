"""A client for sgl-node nodes; it needs nothing but the NATS URL.

As a library (asyncio)::

    async with NodeClient("nats://127.0.0.1:4222") as client:
        async for chunk in client.generate(GenerateRequest(request_id="r1", prompt="Hi")):
            print(chunk.text, end="")

As a command: ``python -m supervisor.client generate "What is the capital of France?"``;
also ``instances``, ``watch kv-events|metrics``, ``tree``, ``cancel``. See ``--help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, TypeVar

import msgspec
import nats
import nats.js.errors
import structlog
from nats.aio.client import Client

from actors.streams.direct import DirectReceiver
from messages.codec import DecodeError, decode_json, encode_json
from messages.discovery import InstanceRecord
from messages.kv import KvEventBatch
from messages.metrics import LoadMetrics
from messages.request import (
    CancelRequest,
    ChatMessage,
    DirectReply,
    EmbedRequest,
    EmbedResponse,
    GenerateRequest,
    ResumeReply,
    ResumeRequest,
    StopConditions,
    StreamChunk,
)
from supervisor.client_replies import Reply, ReplyMux, is_no_responders
from supervisor.client_stream import Lost, StreamOptions, stream_chunks
from supervisor.config import DiscoverySection, NodeSection

__all__ = ["NoRespondersError", "NodeClient", "ask_resume", "main"]

_NODE = NodeSection()
_DISCOVERY = DiscoverySection()
_RESUME_TIMEOUT = 2.0

T = TypeVar("T")


async def ask_resume(
    mux: ReplyMux, subject: str, request_id: str, from_index: int, timeout: float
) -> ResumeReply | None:
    """Ask, on the `resume` subject, the node holding `request_id` for its chunks from
    `from_index` on; None if no node answers (or the connection is down just now). Through
    the connection's reply inboxes: a cancel of the caller always raises (see
    `ReplyMux.request`)."""
    ask = encode_json(ResumeRequest(request_id, from_index))
    try:
        msg = await mux.request(subject, ask, timeout)
    except nats.errors.ConnectionClosedError:
        raise
    except nats.errors.Error:
        return None  # reconnecting, or the outgoing buffer is full
    if msg is None or is_no_responders(msg):
        return None  # nobody holds it, or nobody serves the subject
    try:
        return decode_json(msg.data, ResumeReply)
    except DecodeError:
        return None


class NoRespondersError(ConnectionError):
    """No node serves the subject the request was sent to."""


class NodeClient:
    """Talks to the nodes of one `namespace.component.endpoint` over NATS."""

    def __init__(
        self,
        servers: str | list[str] = "nats://127.0.0.1:4222",
        namespace: str = _NODE.namespace,
        component: str = _NODE.component,
        endpoint: str = _NODE.endpoint,
        bucket: str = _DISCOVERY.bucket,
        connect_options: dict[str, Any] | None = None,
        direct_streams: bool = False,
        direct_host: str = "127.0.0.1",
    ) -> None:
        self.servers = [servers] if isinstance(servers, str) else servers
        self.namespace = namespace
        self.component = component
        self.endpoint = endpoint
        self.bucket = bucket
        # Reconnect quickly and forever: a node holds what it publishes during an outage
        # for about a second after it is back (nats.resume_delay), then sends it.
        self.connect_options: dict[str, Any] = {
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.25,
        }
        self.connect_options.update(connect_options or {})
        self.nc: Client | None = None
        self._reconnects = 0  # streams ask for what they may have missed when this moves
        self._replies: ReplyMux | None = None  # every stream's reply inbox, one subscription
        # Chunks straight from the nodes over TCP, as the frontend takes them (see
        # actors.streams.direct): only for nodes that know `reply_direct` (old ones refuse
        # the field), so off unless asked for.
        self.direct_streams = direct_streams
        self.direct_host = direct_host
        self._receiver: DirectReceiver | None = None
        self.direct: DirectReply | None = None  # where nodes send straight, once listening

    @property
    def base(self) -> str:
        """`namespace.component`."""
        return f"{self.namespace}.{self.component}"

    async def connect(self) -> NodeClient:
        """Connect to NATS."""
        options = dict(self.connect_options)
        user_callback = options.pop("reconnected_cb", None)

        async def reconnected() -> None:
            self._reconnects += 1
            if user_callback is not None:
                await user_callback()

        self.nc = await nats.connect(servers=self.servers, reconnected_cb=reconnected, **options)
        self._replies = ReplyMux(self.nc)
        await self._replies.start()
        if self.direct_streams:
            log = structlog.get_logger().bind(path="client")
            self._receiver = DirectReceiver(self._replies.deliver, self.direct_host, log)
            self.direct = await self._receiver.start()
        return self

    async def close(self) -> None:
        """Close the connection."""
        if self._receiver is not None:
            await self._receiver.stop()
        if self.nc is not None:
            with contextlib.suppress(ConnectionError):  # the server went away first
                await self.nc.close()

    async def __aenter__(self) -> NodeClient:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _nc(self) -> Client:
        if self.nc is None:
            msg = "NodeClient is not connected"
            raise RuntimeError(msg)
        return self.nc

    async def generate(
        self,
        request: GenerateRequest | bytes,
        instance_id: str | None = None,
        idle_timeout: float = 120.0,
        probe_after: float = 2.0,
        lost_after: float = 6.0,
        migration_limit: int = 3,
        retries: int = 3,
    ) -> AsyncIterator[StreamChunk]:
        """Send a request and yield its chunks until the one with a finish reason.

        `request` may be raw bytes (to send anything at all, e.g. in tests; such a request
        is never continued). `instance_id` picks one node; otherwise NATS spreads requests
        over the nodes. Raises `NoRespondersError` if nobody serves the subject (after
        its `retries`) and `TimeoutError` if no chunk comes for `idle_timeout` seconds.

        Chunks lost in transit (a NATS server restart drops what it carries) are asked for
        again on the resume subject: at once on a gap, after this client reconnected, and
        after `probe_after` seconds of silence. If no node holds the stream for
        `lost_after` seconds (its node died), or its node ends it stopping or with a
        retryable error, the stream continues on another node from the tokens already
        yielded (up to `migration_limit` seams): the caller sees one stream with a pause.
        A refusal before the first chunk (overloaded, not ready, engine restarting,
        stopping), or no node serving the subject, is sent again after 0.2 s, doubling up
        to 2 s, up to `retries` times and never past the request's `timeout` (0: the
        refusal is the answer). What cannot go on ends with the chunk that ended it where
        it last ran (`stream_lost` when no node holds it and none takes it on).
        """
        subject = f"{self.base}.{self.endpoint}" + (f".{instance_id}" if instance_id else "")
        options = StreamOptions(idle_timeout, probe_after, lost_after, migration_limit, retries)
        try:
            async for chunk in stream_chunks(self, request, subject, options):
                yield chunk
        except Lost as lost:
            raise NoRespondersError(lost.message) from None

    @property
    def reconnects(self) -> int:
        """How often the connection came back (streams ask for what they may have missed)."""
        return self._reconnects

    def connection(self) -> Client:
        """The NATS connection (raises if not connected)."""
        return self._nc()

    @property
    def replies(self) -> ReplyMux:
        """The reply subjects of this connection's streams (raises if not connected)."""
        if self._replies is None:
            msg = "NodeClient is not connected"
            raise RuntimeError(msg)
        return self._replies

    async def resume(self, request_id: str, from_index: int) -> ResumeReply | None:
        """Ask the node holding `request_id` for its chunks from `from_index` on."""
        return await ask_resume(
            self.replies, f"{self.base}.resume", request_id, from_index, _RESUME_TIMEOUT
        )

    async def embed(
        self, request: EmbedRequest | bytes, instance_id: str | None = None, timeout: float = 60.0
    ) -> EmbedResponse:
        """Send an embedding request (to nodes in `embedding` mode) and return the answer;
        raises `NoRespondersError` when no node serves the subject, `nats.errors.TimeoutError`
        when none answers within `timeout`."""
        subject = f"{self.base}.{self.endpoint}" + (f".{instance_id}" if instance_id else "")
        data = request if isinstance(request, bytes) else encode_json(request)
        return decode_json((await self._ask(subject, data, timeout)).data, EmbedResponse)

    async def _ask(self, subject: str, data: bytes, timeout: float) -> Reply:
        """One request's answer, through the reply inboxes (a cancel always raises: see
        `ReplyMux.request`)."""
        msg = await self.replies.request(subject, data, timeout)
        if msg is None:
            raise nats.errors.TimeoutError
        if is_no_responders(msg):
            msg_text = f"no node serves {subject}"
            raise NoRespondersError(msg_text)
        return msg

    async def cancel(self, request_id: str) -> None:
        """Cancel an in-flight request, whichever node runs it."""
        nc = self._nc()
        await nc.publish(f"{self.base}.cancel", encode_json(CancelRequest(request_id)))
        await nc.flush()

    async def instances(self) -> list[InstanceRecord]:
        """The live instances of this endpoint, from the discovery bucket."""
        js = self._nc().jetstream()
        try:
            kv = await js.key_value(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            return []
        prefix = f"{self.base}.{self.endpoint}."
        # The stream's subject list, not `kv.keys()`: that makes a JetStream consumer per
        # call which outlives it, and a client polling this runs the server out of them.
        info = await js.stream_info(
            f"KV_{self.bucket}", subjects_filter=f"$KV.{self.bucket}.{prefix}>"
        )
        keys = [subject.split(".", 2)[2] for subject in (info.state.subjects or {})]
        records = []
        for key in keys:
            if not key.startswith(prefix):
                continue
            try:
                entry = await kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value:
                records.append(decode_json(entry.value, InstanceRecord))
        return records

    async def watch(self, what: str) -> AsyncIterator[KvEventBatch | LoadMetrics]:
        """Yield KV event batches (`kv-events`) or load metrics (`metrics`) as they come."""
        kinds: dict[str, tuple[str, type[Any]]] = {
            "kv-events": (f"{self.base}.kv_events", KvEventBatch),
            "metrics": (f"{self.base}.load_metrics", LoadMetrics),
        }
        subject, type_ = kinds[what]
        sub = await self._nc().subscribe(subject)
        try:
            async for msg in sub.messages:
                try:
                    yield decode_json(msg.data, type_)
                except DecodeError:
                    continue
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def tree(self, instance_id: str, timeout: float = 5.0) -> Any:
        """The supervision tree of one instance (which_children, recursively)."""
        msg = await self._ask(f"{self.base}.tree.{instance_id}", b"", timeout)
        return msgspec.json.decode(msg.data)


# --- the command line -----------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m supervisor.client", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--nats",
        default="nats://127.0.0.1:4222",
        help="NATS server URL; several (a cluster) comma-separated",
    )
    parser.add_argument("--namespace", default=_NODE.namespace)
    parser.add_argument("--component", default=_NODE.component)
    parser.add_argument("--endpoint", default=_NODE.endpoint)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="stream a completion to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="send the prompt as is (no chat template)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--instance", help="send to this instance id only")
    gen.add_argument("--timeout", type=float, default=None, help="request deadline, seconds")
    gen.add_argument("--json", action="store_true", help="print each chunk as a JSON line")
    embed = commands.add_parser("embed", help="embed texts (nodes in embedding mode)")
    embed.add_argument("texts", nargs="+")
    commands.add_parser("instances", help="list live instances (discovery)")
    watch = commands.add_parser("watch", help="print events as JSON lines")
    watch.add_argument("what", choices=["kv-events", "metrics"])
    tree = commands.add_parser("tree", help="an instance's supervision tree")
    tree.add_argument("instance", nargs="?", help="instance id (default: the only one)")
    cancel = commands.add_parser("cancel", help="cancel a request by id")
    cancel.add_argument("request_id")
    return parser


async def _generate(client: NodeClient, args: argparse.Namespace) -> int:
    from messages.request import SamplingOptions

    request = GenerateRequest(
        request_id=uuid.uuid4().hex,
        prompt=args.prompt if args.raw else None,
        messages=None if args.raw else [ChatMessage(role="user", content=args.prompt)],
        sampling=SamplingOptions(temperature=args.temperature),
        stop=StopConditions(max_tokens=args.max_tokens),
        timeout=args.timeout,
    )
    started = time.monotonic()
    first: float | None = None
    tokens = 0
    last: StreamChunk | None = None
    async for chunk in client.generate(request, instance_id=args.instance):
        last = chunk
        if chunk.token_ids and first is None:
            first = time.monotonic() - started
        tokens += len(chunk.token_ids)
        if args.json:
            print(encode_json(chunk).decode(), flush=True)
        else:
            print(chunk.text, end="", flush=True)
    elapsed = time.monotonic() - started
    assert last is not None
    if not args.json:
        print()
    summary = f"[{last.finish_reason}; {tokens} tokens in {elapsed:.2f}s"
    if first is not None:
        summary += f"; first token after {first * 1000:.0f} ms"
    if last.usage is not None:
        summary += f"; cached prompt tokens {last.usage.cached_tokens}"
    if last.error is not None:
        summary += f"; error {last.error.code}: {last.error.message}"
    print(summary + "]", file=sys.stderr)
    return 0 if last.finish_reason in ("stop", "length") else 1


async def _run(args: argparse.Namespace) -> int:
    servers = [url.strip() for url in args.nats.split(",") if url.strip()]
    client = NodeClient(servers, args.namespace, args.component, args.endpoint)
    try:
        await client.connect()
    except Exception as exc:  # noqa: BLE001 - a CLI reports and exits
        print(f"cannot connect to NATS at {args.nats}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "generate":
            return await _generate(client, args)
        if args.command == "embed":
            answer = await client.embed(
                EmbedRequest(request_id=uuid.uuid4().hex, input=list(args.texts))
            )
            print(encode_json(answer).decode())
            return 0 if answer.error is None else 1
        if args.command == "instances":
            for record in await client.instances():
                card = record.model
                print(
                    f"{record.instance_id}  {card.name}  mode={card.mode} backend={card.backend} "
                    f"dp={card.dp_size} blocks={card.total_kv_blocks}x{card.kv_block_size} "
                    f"host={record.host} pid={record.pid}"
                )
            return 0
        if args.command == "watch":
            async for item in client.watch(args.what):
                print(encode_json(item).decode(), flush=True)
            return 0
        if args.command == "tree":
            instance = args.instance
            if instance is None:
                records = await client.instances()
                if len(records) != 1:
                    print(
                        f"{len(records)} instances; name one: {[r.instance_id for r in records]}",
                        file=sys.stderr,
                    )
                    return 2
                instance = records[0].instance_id
            print(msgspec.json.format(msgspec.json.encode(await client.tree(instance))).decode())
            return 0
        if args.command == "cancel":
            await client.cancel(args.request_id)
            return 0
    except (NoRespondersError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        await client.close()
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m supervisor.client`."""
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
