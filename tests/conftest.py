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

from supervisor.chaos_nodes import PORT_RANGE_ENV, port_slice  # noqa: E402
from supervisor.logs import configure_logging  # noqa: E402

configure_logging("info", "json" if not os.environ.get("SGL_NODE_TEST_CONSOLE") else "console")


def _worker_ports() -> None:
    """Parallel workers (pytest-xdist, `-n`) pick ports from disjoint ranges: a port one
    worker's node has not bound yet (or an engine between its exit and its restart) is
    never handed to the other's. Inherited by the processes the tests start."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or PORT_RANGE_ENV in os.environ:
        return
    os.environ[PORT_RANGE_ENV] = port_slice(int(worker[2:]), count)


_worker_ports()


# The tests that run (or import) the real SGLang engine: modules, or one test of a module.
# With workers (`-n`) they run one after another on one worker (`RealEngineApart`): they
# share the session's engine (`sglang_fleet`), and an SGLang start takes both cores for
# ~15 s, so two at once would only slow each other; the rest spread over the others.
REAL_ENGINE = (
    "tests/engine/test_builtin_model.py",
    "tests/engine/test_sgl_kernel_cpu.py",
    "tests/engine/test_sglang_backend.py",
    "tests/engine/test_sim_sglang_wire.py",
    "tests/frontend/test_embeddings_sglang.py",
    "tests/frontend/test_frontend_sglang.py",
    "tests/node/test_multinode_sglang.py",
    "tests/node/test_node_sglang.py",
    "tests/parity/test_request_surface_sglang.py",
    "tests/reliability/test_fault_matrix.py::test_a_stuck_engine_and_a_nats_restart_with_the_real_engine",
)


def is_real_engine(nodeid: str) -> bool:
    return any(nodeid == name or nodeid.startswith(name + "::") for name in REAL_ENGINE)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the real engine's tests `real_engine` (`-m "not real_engine"`: the rest alone);
    a test on the shared engine must be one of them, or two workers would each start it."""
    for item in items:
        if is_real_engine(item.nodeid):
            item.add_marker(pytest.mark.real_engine)
        elif "sglang_fleet" in getattr(item, "fixturenames", ()):
            msg = f"{item.nodeid} uses sglang_fleet: add its module to REAL_ENGINE in {__file__}"
            raise pytest.UsageError(msg)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's scheduler for `-n`: the real engine's tests as one unit of work, each
    other module a unit of its own (its module fixtures start once); the largest first."""
    from xdist.scheduler import LoadScopeScheduling

    class RealEngineApart(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return "real_engine" if is_real_engine(nodeid) else nodeid.split("::", 1)[0]

    return RealEngineApart(config, log)


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
