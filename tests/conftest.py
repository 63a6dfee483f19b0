"""Shared fixtures: every test that starts a tree gets it stopped and checked for leaks."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

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
