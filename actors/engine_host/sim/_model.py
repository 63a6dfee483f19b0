"""The sim's "model": a deterministic function of the prompt, so tests can predict output.

Token i of the answer to a prompt is letter `(h + i) mod 27` of `ALPHABET`, where `h` is
a stable hash of the prompt's token ids. The text is therefore readable ("klmnop...").
Sampling options (temperature, seed, top-p...) do not change it: this is a simulation,
not a sampler. The model never produces EOS (2) by itself; a request ends at its
`max_tokens`, a stop string or a stop token id, or at `eos_token_id` only when that id is
configured to one of the alphabet's tokens. Logprobs are fake but well-formed.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence

from actors.engine_host.sim._tokenizer import BYTE_OFFSET
from messages.request import TokenLogprob

__all__ = ["ALPHABET", "expected_output", "fake_logprob", "prompt_offset", "token_at"]

ALPHABET = "abcdefghijklmnopqrstuvwxyz "
_ALPHABET_IDS = [BYTE_OFFSET + ord(c) for c in ALPHABET]
_LN2 = math.log(2.0)


def prompt_offset(prompt_token_ids: Sequence[int]) -> int:
    """Where in `ALPHABET` the answer to this prompt starts (SHA-256 of uint32-LE ids)."""
    packed = struct.pack(f"<{len(prompt_token_ids)}I", *prompt_token_ids)
    return int.from_bytes(hashlib.sha256(packed).digest()[:8], "big") % len(ALPHABET)


def token_at(offset: int, i: int) -> int:
    """Token `i` (0-based) of the answer whose prompt has `offset`."""
    return _ALPHABET_IDS[(offset + i) % len(ALPHABET)]


def expected_output(prompt_token_ids: Sequence[int], n: int) -> list[int]:
    """The first `n` tokens the sim generates for this prompt, before any stop condition."""
    offset = prompt_offset(prompt_token_ids)
    return [token_at(offset, i) for i in range(n)]


def fake_logprob(offset: int, i: int, top_k: int) -> TokenLogprob:
    """A deterministic, honest-to-its-fakeness logprob for token `i`.

    The chosen token has probability 1/2 and the next letters of the alphabet 1/4, 1/8...
    `top` lists the chosen token first, then `top_k - 1` alternatives (empty when 0).
    """
    top = [(token_at(offset, i + j), -(j + 1) * _LN2) for j in range(top_k)]
    return TokenLogprob(token_id=token_at(offset, i), logprob=-_LN2, top=top)
