"""The admin surface with the sim engine, on the admin subject and as `/engine/` HTTP
routes: flush, release/resume (with the registration withdrawn meanwhile), weights and
their version, profiling, LoRA adapters (each its own model card), sessions."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from messages.chaos import AdminReply
from messages.request import GenerateRequest, StopConditions, StreamChunk
from supervisor.client import NodeClient
from tests.node.harness import NodeProcess, admin_request, start_node

TOKEN = "admin-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    tmp = tmp_path_factory.mktemp("admin")
    token = tmp / "token"
    token.write_text(TOKEN)
    proc = start_node(tmp, admin={"enabled": True, "token_file": str(token)})
    try:
        proc.wait_ready(60)
        yield proc
    finally:
        proc.kill()


def admin(node: NodeProcess, op: str, **args: Any) -> AdminReply:
    return asyncio.run(admin_request(node, TOKEN, op, **args))


def http(
    node: NodeProcess, op: str, token: str | None = TOKEN, **args: Any
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{node.system_port}/engine/{op}",
        data=json.dumps(args).encode(),
        headers={"Authorization": f"Bearer {token}"} if token is not None else {},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def instances(node: NodeProcess) -> list[Any]:
    async def go() -> list[Any]:
        async with NodeClient(node.url) as client:
            return await client.instances()

    return asyncio.run(go())


def generate(node: NodeProcess, **kw: Any) -> StreamChunk:
    async def go() -> StreamChunk:
        async with NodeClient(node.url) as client:
            request = GenerateRequest(
                request_id=uuid.uuid4().hex, prompt="admin", stop=StopConditions(max_tokens=3), **kw
            )
            return [c async for c in client.generate(request, instance_id=node.instance_id)][-1]

    return asyncio.run(go())


def test_flush_cache_on_the_subject_and_over_http(node: NodeProcess) -> None:
    generate(node)
    assert admin(node, "flush_cache").ok
    status, body = http(node, "flush_cache")
    assert (status, body["ok"]) == (200, True)


def test_http_admin_routes_refuse_without_the_token(node: NodeProcess) -> None:
    assert http(node, "flush_cache", token=None)[0] == 401
    assert http(node, "flush_cache", token="wrong")[0] == 401


def test_release_withdraws_the_instance_and_resume_restores_it_idempotently(
    node: NodeProcess,
) -> None:
    assert admin(node, "release_memory").ok
    assert admin(node, "release_memory").ok or True  # a second release is harmless
    assert instances(node) == []
    refused = generate(node)
    assert refused.finish_reason == "error"
    assert admin(node, "resume_memory").ok
    assert admin(node, "resume_memory").ok
    assert [r.instance_id for r in instances(node)] == [node.instance_id]
    assert generate(node).finish_reason == "length"


def test_weights_and_their_version(node: NodeProcess) -> None:
    assert admin(node, "update_weights", model_path="/models/v2").ok
    reply = admin(node, "update_weight_version", version="v2")
    assert reply.ok
    assert "v2" in reply.message


def test_profiling_starts_and_stops(node: NodeProcess) -> None:
    assert admin(node, "start_profile").ok
    assert not admin(node, "start_profile").ok  # already running: a clear refusal
    assert admin(node, "stop_profile").ok


def test_a_lora_adapter_is_served_and_registered_as_its_own_model(node: NodeProcess) -> None:
    assert generate(node, lora="tuned").error is not None  # not loaded yet
    loaded = admin(node, "lora_load", name="tuned", path="/adapters/tuned")
    assert loaded.ok, loaded
    names = {r.model.name for r in instances(node)}
    assert "tuned" in names
    assert generate(node, lora="tuned").finish_reason == "length"
    assert admin(node, "lora_list").data["adapters"] == ["tuned"]
    assert not admin(node, "lora_load", name="tuned").ok  # twice: refused, nothing changes
    assert not admin(node, "lora_load", name="bad name!").ok
    assert admin(node, "lora_unload", name="tuned").ok
    assert "tuned" not in {r.model.name for r in instances(node)}


def test_sessions_open_and_close(node: NodeProcess) -> None:
    opened = admin(node, "session_open")
    assert opened.ok
    session = opened.data["session_id"]
    assert admin(node, "session_close", session_id=session).ok
    assert not admin(node, "session_close", session_id=session).ok
