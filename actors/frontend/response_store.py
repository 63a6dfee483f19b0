"""`ResponseStore`: the Responses API's stored responses, for `previous_response_id` and
`GET /v1/responses/{id}`.

Bounded and expiring: at most `frontend.responses_store_size` responses (the oldest go
first) and each for `frontend.responses_ttl` seconds after it was made. It lives in the
frontend's memory: another frontend (or this one after a restart) does not know the ids.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actors.frontend.openai_formats import ChatMessageIn

__all__ = ["ResponseStore", "StoredResponse"]


@dataclass(frozen=True)
class StoredResponse:
    """A response as answered, and the conversation a follow-up continues (without the
    instructions, which do not carry over)."""

    body: dict[str, Any]
    conversation: tuple[ChatMessageIn, ...]
    stored_at: float


class ResponseStore:
    """See the module docstring; `clock` is injectable for tests."""

    def __init__(self, size: int, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl = ttl
        self.clock = clock
        self._kept: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        self._expire()
        return len(self._kept)

    def put(
        self, response_id: str, body: dict[str, Any], conversation: list[ChatMessageIn]
    ) -> bool:
        """Keep a response; False when the store keeps none (size 0)."""
        if self.size <= 0:
            return False
        self._kept[response_id] = StoredResponse(body, tuple(conversation), self.clock())
        self._kept.move_to_end(response_id)
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, or None (never stored, evicted or expired)."""
        self._expire()
        return self._kept.get(response_id)

    def delete(self, response_id: str) -> bool:
        """Forget a response; whether it was there."""
        self._expire()
        return self._kept.pop(response_id, None) is not None

    def _expire(self) -> None:
        now = self.clock()
        while self._kept:
            oldest = next(iter(self._kept.values()))
            if now - oldest.stored_at <= self.ttl:
                return
            self._kept.popitem(last=False)
