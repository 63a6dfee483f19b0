"""Request validation, pure: what a request's prompt is, and which limit it breaks.

Every refusal is a `Refused` with a stable error code (`messages.request.ERROR_CODES`)
and a message that names the limit, e.g. "the prompt has 65 tokens, over the context
length 64".
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from actors.engine_host.sim._kv_cache import pages_for
from actors.engine_host.sim._tokenizer import SimTokenizer
from messages.engine import HostGenerate

if TYPE_CHECKING:
    from supervisor.config import SimSection

__all__ = ["Refused", "check_limits", "prompt_ids"]


class Refused(Exception):
    """A request the engine will not run: `code` is its error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


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
        raise Refused("invalid_request", f"{given[0]} is empty")
    if cmd.token_ids is not None:
        bad = [t for t in cmd.token_ids if not 0 <= t < vocab_size]
        if bad:
            raise Refused(
                "invalid_request",
                f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})",
            )
        return list(cmd.token_ids)
    if cmd.messages is not None:
        return tokenizer.encode(tokenizer.apply_chat_template(cmd.messages))
    assert cmd.prompt is not None
    return tokenizer.encode(cmd.prompt)


def check_limits(cmd: HostGenerate, n: int, sim: SimSection, page_size: int, dp_size: int) -> None:
    """Refuse a prompt of `n` tokens that breaks a length, KV or DP-rank limit."""
    ctx, max_tokens = sim.context_length, cmd.stop.max_tokens
    if n > ctx:
        raise Refused(
            "invalid_request", f"the prompt has {n} tokens, over the context length {ctx}"
        )
    if cmd.max_prompt_tokens > 0 and n > cmd.max_prompt_tokens:
        raise Refused(
            "invalid_request",
            f"the prompt has {n} tokens, over max_prompt_tokens {cmd.max_prompt_tokens}",
        )
    if n + max_tokens > ctx:
        raise Refused(
            "invalid_request",
            f"the prompt ({n} tokens) plus max_tokens ({max_tokens}) exceeds the context "
            f"length {ctx}",
        )
    # Its worst case must fit in an empty cache (the last token never gets KV).
    pages = pages_for(n + max_tokens - 1, page_size)
    if pages > sim.num_blocks:
        raise Refused(
            "invalid_request",
            f"the request needs {pages} KV pages, more than the cache's num_blocks "
            f"{sim.num_blocks}",
        )
    if cmd.dp_rank is not None and not 0 <= cmd.dp_rank < dp_size:
        raise Refused(
            "invalid_request", f"dp_rank {cmd.dp_rank} is out of range (dp_size {dp_size})"
        )
