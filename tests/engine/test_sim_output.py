"""The sim's tokenizer, deterministic model and stop handling (pure, no engine)."""

from __future__ import annotations

import math

import pytest

from actors.engine_host.sim import ALPHABET, SimTokenizer, StreamDecoder, expected_output
from actors.engine_host.sim._request import SimRequest
from messages.engine import HostChunk
from messages.request import ChatMessage, OutputOptions, StopConditions

tok = SimTokenizer()


def test_encoding_is_the_utf8_bytes_plus_three_and_decoding_reverses_it() -> None:
    text = "héllo € 😀"
    assert tok.encode("ab") == [ord("a") + 3, ord("b") + 3]
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode([0, 1, 2, *tok.encode("x"), 259, 5000]) == "x"  # specials, out of range
    assert tok.decode([0xC3 + 3]) == "\ufffd"  # a lone lead byte


def test_the_chat_template_marks_roles_and_opens_the_assistant_turn() -> None:
    messages = [
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="hi"),
    ]
    assert (
        tok.apply_chat_template(messages) == "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n"
    )


def test_stream_decoding_never_splits_a_multibyte_character() -> None:
    text = "aé€😀b"
    decoder = StreamDecoder()
    deltas = [decoder.feed([t]) for t in tok.encode(text)]
    assert "".join(deltas) + decoder.finish() == text
    assert all(d in ("", "a", "é", "€", "😀", "b") for d in deltas)
    assert deltas[1:3] == ["", "é"]


def test_an_incomplete_character_is_replaced_only_at_the_end() -> None:
    decoder = StreamDecoder()
    assert decoder.feed(tok.encode("€")[:2]) == ""
    assert decoder.finish() == "\ufffd"


def test_expected_output_is_deterministic_readable_and_prompt_dependent() -> None:
    a = expected_output([10, 11, 12], 40)
    assert a == expected_output([10, 11, 12], 40)
    assert expected_output([10, 11, 12], 5) == a[:5]
    assert set(tok.decode(a)) <= set(ALPHABET)
    assert tok.decode(a) in (ALPHABET * 3)  # consecutive letters
    offsets = {tok.decode(expected_output([n], 1)) for n in range(100)}
    assert len(offsets) > 10


def request(
    prompt: list[int] | None = None,
    *,
    eos: int = 2,
    output: OutputOptions | None = None,
    **stop: object,
) -> SimRequest:
    return SimRequest(
        request_id="r",
        prompt=prompt or [50, 60, 70],
        stop=StopConditions(**stop),  # type: ignore[arg-type]
        output=output or OutputOptions(),
        eos_token_id=eos,
    )


def run(req: SimRequest) -> list[HostChunk]:
    chunks = [req.advance()]
    while chunks[-1].finish_reason is None:
        chunks.append(req.advance())
    return chunks


def text_of(chunks: list[HostChunk]) -> str:
    return "".join(c.text for c in chunks)


def test_max_tokens_ends_with_length_and_usage() -> None:
    chunks = run(request(max_tokens=7))
    assert [len(c.token_ids) for c in chunks] == [1] * 7
    assert [t for c in chunks for t in c.token_ids] == expected_output([50, 60, 70], 7)
    assert text_of(chunks) == tok.decode(expected_output([50, 60, 70], 7))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7
    assert all(c.usage is None for c in chunks[:-1])


def full_text(prompt: list[int], n: int = 60) -> str:
    return tok.decode(expected_output(prompt, n))


def test_a_stop_string_ends_the_request_and_is_left_out_of_the_text() -> None:
    prompt = [50, 60, 70]
    text = full_text(prompt)
    stop = text[10:13]
    chunks = run(request(prompt, max_tokens=60, stop=[stop]))
    assert chunks[-1].finish_reason == "stop"
    assert text_of(chunks) == text[:10]
    assert len(chunks) == 13  # the token that completed the match is still delivered


def test_text_that_may_start_a_stop_string_is_held_back_until_it_does_not() -> None:
    prompt = [50, 60, 70]
    text = full_text(prompt)
    chunks = run(request(prompt, max_tokens=8, stop=[text[3:5] + "#"]))
    assert chunks[3].text == ""
    assert chunks[4].text == ""
    assert chunks[5].text == text[3:6]  # it was not
    assert text_of(chunks) == text[:8]
    assert chunks[-1].finish_reason == "length"


def test_a_stop_token_id_ends_the_request_and_its_text_is_left_out() -> None:
    prompt = [50, 60, 70]
    out = expected_output(prompt, 30)
    chunks = run(request(prompt, max_tokens=30, stop_token_ids=[out[4]]))
    assert chunks[-1].finish_reason == "stop"
    assert [t for c in chunks for t in c.token_ids] == out[:5]
    assert text_of(chunks) == tok.decode(out[:4])


def test_min_tokens_defers_every_stop_condition() -> None:
    prompt = [50, 60, 70]
    out = expected_output(prompt, 60)
    chunks = run(request(prompt, max_tokens=60, min_tokens=10, stop_token_ids=[out[2]]))
    assert len(chunks) == 30  # the next occurrence: 27 letters later
    assert chunks[-1].finish_reason == "stop"


def test_eos_counts_only_when_configured_inside_the_alphabet_and_not_ignored() -> None:
    prompt = [50, 60, 70]
    out = expected_output(prompt, 10)
    assert run(request(prompt, eos=out[3], max_tokens=10))[-1].finish_reason == "stop"
    ignored = run(request(prompt, eos=out[3], max_tokens=10, ignore_eos=True))
    assert ignored[-1].finish_reason == "length"
    assert run(request(prompt, max_tokens=10))[-1].finish_reason == "length"  # EOS 2: never


def test_text_can_be_turned_off_and_logprobs_are_fake_but_well_formed() -> None:
    chunks = run(request(max_tokens=3, output=OutputOptions(text=False, logprobs=3)))
    assert text_of(chunks) == ""
    for c in chunks:
        assert c.logprobs is not None
        [lp] = c.logprobs
        assert lp.token_id == c.token_ids[0]
        assert lp.top[0] == (lp.token_id, lp.logprob)
        assert len(lp.top) == 3
        assert sum(math.exp(p) for _, p in lp.top) <= 1.0
    assert all(c.logprobs is None for c in run(request(max_tokens=2)))


@pytest.mark.parametrize("reason", ["cancelled"])
def test_ending_early_flushes_held_text_and_reports_usage(reason: str) -> None:
    prompt = [50, 60, 70]
    text = full_text(prompt)
    req = request(prompt, max_tokens=20, stop=[text[0:2] + "#"])
    first = req.advance()
    assert first.text == ""
    last = req.end(reason)
    assert (last.text, last.finish_reason, last.token_ids) == (text[0], reason, [])
    assert last.usage is not None
    assert last.usage.completion_tokens == 1
