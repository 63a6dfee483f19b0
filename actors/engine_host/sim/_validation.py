"""Request validation, pure: what a request's prompt is, and which limit it breaks.

Every refusal is a `Refused` with a stable error code (`messages.request.ERROR_CODES`)
and a message that names the limit, e.g. "the prompt has 65 tokens, over the context
length 64".
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

from actors.engine_host.sim._kv_cache import pages_for
from actors.engine_host.sim._tokenizer import SimTokenizer
from messages.engine import HostGenerate

if TYPE_CHECKING:
    from supervisor.config import SimSection

__all__ = ["Refused", "check_guidance", "check_limits", "prompt_ids"]


class Refused(Exception):
    """A request the engine will not run: `code` is its error code, `field` the request's
    dotted path at fault ('' when no single field is)."""

    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.field = field


def prompt_ids(cmd: HostGenerate, tokenizer: SimTokenizer, vocab_size: int) -> list[int]:
    """The prompt's token ids, from exactly one of token_ids / prompt / messages."""
    forms = {"token_ids": cmd.token_ids, "prompt": cmd.prompt, "messages": cmd.messages}
    given = [name for name, value in forms.items() if value is not None]
    if len(given) != 1:
        raise Refused(
            "invalid_request",
            f"give exactly one of token_ids, prompt, messages (got {given or 'none'})",
        )
    if not forms[given[0]]:
        raise Refused("invalid_request", f"{given[0]} is empty", given[0])
    if cmd.token_ids is not None:
        bad = [t for t in cmd.token_ids if not 0 <= t < vocab_size]
        if bad:
            raise Refused(
                "invalid_request",
                f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})",
                "token_ids",
            )
        return list(cmd.token_ids)
    if cmd.messages is not None:
        return tokenizer.encode(tokenizer.apply_chat_template(cmd.messages))
    assert cmd.prompt is not None
    return tokenizer.encode(cmd.prompt)


def check_guidance(cmd: HostGenerate) -> None:
    """Refuse guided decoding the sim (like an engine) cannot compile: a `json_schema` that
    is not a JSON object or boolean, a `regex` that is not a valid (Python) regex."""
    schema, pattern = cmd.sampling.json_schema, cmd.sampling.regex
    if schema is not None:
        try:
            parsed = json.loads(schema)
        except ValueError as exc:
            why = f"json_schema is not JSON: {exc}"
            raise Refused("invalid_request", why, "sampling.json_schema") from None
        if not isinstance(parsed, dict | bool):
            why = f"json_schema must be a JSON object (a schema), not {type(parsed).__name__}"
            raise Refused("invalid_request", why, "sampling.json_schema")
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise Refused(
                "invalid_request", f"regex does not compile: {exc}", "sampling.regex"
            ) from None


def check_limits(cmd: HostGenerate, n: int, sim: SimSection, page_size: int, dp_size: int) -> None:
    """Refuse a prompt of `n` tokens that breaks a length, KV or DP-rank limit (the
    refusal names the field at fault: the prompt's, `stop.max_tokens` or `dp_rank`)."""
    ctx, max_tokens = sim.context_length, cmd.stop.max_tokens
    prompt = cmd.input_field()
    if n > ctx:
        raise Refused(
            "invalid_request", f"the prompt has {n} tokens, over the context length {ctx}", prompt
        )
    if cmd.max_prompt_tokens > 0 and n > cmd.max_prompt_tokens:
        raise Refused(
            "invalid_request",
            f"the prompt has {n} tokens, over max_prompt_tokens {cmd.max_prompt_tokens} "
            "(handlers.max_prompt_tokens)",
            prompt,
        )
    if n + max_tokens > ctx:
        raise Refused(
            "invalid_request",
            f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds the context "
            f"length {ctx}",
            "stop.max_tokens",
        )
    # Its worst case must fit in an empty cache (the last token never gets KV).
    pages = pages_for(n + max_tokens - 1, page_size)
    if pages > sim.num_blocks:
        # the prompt alone, or what max_tokens adds to it
        at_fault = prompt if pages_for(n, page_size) > sim.num_blocks else "stop.max_tokens"
        raise Refused(
            "invalid_request",
            f"the request needs {pages} KV pages, more than the cache's num_blocks "
            f"{sim.num_blocks}",
            at_fault,
        )
    if cmd.dp_rank is not None and not 0 <= cmd.dp_rank < dp_size:
        raise Refused(
            "invalid_request",
            f"dp_rank {cmd.dp_rank} is out of range (dp_size {dp_size})",
            "dp_rank",
        )
