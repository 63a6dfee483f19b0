"""The request surface, mapped onto SGLang's sampling parameters, with the real engine:
stop strings and token ids, ignore_eos, min_tokens, top-k/top-p/min-p, penalties, logprobs
per chunk, guided decoding (JSON schema, regex), deadlines, cached-token usage; each test
fails if its feature were ignored. Seed and priority are only accepted (see their tests)."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import Any

import pytest

from messages.request import (
    ChatMessage,
    GenerateRequest,
    OutputOptions,
    SamplingOptions,
    StopConditions,
    StreamChunk,
)
from supervisor.client import NodeClient
from tests.node.harness import NodeProcess
from tests.supervision.children import wait_until

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def node(sglang_fleet: dict[str, Any]) -> NodeProcess:
    node: NodeProcess = sglang_fleet["node"]  # the session's real-engine node
    node.wait_ready(300)
    return node


def ask(node: NodeProcess, content: str = QUESTION, **fields: Any) -> list[StreamChunk]:
    fields.setdefault("sampling", SamplingOptions(temperature=0.0))
    request = GenerateRequest(
        request_id=uuid.uuid4().hex, messages=[ChatMessage(role="user", content=content)], **fields
    )

    async def go() -> list[StreamChunk]:
        async with NodeClient(node.url) as client:
            return [c async for c in client.generate(request, idle_timeout=120)]

    return asyncio.run(go())


def text(chunks: list[StreamChunk]) -> str:
    return "".join(c.text for c in chunks)


def tokens(chunks: list[StreamChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


@pytest.fixture(scope="module")
def greedy(node: NodeProcess) -> list[StreamChunk]:
    chunks = ask(node, stop=StopConditions(max_tokens=24))
    assert "Paris" in text(chunks)
    return chunks


def test_a_stop_string_ends_the_answer_before_it(
    node: NodeProcess, greedy: list[StreamChunk]
) -> None:
    chunks = ask(node, stop=StopConditions(max_tokens=24, stop=["Paris"]))
    assert chunks[-1].finish_reason == "stop"
    assert "Paris" not in text(chunks)
    assert text(greedy).startswith(text(chunks).rstrip())


def test_a_stop_token_id_ends_the_answer_right_at_it(
    node: NodeProcess, greedy: list[StreamChunk]
) -> None:
    ids = tokens(greedy)
    # a token first met mid-answer, well before the greedy answer's own end (EOS), so an
    # ignored stop_token_ids would give the longer greedy answer
    at = next(i for i in range(2, len(ids) - 2) if ids[i] not in ids[:i])
    chunks = ask(node, stop=StopConditions(max_tokens=24, stop_token_ids=[ids[at]]))
    assert chunks[-1].finish_reason == "stop"
    assert tokens(chunks) == ids[: at + 1]  # ends on the matched token, which is counted
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == at + 1


def test_ignore_eos_runs_to_max_tokens(node: NodeProcess) -> None:
    chunks = ask(node, stop=StopConditions(max_tokens=40, ignore_eos=True))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 40


def test_min_tokens_keeps_a_short_answer_going(
    node: NodeProcess, greedy: list[StreamChunk]
) -> None:
    natural = greedy[-1].usage.completion_tokens if greedy[-1].usage else 0
    chunks = ask(node, stop=StopConditions(max_tokens=60, min_tokens=natural + 10))
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens >= natural + 10


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingOptions(temperature=1.0, top_k=1),
        SamplingOptions(temperature=1.0, top_p=0.01),
        SamplingOptions(temperature=1.0, min_p=0.99),
    ],
    ids=["top_k", "top_p", "min_p"],
)
def test_narrow_sampling_matches_greedy(
    node: NodeProcess, greedy: list[StreamChunk], sampling: SamplingOptions
) -> None:
    chunks = ask(node, sampling=sampling, stop=StopConditions(max_tokens=24))
    assert tokens(chunks) == tokens(greedy)


def test_a_repetition_penalty_changes_the_output(node: NodeProcess) -> None:
    prompt = "Repeat the word 'yes' twenty times."
    plain = ask(node, prompt, stop=StopConditions(max_tokens=30, ignore_eos=True))
    penalised = ask(
        node,
        prompt,
        sampling=SamplingOptions(temperature=0.0, repetition_penalty=2.0),
        stop=StopConditions(max_tokens=30, ignore_eos=True),
    )
    assert tokens(plain) != tokens(penalised)


@pytest.mark.parametrize("penalty", ["frequency_penalty", "presence_penalty"])
def test_frequency_and_presence_penalties_change_a_greedy_answer(
    node: NodeProcess, penalty: str
) -> None:
    prompt = "Repeat the word 'yes' twenty times."
    stop = StopConditions(max_tokens=30, ignore_eos=True)
    plain = ask(node, prompt, stop=stop)
    penalised = ask(
        node, prompt, sampling=SamplingOptions(temperature=0.0, **{penalty: 1.5}), stop=stop
    )
    assert tokens(plain) != tokens(penalised)


def test_a_seed_is_accepted(node: NodeProcess) -> None:
    # Passed on as SGLang's `sampling_seed`, which SGLang applies only with
    # enable_deterministic_inference (not on here): whether it is honoured is not tested.
    chunks = ask(
        node, sampling=SamplingOptions(temperature=0.7, seed=7), stop=StopConditions(max_tokens=8)
    )
    assert chunks[-1].finish_reason in ("stop", "length")


def test_a_request_past_its_deadline_ends_with_deadline_exceeded_and_sglang_aborts_it(
    node: NodeProcess,
) -> None:
    before = _aborted(node)
    chunks = ask(node, stop=StopConditions(max_tokens=2000, ignore_eos=True), timeout=3.0)
    last = chunks[-1]
    assert last.finish_reason == "error", last
    assert last.error is not None
    assert last.error.code == "deadline_exceeded"
    assert len(tokens(chunks)) < 2000
    assert wait_until(lambda: _aborted(node) > before, timeout=30)  # the engine let it go


def _aborted(node: NodeProcess) -> float:
    _, body = node.http("/metrics")
    lines = body.decode().splitlines()
    prefix = "sglang:num_aborted_requests_total"
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


def test_logprobs_come_per_token_sliced_per_chunk(node: NodeProcess) -> None:
    chunks = ask(node, output=OutputOptions(logprobs=3), stop=StopConditions(max_tokens=12))
    with_tokens = [c for c in chunks if c.token_ids]
    assert with_tokens
    for chunk in with_tokens:
        assert chunk.logprobs is not None
        assert [lp.token_id for lp in chunk.logprobs] == chunk.token_ids
        for lp in chunk.logprobs:
            assert lp.logprob <= 0.0
            assert len(lp.top) == 3


def test_guided_decoding_by_json_schema(node: NodeProcess) -> None:
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string"}},
        "required": ["capital"],
    }
    chunks = ask(
        node,
        "Give the capital of France as JSON.",
        sampling=SamplingOptions(temperature=0.0, json_schema=json.dumps(schema)),
        stop=StopConditions(max_tokens=40),
    )
    assert chunks[-1].finish_reason in ("stop", "length"), chunks[-1]
    value = json.loads(text(chunks))
    assert isinstance(value["capital"], str)


def test_guided_decoding_by_regex(node: NodeProcess) -> None:
    chunks = ask(
        node,
        sampling=SamplingOptions(temperature=0.0, regex="(Paris|London|Berlin)"),
        stop=StopConditions(max_tokens=10),
    )
    assert re.fullmatch("(Paris|London|Berlin)", text(chunks)), text(chunks)


def test_priority_is_accepted(node: NodeProcess) -> None:
    # Passed on to SGLang; it orders the queue only with enable_priority_scheduling, which
    # this node does not set: the order under contention is not tested.
    chunks = ask(node, priority=5, stop=StopConditions(max_tokens=8))
    assert chunks[-1].finish_reason in ("stop", "length")


def test_the_last_chunk_carries_usage_with_cached_tokens(node: NodeProcess) -> None:
    ask(node, stop=StopConditions(max_tokens=4))
    chunks = ask(node, stop=StopConditions(max_tokens=4))
    usage = chunks[-1].usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert usage.cached_tokens > 0


def _refusal(node: NodeProcess, **fields: Any) -> tuple[str, str, str]:
    fields.setdefault("request_id", uuid.uuid4().hex)

    async def go() -> list[StreamChunk]:
        async with NodeClient(node.url) as client:
            payload = json.dumps(fields).encode()
            return [c async for c in client.generate(payload, idle_timeout=120)]

    chunks = asyncio.run(go())
    assert chunks[-1].finish_reason == "error", chunks[-1]
    error = chunks[-1].error
    assert error is not None
    return error.code, error.field, error.message


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"prompt": "x", "dp_rank": 3}, "dp_rank", "out of range"),
        ({"token_ids": [28] * 8000, "stop": {"max_tokens": 500}}, "stop.max_tokens", "context"),
        ({"prompt": "Paris, " * 4500}, "prompt", "more than this engine accepts"),
        ({"messages": []}, "messages", "empty"),
        (
            {"prompt": "x", "sampling": {"json_schema": "{not json"}},
            "sampling.json_schema",
            "grammar",
        ),
    ],
)
def test_refusals_name_the_field_at_fault(
    node: NodeProcess, fields: dict[str, Any], field: str, words: str
) -> None:
    code, at_fault, message = _refusal(node, **fields)
    assert (code, at_fault) == ("invalid_request", field), message
    assert words in message


def test_the_last_chunk_carries_the_eos_token_counted_and_without_its_text(
    node: NodeProcess,
) -> None:
    chunks = ask(node, stop=StopConditions(max_tokens=64))
    last = chunks[-1]
    assert last.finish_reason == "stop"
    assert last.token_ids[-1:] == [2]  # SmolLM2's <|im_end|>
    assert "<|im_end|>" not in text(chunks)
    assert last.usage is not None
    assert last.usage.completion_tokens == len(tokens(chunks))
