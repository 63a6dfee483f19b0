"""The sim continues a request exactly: its model is autoregressive, so the prompt followed
by the first k tokens of an answer (a continuation) yields that answer from k on, with its
text, stop strings that straddle the seam, and a JSON-schema document advanced by the
prefix. What migration relies on to be checkable token for token."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.engine_host.sim import SimTokenizer, expected_output
from actors.engine_host.sim._model import next_token
from messages.engine import HostGenerate
from messages.request import SamplingOptions, StopConditions
from tests.engine.test_sim_harness import running_sim, text_of, tokens_of

tok = SimTokenizer()


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.lists(st.integers(3, 300), min_size=1, max_size=40),
    n=st.integers(1, 60),
    k=st.integers(0, 60),
)
def test_continuing_from_any_prefix_of_an_answer_gives_the_rest_of_it(
    prompt: list[int], n: int, k: int
) -> None:
    k = min(k, n)
    answer = expected_output(prompt, n)
    assert expected_output(prompt + answer[:k], n - k) == answer[k:]
    assert answer[0] == next_token(prompt)


def test_a_continued_request_streams_the_rest_of_the_answer_and_its_text() -> None:
    prompt = "tell me a story"
    whole = expected_output(tok.encode(prompt), 20)
    with running_sim() as (engine, out):
        engine.submit(
            HostGenerate(
                request_id="c",
                prompt=prompt,
                stop=StopConditions(max_tokens=12),
                continuation_ids=whole[:8],
            )
        )
        chunks = out.wait_done("c")
    assert tokens_of(chunks) == whole[8:20]
    assert text_of(chunks) == tok.decode(whole[8:20])
    usage = chunks[-1].usage
    assert usage is not None
    # as SGLang counts it: what came before the new tokens is prompt
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(tok.encode(prompt)) + 8, 12)


def test_a_stop_string_that_straddles_the_seam_still_stops() -> None:
    prompt = "the quick brown fox"
    whole = expected_output(tok.encode(prompt), 30)
    text = tok.decode(whole)
    stop = text[6:10]  # four letters: the seam falls between its second and third
    with running_sim() as (engine, out):
        engine.submit(
            HostGenerate(
                request_id="whole", prompt=prompt, stop=StopConditions(max_tokens=30, stop=[stop])
            )
        )
        engine.submit(
            HostGenerate(
                request_id="cont",
                prompt=prompt,
                stop=StopConditions(max_tokens=22, stop=[stop]),
                continuation_ids=whole[:8],
            )
        )
        uninterrupted = out.wait_done("whole")
        continued = out.wait_done("cont")
    assert uninterrupted[-1].finish_reason == "stop"
    assert continued[-1].finish_reason == "stop"
    # the same tokens, seam or no seam: the stop completes on the token after index 9
    assert tokens_of(uninterrupted)[8:] == tokens_of(continued)
    assert len(tokens_of(uninterrupted)) == 10
    # the text held back before the seam (a possible start of the stop) is not lost
    assert text_of(uninterrupted) == text[:6]
    assert text_of(continued) == ""  # "stop"'s start was held back, then matched


def test_a_json_schema_document_continues_from_its_prefix() -> None:
    schema = json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    )
    sampling = SamplingOptions(json_schema=schema)
    with running_sim() as (engine, out):
        engine.submit(HostGenerate(request_id="w", prompt="where?", sampling=sampling))
        whole = tokens_of(out.wait_done("w"))
        engine.submit(
            HostGenerate(
                request_id="c", prompt="where?", sampling=sampling, continuation_ids=whole[:5]
            )
        )
        continued = out.wait_done("c")
        engine.submit(
            HostGenerate(
                request_id="bad", prompt="where?", sampling=sampling, continuation_ids=[100, 101]
            )
        )
        refused = out.wait_done("bad")
    assert whole[:5] + tokens_of(continued) == whole
    json.loads(tok.decode(whole[:-1]))  # a valid document, then EOS
    assert refused[-1].error_code == "invalid_request"
    assert refused[-1].error_field == "sampling.json_schema"
