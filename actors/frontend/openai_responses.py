"""OpenAI's response bodies: chat completions, completions (whole and as stream chunks),
usage and logprobs, built from the nodes' `StreamChunk`s."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from actors.frontend.tokenizers import PromptTokenizer
from messages.request import TokenLogprob, Usage

__all__ = ["ChatFormat", "CompletionFormat", "OutputFormat", "usage_body"]


def usage_body(usage: Usage | None) -> dict[str, Any] | None:
    """OpenAI's `usage`, with the prefix-cache hits in `prompt_tokens_details`."""
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class OutputFormat:
    """Shared by both formats: ids, model, creation time and the tokenizer for logprobs."""

    object_whole = ""
    object_chunk = ""

    def __init__(
        self, response_id: str, model: str, tokenizer: PromptTokenizer, echo: str = ""
    ) -> None:
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.echo = echo
        self._offset = len(echo)

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def usage_chunk(self, usage: Usage | None) -> dict[str, Any]:
        """The last chunk of a stream with `stream_options.include_usage`."""
        return {**self._envelope(self.object_chunk, []), "usage": usage_body(usage)}

    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # overridden per format
    def opening(self) -> dict[str, Any] | None:
        """The chunk that opens a stream, if the format has one."""
        return None

    def delta(self, text: str, logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any]:
        """A stream chunk with new text."""
        raise NotImplementedError

    def finish(self, finish_reason: str) -> dict[str, Any]:
        """The stream chunk that carries the finish reason."""
        raise NotImplementedError

    def whole(
        self,
        text: str,
        finish_reason: str,
        usage: Usage | None,
        logprobs: Sequence[TokenLogprob] | None,
    ) -> dict[str, Any]:
        """The non-streaming response."""
        raise NotImplementedError


class ChatFormat(OutputFormat):
    """`chat.completion` and `chat.completion.chunk`."""

    object_whole = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def _logprobs(self, logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        content = []
        for item in logprobs:
            entry = self._entry(item.token_id, item.logprob)
            entry["top_logprobs"] = [self._entry(tid, lp) for tid, lp in item.top]
            content.append(entry)
        return {"content": content}

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        token = self._token(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    def _choice(self, delta: dict[str, Any], finish: str | None, lp: Any) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}

    def opening(self) -> dict[str, Any]:
        return self._envelope(
            self.object_chunk, [self._choice({"role": "assistant", "content": ""}, None, None)]
        )

    def delta(self, text: str, logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any]:
        choice = self._choice({"content": text}, None, self._logprobs(logprobs))
        return self._envelope(self.object_chunk, [choice])

    def finish(self, finish_reason: str) -> dict[str, Any]:
        return self._envelope(self.object_chunk, [self._choice({}, finish_reason, None)])

    def whole(
        self,
        text: str,
        finish_reason: str,
        usage: Usage | None,
        logprobs: Sequence[TokenLogprob] | None,
    ) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": self._logprobs(logprobs),
            "finish_reason": finish_reason,
        }
        return {**self._envelope(self.object_whole, [choice]), "usage": usage_body(usage)}


class CompletionFormat(OutputFormat):
    """`text_completion`, whole and streamed (with `echo` of the prompt)."""

    object_whole = "text_completion"
    object_chunk = "text_completion"

    def _logprobs(self, logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for item in logprobs:
            token = self._token(item.token_id)
            tokens.append(token)
            token_logprobs.append(item.logprob)
            tops.append({self._token(tid): lp for tid, lp in item.top} if item.top else None)
            offsets.append(self._offset)
            self._offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _choice(self, text: str, finish: str | None, lp: Any) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}

    def opening(self) -> dict[str, Any] | None:
        if not self.echo:
            return None
        return self._envelope(self.object_chunk, [self._choice(self.echo, None, None)])

    def delta(self, text: str, logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any]:
        choice = self._choice(text, None, self._logprobs(logprobs))
        return self._envelope(self.object_chunk, [choice])

    def finish(self, finish_reason: str) -> dict[str, Any]:
        return self._envelope(self.object_chunk, [self._choice("", finish_reason, None)])

    def whole(
        self,
        text: str,
        finish_reason: str,
        usage: Usage | None,
        logprobs: Sequence[TokenLogprob] | None,
    ) -> dict[str, Any]:
        choice = self._choice(self.echo + text, finish_reason, self._logprobs(logprobs))
        return {**self._envelope(self.object_whole, [choice]), "usage": usage_body(usage)}
