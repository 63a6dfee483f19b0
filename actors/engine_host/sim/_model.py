"""The sim's "model": deterministic and autoregressive, so tests can predict its output and
a request continued from any point (its prompt followed by the tokens already generated)
goes on exactly as the uninterrupted one would.

The next token depends only on the context (prompt + tokens so far): after a letter of
`ALPHABET` comes the next letter ("a" → "b", ..., "z" → " ", " " → "a"); after anything
else (the end of most prompts) comes letter `h mod 27`, where `h` is a stable hash of the
whole context. So the answer to a prompt reads "klmnop...", and the answer to that prompt
followed by "klm" is "nop...". Sampling options (temperature, seed, top-p...) do not
change it: this is a simulation, not a sampler. The model never produces EOS (2) by
itself; a request ends at its `max_tokens`, a stop string or a stop token id, or at
`eos_token_id` only when that id is configured to one of the alphabet's tokens. Logprobs
are fake but well-formed.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence

from actors.engine_host.sim._tokenizer import BYTE_OFFSET
from messages.request import TokenLogprob

__all__ = [
    "ALPHABET",
    "LETTER_IDS",
    "expected_output",
    "fake_logprob",
    "next_token",
    "prompt_offset",
]

ALPHABET = "abcdefghijklmnopqrstuvwxyz "
_ALPHABET_IDS = [BYTE_OFFSET + ord(c) for c in ALPHABET]
_LETTER = {token: i for i, token in enumerate(_ALPHABET_IDS)}
LETTER_IDS = frozenset(_LETTER)  # a letter's successor depends on it alone
_LN2 = math.log(2.0)


def prompt_offset(prompt_token_ids: Sequence[int]) -> int:
    """A stable hash of a context, as a position in `ALPHABET` (SHA-256 of uint32-LE ids)."""
    packed = struct.pack(f"<{len(prompt_token_ids)}I", *prompt_token_ids)
    return int.from_bytes(hashlib.sha256(packed).digest()[:8], "big") % len(ALPHABET)


def next_token(context: Sequence[int]) -> int:
    """The token the sim generates after `context` (see the module docstring)."""
    position = _LETTER.get(context[-1]) if context else None
    if position is None:
        position = prompt_offset(context) - 1
    return _ALPHABET_IDS[(position + 1) % len(ALPHABET)]


def expected_output(prompt_token_ids: Sequence[int], n: int) -> list[int]:
    """The first `n` tokens the sim generates for this prompt, before any stop condition."""
    context = list(prompt_token_ids)
    out: list[int] = []
    for _ in range(n):
        token = next_token(context)
        out.append(token)
        context.append(token)
    return out


def fake_logprob(token: int, top_k: int) -> TokenLogprob:
    """A deterministic, honest-to-its-fakeness logprob for the chosen `token`.

    The chosen token has probability 1/2 and the next letters of the alphabet 1/4, 1/8...
    `top` lists the chosen token first, then `top_k - 1` alternatives (empty when 0).
    """
    alternatives = [token]
    for _ in range(max(0, top_k - 1)):
        alternatives.append(next_token(alternatives[-1:]))
    top = [(alt, -(j + 1) * _LN2) for j, alt in enumerate(alternatives[:top_k])]
    return TokenLogprob(token_id=token, logprob=-_LN2, top=top)
