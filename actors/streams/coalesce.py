"""Coalescing engine output: the chunks of one request that reached the node together
become one chunk, so a node behind its engine publishes fewer, larger chunks.

The engine emits a chunk per request per scheduler step. When the node keeps up, each
batch it reads holds at most one chunk per request and nothing changes: a chunk per token,
the lowest latency. When it falls behind (a fast engine, a busy machine), a batch holds
several steps; merging a request's chunks then saves the per-chunk work of every hop after
it (stream table, JSON, NATS, the client or frontend), the way SGLang's `stream_interval`
does, but only when there is a backlog to merge. Tokens, text and logprobs are
concatenated in order; the last chunk's finish reason and usage stand. A chunk that ends
with an error, or carries embeddings, is never merged: what comes before it stays a chunk
of its own (the stream table decides about an error, e.g. a continuation, by itself).

Pure: no I/O.
"""

from __future__ import annotations

import msgspec

from messages.engine import HostChunk

__all__ = ["coalesce"]


def _mergeable(chunk: HostChunk) -> bool:
    return chunk.finish_reason in (None, "stop", "length") and chunk.embeddings is None


def _merged(run: list[HostChunk]) -> HostChunk:
    if len(run) == 1:
        return run[0]
    last = run[-1]
    logprobs = None
    if last.logprobs is not None:  # a run has logprobs on every chunk or on none
        logprobs = [lp for c in run for lp in c.logprobs or []]
    return msgspec.structs.replace(
        last,
        token_ids=[t for c in run for t in c.token_ids],
        text="".join(c.text for c in run),
        logprobs=logprobs,
    )


def coalesce(chunks: list[HostChunk]) -> list[HostChunk]:
    """`chunks` (in arrival order) with each request's consecutive mergeable chunks made
    one; requests keep the order of their first chunk, each request's chunks their order."""
    if len(chunks) < 2 or len({c.request_id for c in chunks}) == len(chunks):
        return chunks  # one chunk per request (the node keeps up): nothing to merge
    runs: dict[str, list[list[HostChunk]]] = {}  # insertion order: each request's first chunk
    for chunk in chunks:
        rid = chunk.request_id
        mine = runs.get(rid)
        if mine is None:
            runs[rid] = [[chunk]]
            continue
        run = mine[-1]
        before = run[-1]
        if (
            _mergeable(chunk)
            and before.finish_reason is None
            and before.embeddings is None
            and (chunk.logprobs is None) == (before.logprobs is None)
        ):
            run.append(chunk)
        else:
            mine.append([chunk])
    return [_merged(run) for mine in runs.values() for run in mine]
