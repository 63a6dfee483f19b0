"""One request in the sim: its tokens, its stop conditions and its streamed text.

`advance()` generates the next token and returns the chunk that carries it; the chunk
that ends the request has `finish_reason` and `usage`. Text follows SGLang's defaults:
a matched stop string is not part of the text, nor is a matched stop token (its id is in
`token_ids`); text that might be the start of a stop string is held back until it is
known not to be, and incomplete UTF-8 is held back too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.engine_host.sim._kv_cache import KvSequence
from actors.engine_host.sim._model import LETTER_IDS, fake_logprob, next_token
from actors.engine_host.sim._tokenizer import StreamDecoder
from messages.engine import HostChunk
from messages.request import OutputOptions, StopConditions, TokenLogprob, Usage

__all__ = ["SimRequest"]


@dataclass(eq=False)
class SimRequest:
    """A request's state, owned by its rank's scheduler (under the rank's lock)."""

    request_id: str
    prompt: list[int]
    stop: StopConditions
    output: OutputOptions
    eos_token_id: int
    priority: int = 0
    arrival: int = 0
    output_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    kv: KvSequence | None = None
    aborted: bool = False
    finish_reason: str | None = None
    # guided decoding: the tokens of the document the schema allows, then EOS (_guided.py)
    forced: list[int] | None = None
    # A continuation: how many of `prompt`'s last tokens an earlier attempt generated. Their
    # text counts as already produced (stop strings may straddle the seam, text they left
    # held back is sent now), as if one request had generated all of it.
    continued: int = 0
    _decoder: StreamDecoder = field(default_factory=StreamDecoder)
    _text: str = ""  # decoded so far (minus a matched stop)
    _sent: int = 0  # characters of _text already streamed

    @property
    def reserve_tokens(self) -> int:
        """Tokens of KV this request may hold at most (the last token never gets KV)."""
        return len(self.prompt) + self.stop.max_tokens - 1

    @property
    def kv_tokens(self) -> list[int]:
        """The tokens whose KV exists (SGLang's kv_committed_len)."""
        return self.prompt + self.output_ids[:-1] if self.output_ids else list(self.prompt)

    def usage(self) -> Usage:
        """Token counts so far."""
        return Usage(
            prompt_tokens=len(self.prompt),
            completion_tokens=len(self.output_ids),
            cached_tokens=self.cached_tokens,
        )

    def __post_init__(self) -> None:
        if self.continued:
            self._text = self._decoder.feed(self.prompt[-self.continued :])
            self._sent = len(self._text) - self._held_back()

    def advance(self) -> HostChunk:
        """Generate one token and return its chunk (the last one ends the request)."""
        i = len(self.output_ids)
        forced = self.forced
        guided_done = forced is not None and i >= len(forced)  # the grammar allows only EOS
        if forced is None:
            last = self.output_ids[-1:]
            context = last if last and last[0] in LETTER_IDS else self.prompt + self.output_ids
            token = next_token(context)
        else:
            token = forced[i] if i < len(forced) else self.eos_token_id
        self.output_ids.append(token)
        stops_now = len(self.output_ids) >= self.stop.min_tokens
        matched_token = guided_done or (
            stops_now
            and (
                token in self.stop.stop_token_ids
                or (token == self.eos_token_id and not self.stop.ignore_eos)
            )
        )
        if matched_token:  # its text is left out, what was before it is flushed
            self.finish_reason = "stop"
            self._text += self._decoder.finish()
        else:
            self._text += self._decoder.feed([token])
            if stops_now and self._cut_at_stop_string():
                self.finish_reason = "stop"  # bytes after the stop string are dropped
            elif len(self.output_ids) >= self.stop.max_tokens:
                self.finish_reason = "length"
                self._text += self._decoder.finish()
        logprobs = None
        if self.output.logprobs is not None:
            logprobs = [fake_logprob(token, self.output.logprobs)]
        return self._chunk([token], logprobs)

    def end(self, reason: str) -> HostChunk:
        """End the request without a new token (`cancelled`): flush held text."""
        self.finish_reason = reason
        self._text += self._decoder.finish()
        return self._chunk([], None)

    def fail(self, code: str, message: str) -> HostChunk:
        """End the request with an error (`code` from messages.request.ERROR_CODES)."""
        self.finish_reason = "error"
        return HostChunk(
            request_id=self.request_id,
            finish_reason="error",
            usage=self.usage(),
            error_code=code,
            error_message=message,
        )

    def _cut_at_stop_string(self) -> bool:
        # A match cannot start in text already sent: text that could begin one is held.
        hits = [i for s in self.stop.stop if (i := self._text.find(s, self._sent)) >= 0]
        if hits:
            self._text = self._text[: min(hits)]
        return bool(hits)

    def _held_back(self) -> int:
        # The longest unsent suffix that is a proper prefix of some stop string.
        pending = self._text[self._sent :]
        longest = 0
        for s in self.stop.stop:
            for n in range(min(len(s) - 1, len(pending)), longest, -1):
                if pending.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _chunk(self, tokens: list[int], logprobs: list[TokenLogprob] | None) -> HostChunk:
        done = self.finish_reason is not None
        end = len(self._text) if done else len(self._text) - self._held_back()
        text, self._sent = self._text[self._sent : end], max(self._sent, end)
        return HostChunk(
            request_id=self.request_id,
            token_ids=tokens,
            text=text if self.output.text else "",
            finish_reason=self.finish_reason,
            usage=self.usage() if done else None,
            logprobs=logprobs,
        )
