"""The engine requests of one OpenAI request, one per choice (`n`, and for
`/v1/completions` each prompt), followed together.

They are routed as a group (`RouteGroup`: the first attempt of each goes to the rank the
first one was routed to, so the engine shares their prompt's prefix); `start` waits for
each one's first output (or refusal) so that an error before any token gets its own HTTP
status; then `collect` reads them all to the end (a whole answer) or `events` merges their
chunks as they come (a stream). Each choice has its `ChoiceOutput` (the parsers).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from actors.frontend.choice_output import ChoiceOutput
from actors.frontend.dispatch import Dispatcher, RouteGroup
from actors.frontend.errors import FrontendError, from_node_error
from messages.request import GenerateRequest, StreamChunk, TokenLogprob, Usage

__all__ = ["Choice", "ChoiceSet", "end_error"]

T = TypeVar("T")
_ENDED_WELL = ("stop", "length")


def end_error(chunk: StreamChunk, input_param: str) -> FrontendError:
    """The error for a stream that ended other than `stop` / `length`."""
    if chunk.finish_reason == "error":
        return from_node_error(chunk.error, input_param=input_param)
    code = "shutdown" if chunk.finish_reason == "shutdown" else "cancelled"
    return FrontendError.of_code(code, f"the request ended early: {chunk.finish_reason}")


def _no_finish() -> FrontendError:
    return FrontendError.of_code("internal", "the stream ended without a finish reason")


async def _all(works: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run `works` concurrently; the first failure cancels the others and is raised. One
    work runs in the caller's task: a task and a gather cost two loop turns, and under load
    every turn on a request's way to its first token waits behind other streams' chunks."""
    pending = list(works)
    if len(pending) == 1:
        return [await pending[0]]
    tasks = [asyncio.ensure_future(work) for work in pending]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


@dataclass(eq=False)
class Choice:
    """One choice: its engine request, parsers and what came back."""

    index: int
    wire: GenerateRequest
    output: ChoiceOutput
    prompt: int = 0  # which prompt of the request (completions)
    taken: list[StreamChunk] = field(default_factory=list)  # read before the answer began
    final: StreamChunk | None = None
    logprobs: list[TokenLogprob] | None = None
    stream: AsyncGenerator[StreamChunk, None] | None = None

    @property
    def finish_reason(self) -> str:
        """OpenAI's finish reason (`tool_calls` when it stopped with calls)."""
        reason = self.final.finish_reason if self.final is not None else None
        return self.output.finish_reason(reason or "stop")

    def remember(self, chunk: StreamChunk) -> None:
        """Keep what the whole answer needs of `chunk` (logprobs, the final chunk)."""
        if chunk.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(chunk.logprobs)
        if chunk.finish_reason is not None:
            self.final = chunk


class ChoiceSet:
    """The choices of one request and their streams (see the module docstring)."""

    def __init__(self, dispatcher: Dispatcher, choices: Sequence[Choice], input_param: str):
        self.dispatcher = dispatcher
        self.choices = list(choices)
        self.input_param = input_param

    async def start(self) -> bool:
        """Open every stream and read up to its first output; raises the first refusal (all
        streams closed). True when some output came (not only finishes)."""
        group = RouteGroup()
        for choice in self.choices:
            choice.stream = self.dispatcher.generate(choice.wire, group)
        # Tasks run in the order they were made, and a stream routes before its first
        # await: the first choice routes the group, the others follow it.
        try:
            takens = await _all(self._first_output(c) for c in self.choices)
        except BaseException:
            await self.close()
            raise
        for choice, taken in zip(self.choices, takens, strict=True):
            choice.taken = taken
        for choice in self.choices:
            last = choice.taken[-1]
            if last.finish_reason is not None and last.finish_reason not in _ENDED_WELL:
                await self.close()
                raise end_error(last, self.input_param)
        return any(c.taken[-1].token_ids or c.taken[-1].text for c in self.choices)

    @staticmethod
    async def _first_output(choice: Choice) -> list[StreamChunk]:
        assert choice.stream is not None
        taken = []
        async for chunk in choice.stream:
            taken.append(chunk)
            if chunk.token_ids or chunk.text or chunk.finish_reason is not None:
                return taken
        raise _no_finish()

    async def _chunks(self, choice: Choice) -> AsyncGenerator[StreamChunk, None]:
        """The choice's chunks from the first one read, to the one with a finish reason."""
        for chunk in choice.taken:
            yield chunk
        if choice.taken[-1].finish_reason is not None:
            return
        assert choice.stream is not None
        async for chunk in choice.stream:
            yield chunk
            if chunk.finish_reason is not None:
                return

    async def collect(self) -> None:
        """Read every choice to its end (whole answers); raises the first failure."""

        async def one(choice: Choice) -> None:
            texts = []
            async for chunk in self._chunks(choice):
                choice.remember(chunk)
                texts.append(chunk.text)
            if choice.final is None:
                raise _no_finish()
            if choice.final.finish_reason not in _ENDED_WELL:
                raise end_error(choice.final, self.input_param)
            choice.output.whole("".join(texts))

        await _all(one(c) for c in self.choices)

    async def events(self) -> AsyncGenerator[tuple[Choice, StreamChunk], None]:
        """The chunks of every choice as they come (each choice's in order); a stream that
        ends without a finish reason gives an `internal` error chunk."""
        if len(self.choices) == 1:  # the usual case: no queue, no task switch per chunk
            only = self.choices[0]
            async with contextlib.aclosing(self._chunks(only)) as pieces:
                async for piece in pieces:
                    only.remember(piece)
                    yield only, piece
            if only.final is None:
                raise _no_finish()
            return
        queue: asyncio.Queue[tuple[Choice, StreamChunk | None]] = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            async for chunk in self._chunks(choice):
                await queue.put((choice, chunk))
            await queue.put((choice, None))

        tasks = [asyncio.ensure_future(pump(c)) for c in self.choices]
        try:
            running = len(tasks)
            while running:
                choice, chunk = await queue.get()
                if chunk is None:
                    running -= 1
                    if choice.final is None:
                        raise _no_finish()
                    continue
                choice.remember(chunk)
                yield choice, chunk
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def usage(self) -> Usage | None:
        """The request's usage: each prompt counted once (its first choice's figures, cached
        tokens included), the completion tokens of every choice."""
        finals = [c.final for c in self.choices]
        if any(f is None or f.usage is None for f in finals):
            return None
        firsts = {c.prompt: c.final.usage for c in reversed(self.choices) if c.final}
        prompt = sum(u.prompt_tokens for u in firsts.values() if u is not None)
        cached = sum(u.cached_tokens for u in firsts.values() if u is not None)
        completion = sum(f.usage.completion_tokens for f in finals if f and f.usage)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)

    async def close(self) -> None:
        """Close every stream (a stream not ended is cancelled on its node)."""
        for choice in self.choices:
            if choice.stream is not None:
                with contextlib.suppress(Exception):
                    await choice.stream.aclose()
