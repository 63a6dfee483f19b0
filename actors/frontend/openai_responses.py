"""OpenAI's response bodies for `/v1/chat/completions` and `/v1/completions`, whole and as
stream chunks, one entry per choice: content, `reasoning_content`, `tool_calls`, usage and
logprobs, built from the choices' parsed output (`choices.py`, `choice_output.py`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from actors.frontend.choice_output import Delta, ToolCall, ToolCallDelta
from actors.frontend.choices import Choice
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

    def __init__(self, response_id: str, model: str, tokenizer: PromptTokenizer) -> None:
        self.id = response_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer

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
    def opening(self, choice: Choice) -> dict[str, Any] | None:
        """The chunk that opens a choice's stream, if the format has one."""
        return None

    def delta(
        self, choice: Choice, delta: Delta, logprobs: Sequence[TokenLogprob] | None
    ) -> dict[str, Any] | None:
        """A stream chunk with what `delta` adds to a choice (None: nothing to send)."""
        raise NotImplementedError

    def finish(self, choice: Choice) -> dict[str, Any]:
        """The stream chunk that carries a choice's finish reason."""
        raise NotImplementedError

    def whole(self, choices: Sequence[Choice], usage: Usage | None) -> dict[str, Any]:
        """The non-streaming response."""
        raise NotImplementedError


def _call_delta(call: ToolCallDelta) -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": call.arguments}
    body: dict[str, Any] = {"index": call.index, "function": function}
    if call.id is not None:
        body["id"], body["type"] = call.id, "function"
        function["name"] = call.name
    return body


def _call(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


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

    def _chunk(
        self, index: int, delta: dict[str, Any], finish: str | None, lp: Any
    ) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return self._envelope(self.object_chunk, [choice])

    def opening(self, choice: Choice) -> dict[str, Any]:
        return self._chunk(choice.index, {"role": "assistant", "content": ""}, None, None)

    def delta(
        self, choice: Choice, delta: Delta, logprobs: Sequence[TokenLogprob] | None
    ) -> dict[str, Any] | None:
        body: dict[str, Any] = {}
        if delta.reasoning:
            body["reasoning_content"] = delta.reasoning
        if delta.content:
            body["content"] = delta.content
        if delta.tool_calls:
            body["tool_calls"] = [_call_delta(c) for c in delta.tool_calls]
        if not body and not logprobs:
            return None
        return self._chunk(choice.index, body, None, self._logprobs(logprobs))

    def finish(self, choice: Choice) -> dict[str, Any]:
        return self._chunk(choice.index, {}, choice.finish_reason, None)

    def whole(self, choices: Sequence[Choice], usage: Usage | None) -> dict[str, Any]:
        entries = []
        for choice in choices:
            output = choice.output
            message: dict[str, Any] = {"role": "assistant", "content": output.message_content()}
            if output.reasoning:
                message["reasoning_content"] = output.reasoning
            if output.calls:
                message["tool_calls"] = [_call(c) for c in output.calls]
            entries.append(
                {
                    "index": choice.index,
                    "message": message,
                    "logprobs": self._logprobs(choice.logprobs),
                    "finish_reason": choice.finish_reason,
                }
            )
        return {**self._envelope(self.object_whole, entries), "usage": usage_body(usage)}


class CompletionFormat(OutputFormat):
    """`text_completion`, whole and streamed (with `echo` of each choice's prompt)."""

    object_whole = "text_completion"
    object_chunk = "text_completion"

    def __init__(
        self, response_id: str, model: str, tokenizer: PromptTokenizer, echoes: Sequence[str]
    ) -> None:
        super().__init__(response_id, model, tokenizer)
        self.echoes = list(echoes)  # per prompt ('' without echo)
        self._offsets: dict[int, int] = {}  # per choice: text offset for logprobs

    def _logprobs(self, choice: Choice, logprobs: Sequence[TokenLogprob] | None) -> Any:
        if logprobs is None:
            return None
        offset = self._offsets.get(choice.index, len(self.echoes[choice.prompt]))
        tokens, token_logprobs, tops, offsets = [], [], [], []
        for item in logprobs:
            token = self._token(item.token_id)
            tokens.append(token)
            token_logprobs.append(item.logprob)
            tops.append({self._token(tid): lp for tid, lp in item.top} if item.top else None)
            offsets.append(offset)
            offset += len(token)
        self._offsets[choice.index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _chunk(self, index: int, text: str, finish: str | None, lp: Any) -> dict[str, Any]:
        choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish}
        return self._envelope(self.object_chunk, [choice])

    def opening(self, choice: Choice) -> dict[str, Any] | None:
        echo = self.echoes[choice.prompt]
        return self._chunk(choice.index, echo, None, None) if echo else None

    def delta(
        self, choice: Choice, delta: Delta, logprobs: Sequence[TokenLogprob] | None
    ) -> dict[str, Any] | None:
        if not delta.content and not logprobs:
            return None
        return self._chunk(choice.index, delta.content, None, self._logprobs(choice, logprobs))

    def finish(self, choice: Choice) -> dict[str, Any]:
        return self._chunk(choice.index, "", choice.finish_reason, None)

    def whole(self, choices: Sequence[Choice], usage: Usage | None) -> dict[str, Any]:
        entries = [
            {
                "index": c.index,
                "text": self.echoes[c.prompt] + c.output.content,
                "logprobs": self._logprobs(c, c.logprobs),
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ]
        return {**self._envelope(self.object_whole, entries), "usage": usage_body(usage)}
