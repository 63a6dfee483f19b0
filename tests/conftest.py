"""Shared fixtures: every test that starts a tree gets it stopped and checked for leaks."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from supervisor.logs import configure_logging  # noqa: E402

configure_logging("info", "json" if not os.environ.get("SGL_NODE_TEST_CONSOLE") else "console")


@pytest.fixture
def repo_root() -> Iterator[Path]:
    """The checkout's top directory."""
    yield ROOT


@pytest.fixture(scope="session")
def sglang_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One NATS server and one node serving the built-in model with the real SGLang engine,
    shared by the real-engine modules (an engine start costs ~25-55 s). Started by the first
    test that asks for it; a module that needs a node of its own settings starts its own.
    Modules may restart its engine (kill tests) but must leave it serving."""
    from tests.node.harness import NatsServer, start_node

    tmp = tmp_path_factory.mktemp("sglang-fleet")
    server = NatsServer(tmp)
    node = None
    try:
        node = start_node(
            tmp,
            backend="sglang",
            embedded_nats=False,
            nats_url=server.url,
            # a slow first batch on a busy CI machine is no stall; no canary requests
            # between tests (they would add cache hits and KV events of their own)
            engine__health={"stall_timeout": 120.0, "canary_after_idle": 600.0},
        )
        node.wait_ready(600)
        yield {"server": server, "node": node}
    finally:
        if node is not None:
            node.stop()
            node.kill()
        server.stop()
