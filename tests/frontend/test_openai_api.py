"""The frontend through the official `openai` client: chat and text completions (streamed
and whole), models, embeddings, errors, and cancellation when the client goes away.

One NATS server, an aggregated sim node (model "sim") and an embedding sim node (model
"sim-embed", component "embedder") whose tree also runs the frontend (`[frontend]
enabled`), all as OS processes; the last test stops a frontend-only node with SIGTERM.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import openai
import pytest

from tests.frontend.harness import (
    Frontend,
    node_metric,
    sim_answer,
    sim_chat_ids,
    sim_fleet,
    start_frontend,
    wait_until,
)
from tests.node.harness import NodeProcess, free_ports

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with sim_fleet(tmp_path_factory.mktemp("frontend-api")) as fleet:
        node = fleet.node("sim", engine__sim={"decode_time_per_step": 0.002})
        port = free_ports()
        embedder = fleet.node(
            "embed",
            node={"mode": "embedding", "component": "embedder"},
            engine={"served_model_name": "sim-embed"},
            frontend={"enabled": True, "port": port},
        )
        fleet.wait_ready()
        frontend = Frontend(embedder, port)  # in the embedding node's tree, after its core
        frontend.wait_healthy()
        frontend.wait_instances(2)
        yield {"frontend": frontend, "node": node, "embedder": embedder, "server": fleet.server}


@pytest.fixture(scope="module")
def client(fleet: dict[str, Any]) -> openai.OpenAI:
    return fleet["frontend"].client()


def test_models_are_the_models_of_live_instances(client: openai.OpenAI) -> None:
    ids = {model.id for model in client.models.list()}
    assert ids == {"sim", "sim-embed"}
    assert client.models.retrieve("sim").owned_by == "sgl-node"


def test_a_chat_completion_carries_the_engines_text_and_usage(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(model="sim", messages=QUESTION, max_tokens=12)  # type: ignore[arg-type]
    prompt = sim_chat_ids(QUESTION)
    assert answer.choices[0].message.content == sim_answer(prompt, 12)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), 12)
    assert answer.usage.total_tokens == len(prompt) + 12
    assert answer.id.startswith("chatcmpl-")


def test_a_streamed_chat_completion_adds_up_to_the_same_text(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="sim",
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == sim_answer(sim_chat_ids(QUESTION), 12)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12


def test_text_completions_whole_streamed_and_echoed(client: openai.OpenAI) -> None:
    prompt = "Once upon a time"
    ids = [b + 3 for b in prompt.encode()]
    whole = client.completions.create(model="sim", prompt=prompt, max_tokens=8)
    assert whole.choices[0].text == sim_answer(ids, 8)
    assert whole.object == "text_completion"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(model="sim", prompt=prompt, max_tokens=8, stream=True)
        if c.choices
    )
    assert streamed == whole.choices[0].text
    echoed = client.completions.create(model="sim", prompt=prompt, max_tokens=8, echo=True)
    assert echoed.choices[0].text == prompt + whole.choices[0].text
    by_ids = client.completions.create(model="sim", prompt=ids, max_tokens=8)
    assert by_ids.choices[0].text == whole.choices[0].text
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == len(ids)


def test_logprobs_are_reported_per_token(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="sim",
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert len(logprobs.content) == 5
    assert "".join(t.token for t in logprobs.content) == answer.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.logprob < 0 for t in logprobs.content)
    legacy = client.completions.create(model="sim", prompt="abc", max_tokens=3, logprobs=1)
    assert legacy.choices[0].logprobs is not None
    assert len(legacy.choices[0].logprobs.tokens or []) == 3


def test_embeddings_in_both_encodings(client: openai.OpenAI) -> None:
    default = client.embeddings.create(model="sim-embed", input=["one", "two sentences"])
    assert [d.index for d in default.data] == [0, 1]
    for item in default.data:
        assert len(item.embedding) == 384
        assert math.isclose(sum(x * x for x in item.embedding), 1.0, rel_tol=1e-5)
    floats = (
        client.embeddings.create(model="sim-embed", input="one", encoding_format="float")
        .data[0]
        .embedding
    )
    assert floats == pytest.approx(default.data[0].embedding, abs=1e-6)
    assert default.usage.prompt_tokens == len("one") + len("two sentences")
    by_ids = client.embeddings.create(model="sim-embed", input=[[1, 2, 3], [4, 5]])
    assert len(by_ids.data) == 2


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")


def test_bad_requests_are_refused_naming_the_parameter(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="sim", messages=QUESTION, temperature=5.0)  # type: ignore[arg-type]
    assert caught.value.param == "temperature"
    # the node's own limit (handlers.max_tokens_limit), mapped from its invalid_request
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="sim", messages=QUESTION, max_tokens=100_000)  # type: ignore[arg-type]
    assert caught.value.param == "max_tokens"
    assert "max_tokens_limit" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="sim", messages=QUESTION, n=0)  # type: ignore[arg-type]
    assert caught.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="sim", input="generate-only model")
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="sim-embed", messages=QUESTION)  # type: ignore[arg-type]


def test_health_and_metrics(fleet: dict[str, Any], client: openai.OpenAI) -> None:
    frontend: Frontend = fleet["frontend"]
    health = frontend.health()
    assert health["status"] == "ok"
    assert health["models"] == ["sim", "sim-embed"]
    client.chat.completions.create(model="sim", messages=QUESTION, max_tokens=2)  # type: ignore[arg-type]
    assert frontend.metric("sgl_frontend_requests_total", {"route": "chat", "status": "200"}) >= 1
    assert frontend.metric("sgl_frontend_routing_decisions_total", {"policy": "kv"}) >= 1
    assert frontend.metric("sgl_frontend_time_to_first_token_seconds_count") >= 1
    assert frontend.metric("sgl_frontend_instances", {"mode": "aggregated"}) == 1
    status, body = frontend.get("/v1/nothing-here")
    assert status == 404
    assert body["error"]["code"] == "not_found"


def test_a_client_that_goes_away_cancels_its_request_on_the_node(
    fleet: dict[str, Any], client: openai.OpenAI
) -> None:
    node: NodeProcess = fleet["node"]
    before = node_metric(node, "sgl_node_requests_total", {"outcome": "cancelled"})
    stream = client.chat.completions.create(
        model="sim",
        messages=QUESTION,  # type: ignore[arg-type]
        max_tokens=4000,  # 8 s of decoding at 2 ms a step
        stream=True,
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    # cancelled, not finished: the abort reached the node within the 8 s it would have run
    wait_until(
        lambda: node_metric(node, "sgl_node_requests_total", {"outcome": "cancelled"}) > before,
        30.0,
        "the node cancelled the abandoned request",
    )
    assert fleet["frontend"].metric("sgl_frontend_cancels_total") >= 1


def test_concurrent_requests_all_complete(client: openai.OpenAI) -> None:
    results: list[str] = []

    def ask(i: int) -> None:
        messages = [{"role": "user", "content": f"question {i}"}]
        answer = client.chat.completions.create(model="sim", messages=messages, max_tokens=6)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == sim_answer(sim_chat_ids(messages), 6)
        results.append(answer.id)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(set(results)) == 16


def test_discovery_leaves_no_jetstream_consumers_behind(fleet: dict[str, Any]) -> None:
    async def consumers() -> tuple[int, int]:
        nc = await nats.connect(fleet["server"].url)
        js = nc.jetstream()
        try:
            bucket = "KV_sgl_node_instances"
            before = (await js.stream_info(bucket)).state.consumer_count
            # Wait for the JetStream API call of a re-list (one stream_info, every 5 s while
            # no lease is near its end; a leak would leave a consumer per call; the nodes'
            # heartbeats are plain publishes, not API calls), counting ours out.
            start = (await js.account_info()).api.total
            for ours in itertools.count(1):
                if (await js.account_info()).api.total - start - ours >= 1:
                    break
                assert ours < 600, "no JetStream API calls: is the frontend re-listing?"
                await asyncio.sleep(0.1)
            after = (await js.stream_info(bucket)).state.consumer_count
            return int(before), int(after)
        finally:
            await nc.close()

    # The frontend's one watch; a frontend another test stopped may leave its own for a
    # while (then `before` counts it), but re-lists add none.
    before, after = asyncio.run(consumers())
    assert after <= max(before, 1), (before, after)


def test_sigterm_lets_streams_in_flight_finish_then_exits_0(
    fleet: dict[str, Any], tmp_path: Path
) -> None:
    frontend = start_frontend(tmp_path, fleet["server"].url, name="stopping")
    try:
        frontend.wait_instances(2)
        stream = frontend.client().chat.completions.create(
            model="sim",
            messages=QUESTION,  # type: ignore[arg-type]
            max_tokens=400,  # 0.8 s of decoding: within the 2 s drain
            stream=True,
        )
        text = ""
        for i, chunk in enumerate(stream):
            if i == 2:
                frontend.proc.proc.send_signal(signal.SIGTERM)
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        assert len(text) == 400
        assert frontend.proc.proc.wait(15) == 0
        assert frontend.proc.wait_log(lambda r: r.get("event") == "frontend stopped serving")
    finally:
        frontend.kill()
