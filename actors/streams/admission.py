"""The checks of a generate request against the handlers' limits (pure functions)."""

from __future__ import annotations

import json

from messages.request import GenerateRequest
from supervisor.config import HandlersSection

__all__ = ["limit_problem", "request_id_of"]


def limit_problem(request: GenerateRequest, limits: HandlersSection) -> tuple[str, str] | None:
    """The first limit the request breaks: (field, message), or None."""
    problem = request.input_problem()
    if problem is not None:
        return request.input_field(), problem
    if request.stop.max_tokens > limits.max_tokens_limit:
        return "stop.max_tokens", (
            f"max_tokens {request.stop.max_tokens} exceeds the limit "
            f"{limits.max_tokens_limit} (handlers.max_tokens_limit)"
        )
    if request.stop.min_tokens > request.stop.max_tokens:
        return "stop.min_tokens", "min_tokens exceeds max_tokens"
    if request.token_ids is not None and len(request.token_ids) > limits.max_prompt_tokens:
        return "token_ids", (
            f"the prompt has {len(request.token_ids)} tokens; the limit is "
            f"{limits.max_prompt_tokens} (handlers.max_prompt_tokens)"
        )
    return None


def request_id_of(data: bytes) -> str:
    """Best effort: the request_id of a request that did not decode, to label the error."""
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):  # malformed, invalid UTF-8, absurdly deep
        return ""
    rid = value.get("request_id") if isinstance(value, dict) else None
    return rid if isinstance(rid, str) and len(rid) <= 128 else ""
