"""The sim's byte-level tokenizer: one token per UTF-8 byte, offset past three specials."""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence

from messages.request import ChatMessage

__all__ = ["BOS_ID", "BYTE_OFFSET", "EOS_ID", "PAD_ID", "SimTokenizer", "StreamDecoder"]

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
BYTE_OFFSET = 3  # byte b is token b + 3, so byte tokens are 3..258
_LAST_BYTE_ID = BYTE_OFFSET + 255


def _bytes_of(ids: Iterable[int]) -> bytes:
    # Specials and ids outside the byte range have no text.
    return bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i <= _LAST_BYTE_ID)


class SimTokenizer:
    """Deterministic and reversible: `decode(encode(s)) == s` for every string."""

    vocab_floor = _LAST_BYTE_ID + 1  # the smallest vocabulary that holds every byte token

    @staticmethod
    def encode(text: str) -> list[int]:
        """Token ids of `text` (its UTF-8 bytes, each + 3); no BOS is added."""
        return [b + BYTE_OFFSET for b in text.encode()]

    @staticmethod
    def decode(ids: Sequence[int]) -> str:
        """Text of `ids`; specials are dropped, broken UTF-8 becomes U+FFFD."""
        return _bytes_of(ids).decode("utf-8", errors="replace")

    @staticmethod
    def apply_chat_template(messages: Sequence[ChatMessage]) -> str:
        """`<|role|>\\ncontent\\n` per message, then the assistant's turn opener."""
        turns = "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages)
        return turns + "<|assistant|>\n"


class StreamDecoder:
    """Incremental decoding: text deltas never split a multi-byte character.

    Bytes of an incomplete UTF-8 sequence are held back until it completes; `finish`
    flushes what is left (as U+FFFD when it never completed).
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, ids: Iterable[int]) -> str:
        """The text completed by `ids` (possibly empty)."""
        return self._decoder.decode(_bytes_of(ids), final=False)

    def finish(self) -> str:
        """Whatever was held back, decoded with replacement."""
        return self._decoder.decode(b"", final=True)
