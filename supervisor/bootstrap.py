"""Set up sgl-node's environment on a fresh machine, then run the node or the tests.

Runs with nothing but the Python standard library, as a script::

    python3 supervisor/bootstrap.py run [CONFIG] [node options]
    python3 supervisor/bootstrap.py test [pytest options]
    python3 supervisor/bootstrap.py client ARGS...       # python -m supervisor.client ARGS
    python3 supervisor/bootstrap.py exec CMD [ARGS...]   # any command inside the environment
    python3 supervisor/bootstrap.py env                  # print the environment's path

The environment (SGLang with PyTorch is ~11 GB) lives outside the checkout, under
``$SGL_NODE_HOME`` (default ``$XDG_CACHE_HOME/sgl-node`` or ``~/.cache/sgl-node``),
in a directory named by a hash of everything it installs: fresh clones and repeated
runs reuse it; a change of dependencies builds a new one from scratch and removes
the old ones, so the disk never fills with copies. The project itself is not
installed into it; the checkout is put on ``PYTHONPATH`` instead, so several
checkouts can share one environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Bump when the way the environment is built changes (forces a rebuild).
LAYOUT_VERSION = "1"
READY_MARKER = ".sgl-node-complete"
LAST_USED = ".sgl-node-last-used"
STALE_AFTER = 3600.0  # seconds without use before an outdated environment is removed


def _home() -> Path:
    explicit = os.environ.get("SGL_NODE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "sgl-node"


def _load_pyproject() -> dict[str, object]:
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            sys.exit("bootstrap: Python 3.10 needs the 'tomli' package (or use Python >= 3.11)")
    return tomllib.loads(text)


def requirements() -> tuple[list[str], list[str]]:
    """Return (requirements installed with dependencies, wheels installed without)."""
    data = _load_pyproject()
    project = data["project"]
    assert isinstance(project, dict)
    tool = data.get("tool", {})
    assert isinstance(tool, dict)
    boot = tool.get("sgl-node", {}).get("bootstrap", {})
    reqs = list(project["dependencies"])
    extras = project.get("optional-dependencies", {})
    for name in boot.get("extras", []):
        reqs.extend(extras[name])
    return reqs, list(boot.get("no-deps", []))


def _constraints() -> str:
    """Machine-wide pip constraints are part of what gets installed, so part of the key."""
    path = Path("/etc/xdg/pip/constraints.txt")
    return path.read_text() if path.exists() else ""


def env_key(reqs: list[str], no_deps: list[str]) -> str:
    """A hash of everything that decides the environment's content."""
    material = json.dumps(
        {
            "layout": LAYOUT_VERSION,
            "python": sys.version,
            "executable": os.path.realpath(sys.executable),
            "machine": platform.machine(),
            "requirements": sorted(reqs),
            "no_deps": sorted(no_deps),
            "constraints": _constraints(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _say(msg: str) -> None:
    print(f"[sgl-node setup] {msg}", flush=True)


_PIP_PROGRESS = re.compile(r"^(Collecting|Downloading|Installing collected|Successfully installed)")


def _pip(python: Path, args: list[str], log: Path) -> None:
    """Run pip, keep its full output in ``log`` and print a short progress line per step."""
    cmd = [str(python), "-m", "pip", "--disable-pip-version-check", *args]
    started = time.monotonic()
    with log.open("a") as sink:
        sink.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        assert proc.stdout is not None
        collected = 0
        for line in proc.stdout:
            sink.write(line)
            stripped = line.strip()
            if not _PIP_PROGRESS.match(stripped):
                continue
            elapsed = int(time.monotonic() - started)
            if stripped.startswith("Collecting"):
                collected += 1
                _say(f"{elapsed:4d}s  resolving ({collected}) {stripped.split()[1]}")
            elif stripped.startswith("Installing collected"):
                _say(f"{elapsed:4d}s  installing {collected} packages (the slow part: unpacking)")
            elif stripped.startswith("Successfully installed"):
                _say(f"{elapsed:4d}s  installed {len(stripped.split()) - 2} packages")
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        sys.exit(f"bootstrap: pip failed (exit {code}); full log: {log}\n{tail}")


def ensure_env() -> Path:
    """Build the environment if it is missing or incomplete; return its directory."""
    if sys.version_info < (3, 10):  # noqa: UP036 - this script runs on any python3
        sys.exit(f"bootstrap: sgl-node needs Python >= 3.10, this is {platform.python_version()}")
    reqs, no_deps = requirements()
    key = env_key(reqs, no_deps)
    envs = _home() / "envs"
    envs.mkdir(parents=True, exist_ok=True)
    env = envs / key
    with (envs / ".lock").open("w") as lock:
        # Concurrent runs (two terminals, CI and a developer) build once.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (env / READY_MARKER).exists():
            _build(env, reqs, no_deps)
        (env / LAST_USED).touch()
        _remove_stale(envs, keep=env)
    return env


def _build(env: Path, reqs: list[str], no_deps: list[str]) -> None:
    if env.exists():
        _say(f"removing an incomplete environment at {env}")
        shutil.rmtree(env)
    log = env.parent / f"{env.name}.log"
    log.write_text("")
    _say(f"creating the environment in {env} (first time only; ~11 GB, about 5-10 minutes)")
    _say(f"full pip log: {log}")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    python = env / "bin" / "python"
    _pip(python, ["install", "--upgrade", "pip", "setuptools", "wheel"], log)
    _pip(python, ["install", *reqs], log)
    if no_deps:
        _pip(python, ["install", "--no-deps", *no_deps], log)
    (env / READY_MARKER).write_text(json.dumps({"requirements": reqs, "no_deps": no_deps}))
    _say(f"environment ready in {time.monotonic() - started:.0f}s")


def _remove_stale(envs: Path, keep: Path) -> None:
    """Remove environments built for other inputs, once nothing has used them for a while
    (a run that started on an older checkout keeps its environment until it is done)."""
    now = time.time()
    for other in envs.iterdir():
        if other == keep or other.name.startswith(".") or other.name.endswith(".log"):
            continue
        marker = other / LAST_USED
        last_used = marker.stat().st_mtime if marker.exists() else other.stat().st_mtime
        if other.is_dir() and now - last_used > STALE_AFTER:
            _say(f"removing the outdated environment {other}")
            shutil.rmtree(other, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                (envs / f"{other.name}.log").unlink()


def _exec(env: Path, argv: list[str]) -> None:
    environ = dict(os.environ)
    environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), environ.get("PYTHONPATH", "")) if p
    )
    environ["VIRTUAL_ENV"] = str(env)
    environ["PATH"] = f"{env / 'bin'}{os.pathsep}{environ.get('PATH', '')}"
    os.chdir(ROOT)
    sys.stdout.flush()
    os.execve(argv[0], argv, environ)


def main(argv: list[str]) -> None:
    """Dispatch the sub-command (see the module docstring)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    command, rest = argv[0], argv[1:]
    if command not in ("run", "test", "client", "exec", "env"):
        sys.exit(
            f"bootstrap: unknown command {command!r} (expected run, test, client, exec or env)"
        )
    env = ensure_env()
    python = str(env / "bin" / "python")
    if command == "env":
        print(env)
    elif command == "run":
        if not rest or rest[0].startswith("-"):
            rest = ["configs/cluster.toml", *rest]
        _exec(env, [python, "-m", "supervisor", *rest])
    elif command == "test":
        _exec(env, [python, "-m", "pytest", *rest])
    elif command == "client":
        _exec(env, [python, "-m", "supervisor.client", *rest])
    else:
        if not rest:
            sys.exit("bootstrap: exec needs a command")
        exe = shutil.which(rest[0], path=str(env / "bin")) or shutil.which(rest[0]) or rest[0]
        _exec(env, [exe, *rest[1:]])


if __name__ == "__main__":
    main(sys.argv[1:])
