"""The frontend's HTTP statuses for what went wrong, provoked on real nodes (sim engine):
429 when every instance is overloaded, 503 when the only instance is gone, 504 past the
request's deadline, 500 when the engine fails the request (the `fail_requests` fault).
Read through the official `openai` client with its retries off."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from messages.request import GenerateRequest, StopConditions
from supervisor.client import NodeClient
from tests.frontend.harness import Frontend, node_metric, sim_fleet, wait_until
from tests.node.harness import NodeProcess, admin_request

SLOW = {"decode_time_per_step": 0.05, "prefill_time_per_token": 0.01}
TOKEN = "admin-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A slow sim node taking one request at a time (`sim`), one to be killed (`doomed`,
    whose record outlives it: a 120 s lease), a frontend with a 3 s request deadline."""
    tmp = tmp_path_factory.mktemp("frontend-errors")
    (tmp / "token").write_text(TOKEN)
    with sim_fleet(tmp) as fleet:
        sim = fleet.node(
            "sim",
            engine__sim=SLOW,
            admin={"enabled": True, "token_file": str(tmp / "token")},
            chaos={"enabled": True},
            handlers={"max_inflight": 1},
            # no idle canary: it would take the one slot the 429 test fills itself
            engine__health={"canary_after_idle": 600.0},
        )
        doomed = fleet.node(
            "doomed",
            engine={"served_model_name": "doomed"},
            discovery={"lease_ttl": 120.0, "heartbeat": 5.0},
        )
        fleet.wait_ready()
        frontend = fleet.frontend(frontend={"request_timeout": 3.0})
        frontend.wait_instances(2)
        yield {"frontend": frontend, "sim": sim, "doomed": doomed, "server": fleet.server}


def _refused(frontend: Frontend, model: str, content: str, max_tokens: int) -> openai.APIError:
    client = frontend.client(max_retries=0, timeout=120)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=max_tokens
        )
    return info.value


def test_every_instance_overloaded_is_429(fleet: dict[str, Any]) -> None:
    node: NodeProcess = fleet["sim"]
    blocker = GenerateRequest(
        request_id=uuid.uuid4().hex, prompt="hold", stop=StopConditions(max_tokens=2000)
    )
    under_way, done = threading.Event(), threading.Event()

    async def hold() -> None:  # the node's one slot, taken directly (not via the frontend)
        async with NodeClient(node.url) as client:
            stream = client.generate(blocker, instance_id=node.instance_id, idle_timeout=120)
            async for chunk in stream:
                if chunk.token_ids:  # admitted and decoding (not refused)
                    under_way.set()
                if done.is_set():
                    await client.cancel(blocker.request_id)
                    done.clear()

    # a slow request of another test may still hold the slot (a prefill runs to its end)
    wait_until(lambda: node_metric(node, "sgl_node_inflight_requests") == 0, 60, "a free slot")
    holder = threading.Thread(target=asyncio.run, args=(hold(),))
    holder.start()
    try:
        assert under_way.wait(60), "the blocking request never started"
        error = _refused(fleet["frontend"], "sim", "one more?", 4)
    finally:
        done.set()
        holder.join(60)
    assert not holder.is_alive()
    assert error.status_code == 429, error  # type: ignore[attr-defined]
    assert error.code == "overloaded", error
    assert isinstance(error, openai.RateLimitError)


def test_a_request_past_its_deadline_is_504(fleet: dict[str, Any]) -> None:
    # about 450 prompt tokens at 10 ms each: no first token within the 3 s deadline (and
    # the slot, held until the prefill's end, is free again soon after)
    error = _refused(fleet["frontend"], "sim", "slow " * 90, 4)
    assert error.status_code == 504, error  # type: ignore[attr-defined]
    assert error.code == "deadline_exceeded", error


def test_a_request_the_engine_fails_is_500_and_the_next_one_is_served(
    fleet: dict[str, Any],
) -> None:
    frontend: Frontend = fleet["frontend"]
    node: NodeProcess = fleet["sim"]
    wait_until(lambda: node_metric(node, "sgl_node_inflight_requests") == 0, 60, "a free slot")
    reply = asyncio.run(admin_request(node, TOKEN, "chaos", fault="fail_requests", count=1))
    assert reply.ok, reply
    error = _refused(frontend, "sim", "fail me", 4)
    assert error.status_code == 500, error  # type: ignore[attr-defined]
    assert error.code == "engine_error", error
    assert "fail_requests" in error.message, error
    assert isinstance(error, openai.InternalServerError)
    # the fault is spent: the same request is served
    answer = frontend.client().chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "fail me"}], max_tokens=4
    )
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 4
    counted = frontend.metric("sgl_frontend_requests_total", {"status": "500"})
    assert counted == 1


def test_the_only_instance_gone_is_503(fleet: dict[str, Any]) -> None:
    doomed: NodeProcess = fleet["doomed"]
    doomed.kill()  # its record stays listed for its 120 s lease
    error = _refused(fleet["frontend"], "doomed", "anyone there?", 4)
    assert error.status_code == 503, error  # type: ignore[attr-defined]
    assert error.code in ("node_lost", "no_instances"), error
    assert isinstance(error, openai.InternalServerError)
