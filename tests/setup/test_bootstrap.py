"""The bootstrap: standard library only, the machine's pip configuration translated for uv
(or pip used), progress lines from each installer's output, the locks' agreement check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import bootstrap
from supervisor.bootstrap_install import InstallProgress, parse_pip_config, uv_index_args

ROOT = Path(__file__).resolve().parent.parent.parent

# `pip config list` on this kind of machine (env > install > global, as pip reads it)
LISTING = """\
:env:.default-timeout='180'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/elsewhere'
install.find-links='/also-elsewhere'
"""


def test_the_bootstrap_runs_without_anything_but_the_standard_library() -> None:
    # -S: no site-packages at all, as on a fresh machine; -I: not even the checkout's path
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(ROOT / "supervisor" / "bootstrap.py"), "--help"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "bootstrap.py lock [--check]" in result.stdout


def test_pip_config_the_most_specific_section_wins() -> None:
    config = parse_pip_config(LISTING)
    assert config.options["find-links"] == "/opt/wheels"  # the environment's
    assert config.values("extra-index-url") == [
        "file:///opt/pypi/simple",
        "file:///opt/pypi-more/simple",
    ]
    assert config.index_url == "https://pypi.org/simple"
    assert config.untranslated() == []


def test_uv_installs_from_every_source_pip_would_use_and_with_its_constraints() -> None:
    args, env = uv_index_args(parse_pip_config(LISTING), for_install=True)
    assert args == [
        "--index-url", "https://pypi.org/simple",
        "--extra-index-url", "file:///opt/pypi/simple",
        "--extra-index-url", "file:///opt/pypi-more/simple",
        "--find-links", "/opt/wheels",
        "--index-strategy", "unsafe-best-match",
        "--constraint", "/etc/xdg/pip/constraints.txt",
    ]  # fmt: skip
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}


def test_locks_are_resolved_against_the_primary_index_only() -> None:
    args, _ = uv_index_args(parse_pip_config(LISTING), for_install=False)
    assert args == [
        "--index-url", "https://pypi.org/simple",
        "--constraint", "/etc/xdg/pip/constraints.txt",
    ]  # fmt: skip


def test_a_pip_option_uv_would_not_honour_means_pip() -> None:
    config = parse_pip_config(LISTING + "global.proxy='http://proxy:3128'\n")
    assert config.untranslated() == ["proxy"]


def test_progress_follows_pip_and_uv_output(tmp_path: Path) -> None:
    said: list[str] = []
    (tmp_path / "lib" / "python3.11" / "site-packages").mkdir(parents=True)
    progress = InstallProgress(said.append, "pip", tmp_path, planned=5, watch=[])
    for line in (
        "Ignoring av: markers 'platform_machine == \"aarch64\"' don't match your environment",
        "Collecting pykka==4.5.0 (from -r locks/environment.txt (line 5))",
        "Processing /opt/pypi/files/structlog-26.1.0-py3-none-any.whl (from -r x (line 9))",
        "Installing collected packages: pykka, structlog",
        "Successfully installed pykka-4.5.0 structlog-26.1.0",
    ):
        progress.pip_line(line)
    assert (progress.ignored, progress.fetched, progress.total) == (1, 2, 2)
    assert [s.split(": ", 1)[1] for s in said] == [
        "fetching (1/4)",
        "unpacking 2 packages",
        "installed 2 packages",
    ]
    uv = InstallProgress(said.append, "uv", tmp_path, planned=5, watch=[])
    uv.uv_line("Resolved 228 packages in 664ms")
    uv.uv_line(" + torch==2.14.1")
    assert uv.total == 228
    assert said[-1].endswith("uv: Resolved 228 packages in 664ms")


def test_the_committed_locks_were_made_from_this_pyproject() -> None:
    # what `run` checks before building anything (the full check is `lock --check`)
    bootstrap.check_locks_current()
    assert bootstrap.locked_entries(bootstrap.INSTALLED_LOCKS) >= 200


def test_a_changed_dependency_list_is_caught_before_anything_is_built(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = bootstrap.requirements

    def with_one_more() -> tuple[list[str], list[str]]:
        reqs, no_deps = original()
        return [*reqs, "six==1.17.0"], no_deps

    monkeypatch.setattr(bootstrap, "requirements", with_one_more)
    with pytest.raises(SystemExit, match=r"bootstrap\.py lock"):
        bootstrap.check_locks_current()


def _small_lock(tmp_path: Path) -> Path:
    """Two entries of the real lock, with their hashes: an install of seconds."""
    lines = bootstrap.ENV_LOCK.read_text().splitlines()
    picked: list[str] = []
    for i, line in enumerate(lines):
        if line.startswith(("pykka==", "structlog==")):
            picked.append(line)
            for follower in lines[i + 1 :]:
                if not follower.startswith("    --hash"):
                    break
                picked.append(follower)
    assert len([x for x in picked if "==" in x]) == 2
    lock = tmp_path / "small.txt"
    lock.write_text("\n".join(picked) + "\n")
    return lock


@pytest.mark.parametrize(
    ("uv_pin", "installer"),
    [("uv==0.13.8", "uv"), ("uv==0.0.1", "pip")],  # 0.0.1: no such uv, so pip does it
)
def test_the_lock_is_installed_with_uv_or_else_with_pip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uv_pin: str, installer: str
) -> None:
    monkeypatch.setenv("SGL_NODE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SGL_NODE_INSTALLER", "auto")
    monkeypatch.setattr(bootstrap, "INSTALLED_LOCKS", [_small_lock(tmp_path)])
    monkeypatch.setattr(bootstrap, "TOOLS_LOCK", tmp_path / "no-tools-lock.txt")
    monkeypatch.setattr(bootstrap, "tools", lambda: [uv_pin])
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    log = tmp_path / "install.log"
    assert bootstrap._install(env, log) == installer
    code = "import importlib.metadata as m, pykka, structlog; print(m.version('pykka'))"
    check = [str(env / "bin" / "python"), "-c", code]
    assert subprocess.run(check, capture_output=True, text=True).stdout.strip() == "4.5.0"
