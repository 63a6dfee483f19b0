"""Security: NATS authentication from config (secrets from env or file, never logged),
the admin and chaos subjects guarded and off by default, the system HTTP server on
loopback, and request limits with clear errors. Each test tries the forbidden thing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from messages.chaos import AdminReply, AdminRequest
from messages.codec import decode_json, encode_json
from messages.request import GenerateRequest, StopConditions, StreamChunk
from supervisor.client import NodeClient, NoRespondersError
from tests.node.harness import NatsServer, NodeProcess, start_node

SECRET = "hunter2-" + uuid.uuid4().hex


class AuthServer(NatsServer):
    """A nats-server that requires credentials (extra command-line flags)."""

    def __init__(self, tmp_path: Path, *flags: str) -> None:
        self.flags = flags
        super().__init__(tmp_path)

    def _command(self) -> list[str]:
        return [*super()._command(), *self.flags]


def _request(**kw: Any) -> GenerateRequest:
    return GenerateRequest(
        request_id=uuid.uuid4().hex, prompt="secure", stop=StopConditions(max_tokens=4), **kw
    )


def _serves(url: str, **connect: Any) -> StreamChunk:
    async def go() -> StreamChunk:
        async with NodeClient(url, connect_options=connect) as client:
            return [c async for c in client.generate(_request())][-1]

    return asyncio.run(go())


def _all_logs(node: NodeProcess) -> str:
    return node.log_path.read_text()


def test_user_and_password_from_the_environment_and_never_in_the_logs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = AuthServer(tmp_path, "--user", "sgl", "--pass", SECRET)
    monkeypatch.setenv("SGL_NODE_TEST_NATS_PASSWORD", SECRET)
    node = start_node(
        tmp_path,
        embedded_nats=False,
        nats_url=server.url,
        nats__auth={"user": "sgl", "password_env": "SGL_NODE_TEST_NATS_PASSWORD"},
    )
    try:
        node.wait_ready(60)
        assert _serves(server.url, user="sgl", password=SECRET).finish_reason == "length"
        assert node.stop() == 0
        assert SECRET not in _all_logs(node)
    finally:
        node.kill()
        server.stop()


def test_a_wrong_password_fails_the_start_with_a_clear_error_and_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = AuthServer(tmp_path, "--user", "sgl", "--pass", SECRET)
    wrong = "wrong-" + uuid.uuid4().hex
    monkeypatch.setenv("SGL_NODE_TEST_NATS_PASSWORD", wrong)
    node = start_node(
        tmp_path,
        embedded_nats=False,
        nats_url=server.url,
        nats={"connect_timeout": 2.0},
        supervision={"intensity": 0},
        nats__auth={"user": "sgl", "password_env": "SGL_NODE_TEST_NATS_PASSWORD"},
    )
    try:
        assert node.proc.wait(60) == 1
        logs = _all_logs(node)
        assert "Authorization Violation" in logs or "authorization" in logs.lower()
        assert wrong not in logs
        assert SECRET not in logs
    finally:
        node.kill()
        server.stop()


def test_a_token_from_a_file_also_configures_the_embedded_server(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(SECRET + "\n")
    node = start_node(tmp_path, nats__auth={"token_file": str(token_file)})
    try:
        node.wait_ready(60)
        assert _serves(node.url, token=SECRET).finish_reason == "length"

        async def anonymous() -> None:
            await nats.connect(
                node.url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False
            )

        with pytest.raises(Exception, match=r"[Aa]uthorization"):
            asyncio.run(anonymous())
        assert node.stop() == 0
        assert SECRET not in _all_logs(node)
        assert "nats-server.conf" in _all_logs(node)  # the secret travels in a 0600 file, not argv
    finally:
        node.kill()


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate."""
    d = tmp_path / "pki"
    d.mkdir()

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=sgl-node-test-ca",
    )
    for name, extra in (
        ("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{name}.ext").write_text(extra + "\n")
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return {
        name: d / name
        for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    }


def test_mutual_tls_with_a_ca_and_a_client_certificate(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    server = AuthServer(
        tmp_path,
        "--tls",
        "--tlscert",
        str(pki["server.pem"]),
        "--tlskey",
        str(pki["server.key"]),
        "--tlsverify",
        "--tlscacert",
        str(pki["ca.pem"]),
    )
    node = start_node(
        tmp_path,
        embedded_nats=False,
        nats_url=server.url,
        nats__auth={
            "tls_ca": str(pki["ca.pem"]),
            "tls_cert": str(pki["client.pem"]),
            "tls_key": str(pki["client.key"]),
        },
    )
    try:
        node.wait_ready(60)
        import ssl

        context = ssl.create_default_context(cafile=str(pki["ca.pem"]))
        context.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
        assert _serves(server.url, tls=context, tls_hostname="localhost").finish_reason == "length"
        assert node.stop() == 0
    finally:
        node.kill()
        server.stop()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """One node with admin and chaos on (token from a file), one with the defaults."""
    tmp = tmp_path_factory.mktemp("guarded")
    token = tmp / "admin-token"
    token.write_text(SECRET)
    admin = start_node(
        tmp,
        name="admin",
        admin={"enabled": True, "token_file": str(token)},
        chaos={"enabled": True},
        handlers={"max_streams_per_client": 2, "max_prompt_tokens": 20},
        engine__sim={"decode_time_per_step": 0.01},
    )
    plain = start_node(tmp, name="plain", admin={"enabled": True, "token_file": str(token)})
    try:
        admin.wait_ready(60)
        plain.wait_ready(60)
        yield admin, plain
    finally:
        admin.kill()
        plain.kill()


def _admin(node: NodeProcess, request: AdminRequest | bytes) -> AdminReply:
    async def go() -> AdminReply:
        nc = await nats.connect(node.url)
        try:
            data = request if isinstance(request, bytes) else encode_json(request)
            msg = await nc.request(f"dynamo.backend.admin.{node.instance_id}", data, timeout=10)
            return decode_json(msg.data, AdminReply)
        finally:
            await nc.close()

    return asyncio.run(go())


def test_the_admin_subject_refuses_a_caller_without_the_token(
    guarded: tuple[NodeProcess, NodeProcess],
) -> None:
    node, _ = guarded
    for token in ("", "wrong", SECRET[:-1]):
        reply = _admin(
            node, AdminRequest(token=token, op="chaos", args={"fault": "kill_engine_host"})
        )
        assert (reply.ok, reply.error) == (False, "unauthorized")
    missing = _admin(node, b'{"op": "tree"}')
    assert (missing.ok, missing.error) == (False, "invalid")
    assert "token" in missing.message
    _, body = node.http("/tree")
    assert all(row["restarts"] == 0 for row in json.loads(body)["children"])  # nothing was injected
    assert _admin(node, AdminRequest(token=SECRET, op="tree")).ok
    assert SECRET not in _all_logs(node)


def test_chaos_is_refused_when_not_enabled_even_with_the_token(
    guarded: tuple[NodeProcess, NodeProcess],
) -> None:
    _, plain = guarded
    reply = _admin(
        plain, AdminRequest(token=SECRET, op="chaos", args={"fault": "kill_engine_host"})
    )
    assert (reply.ok, reply.error) == (False, "disabled")


def test_admin_is_off_by_default(tmp_path: Path) -> None:
    node = start_node(tmp_path)
    try:
        node.wait_ready(60)

        async def go() -> None:
            nc = await nats.connect(node.url)
            try:
                await nc.request(f"dynamo.backend.admin.{node.instance_id}", b"{}", timeout=2)
            finally:
                await nc.close()

        with pytest.raises(nats.errors.NoRespondersError):
            asyncio.run(go())
    finally:
        node.kill()


def test_the_system_http_server_listens_on_loopback_only(
    guarded: tuple[NodeProcess, NodeProcess],
) -> None:
    node, _ = guarded
    port = f"{node.system_port:04X}"
    listening = [
        line.split()[1]
        for table in ("/proc/net/tcp", "/proc/net/tcp6")
        for line in Path(table).read_text().splitlines()[1:]
        if line.split()[1].endswith(f":{port}") and line.split()[3] == "0A"
    ]
    assert listening == ["0100007F:" + port]  # 127.0.0.1, and nothing else


def test_streams_per_client_are_limited(guarded: tuple[NodeProcess, NodeProcess]) -> None:
    node, _ = guarded

    async def go() -> list[StreamChunk]:
        async with NodeClient(node.url) as client:

            async def one() -> StreamChunk:
                req = GenerateRequest(
                    request_id=uuid.uuid4().hex,
                    prompt="x",
                    stop=StopConditions(max_tokens=50),
                    client_id="greedy",
                )
                return [c async for c in client.generate(req)][-1]

            return await asyncio.gather(*(one() for _ in range(4)))

    endings = sorted((c.error.code if c.error else c.finish_reason) for c in asyncio.run(go()))
    assert endings == ["length", "length", "too_many_streams", "too_many_streams"]


def test_a_text_prompt_over_the_token_limit_is_refused_naming_the_limit(
    guarded: tuple[NodeProcess, NodeProcess],
) -> None:
    node, _ = guarded

    async def go() -> StreamChunk:
        async with NodeClient(node.url) as client:
            req = GenerateRequest(
                request_id=uuid.uuid4().hex, prompt="y" * 100, stop=StopConditions(max_tokens=5)
            )
            return [c async for c in client.generate(req)][-1]

    last = asyncio.run(go())
    assert last.error is not None
    assert last.error.code == "invalid_request"
    assert "20" in last.error.message
    with pytest.raises(NoRespondersError):
        asyncio.run(_nobody(node))


async def _nobody(node: NodeProcess) -> None:
    async with NodeClient(node.url, component="nobody") as client:
        [c async for c in client.generate(_request())]


def _user_nkey(tmp_path: Path) -> tuple[Path, str]:
    """A fresh user NKEY: (seed file, public key)."""
    import os as _os

    import nkeys

    seed = nkeys.encode_seed(_os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    path = tmp_path / "user.nk"
    path.write_bytes(seed)
    return path, public


class ConfiguredServer(NatsServer):
    """A nats-server started from a config file (for NKEY users)."""

    def __init__(self, tmp_path: Path, conf: str) -> None:
        self.conf = tmp_path / "server.conf"
        self.conf.write_text(conf)
        super().__init__(tmp_path)

    def _command(self) -> list[str]:
        return [*super()._command(), "--config", str(self.conf)]


def test_an_nkey_seed_file_authenticates_and_a_stranger_is_refused(tmp_path: Path) -> None:
    seed, public = _user_nkey(tmp_path)
    server = ConfiguredServer(tmp_path, f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}\n')
    node = start_node(
        tmp_path, embedded_nats=False, nats_url=server.url, nats__auth={"nkey_seed_file": str(seed)}
    )
    try:
        node.wait_ready(60)
        assert _serves(server.url, nkeys_seed=str(seed)).finish_reason == "length"

        async def stranger() -> None:
            await nats.connect(server.url, connect_timeout=2, allow_reconnect=False)

        with pytest.raises(Exception, match=r"[Aa]uthorization"):
            asyncio.run(stranger())
        assert node.stop() == 0
        assert seed.read_text() not in _all_logs(node)
    finally:
        node.kill()
        server.stop()
