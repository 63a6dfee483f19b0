"""What each serving mode (`node.mode`) does to a generate request before the engine.

- aggregated: nothing.
- prefill: the request gets bootstrap info (the router's, or this node's bootstrap
  server and a fresh room), only the prefill runs (one token; of a continuation, the
  prompt and the tokens so far, then one), and the client's first chunk carries the
  bootstrap info so the decode side can be sent the same.
- decode: the request must carry bootstrap info from a prefill node.
- embedding: generate requests are refused (embedding nodes take EmbedRequest).
"""

from __future__ import annotations

import secrets

import msgspec

from messages.request import BootstrapInfo, GenerateRequest, StreamChunk
from supervisor.config import DisaggregationSection

__all__ = ["Shaped", "shape_request"]


class Shaped(msgspec.Struct, frozen=True):
    """A request ready for the engine, the chunk to send first (if any), or a refusal."""

    request: GenerateRequest | None = None
    first: StreamChunk | None = None
    problem: tuple[str, str] | None = None  # (field, message)


def shape_request(request: GenerateRequest, mode: str, disagg: DisaggregationSection) -> Shaped:
    """Apply `mode` to `request` (see the module docstring)."""
    if mode == "prefill":
        info = request.bootstrap_info or BootstrapInfo(
            host=disagg.bootstrap_host, port=disagg.bootstrap_port, room=secrets.randbits(63)
        )
        # One token past what the client has: a continuation (a pair that goes on after
        # its decode node was lost) prefills the prompt and the tokens so far.
        cont = request.continuation
        had = len(cont.token_ids) if cont is not None else 0
        stop = msgspec.structs.replace(request.stop, max_tokens=had + 1, min_tokens=0)
        shaped = msgspec.structs.replace(request, bootstrap_info=info, stop=stop)
        index = cont.next_index if cont is not None else 0
        first = StreamChunk(request_id=request.request_id, index=index, bootstrap_info=info)
        return Shaped(request=shaped, first=first)
    if mode == "decode" and request.bootstrap_info is None:
        why = "this is a decode node: send bootstrap_info from a prefill node (host, port, room)"
        return Shaped(problem=("bootstrap_info", why))
    if mode == "embedding":
        return Shaped(problem=("", "this is an embedding node: send an EmbedRequest (input)"))
    return Shaped(request=request)
