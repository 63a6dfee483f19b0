"""Set up sgl-node's environment on a fresh machine, then run the node or the tests.

Runs with nothing but the Python standard library, as a script::

    python3 supervisor/bootstrap.py run [CONFIG] [node options]
    python3 supervisor/bootstrap.py test [pytest options]
    python3 supervisor/bootstrap.py client ARGS...       # python -m supervisor.client ARGS
    python3 supervisor/bootstrap.py exec CMD [ARGS...]   # any command inside the environment
    python3 supervisor/bootstrap.py env                  # print the environment's path
    python3 supervisor/bootstrap.py lock [--check]       # regenerate (or verify) locks/

The environment (SGLang with PyTorch is ~11 GB) is installed from the committed locks
(``locks/*.txt``: every package, exact version and hashes, made by ``uv pip compile``
from pyproject.toml) with uv, or pip when uv cannot be used (``SGL_NODE_INSTALLER=auto``,
``uv`` or ``pip``). It lives outside the checkout, under ``$SGL_NODE_HOME`` (default
``$XDG_CACHE_HOME/sgl-node`` or ``~/.cache/sgl-node``), in a directory named by the
locks' hash (and the interpreter's): fresh clones and repeated runs reuse it; a new lock
builds a new one and removes the old ones once unused for an hour, so the disk never
fills with copies. The project itself is not installed into it; the checkout is put on
``PYTHONPATH`` instead, so several checkouts can share one environment.
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
import tempfile
import time
from pathlib import Path

if __package__:  # imported (tests, mypy)
    from supervisor import bootstrap_install as install
else:  # run as a script: the package is not importable yet (pykka...), its sibling is
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bootstrap_install as install  # type: ignore[import-not-found,no-redef]

ROOT = Path(__file__).resolve().parent.parent
# Bump when the way the environment is built changes (forces a rebuild).
LAYOUT_VERSION = "2"
LOCKS = ROOT / "locks"
ENV_LOCK = LOCKS / "environment.txt"  # everything, installed without resolving again
NO_DEPS_LOCK = LOCKS / "no-deps.txt"  # wheels whose own dependencies are not wanted
TOOLS_LOCK = LOCKS / "tools.txt"  # the bootstrap's installer (uv), in an env of its own
INSTALLED_LOCKS = [ENV_LOCK, NO_DEPS_LOCK]
_PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[^ \\]+( ; [^\\]+)?")
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


def tools() -> list[str]:
    """The bootstrap's own tools (exact pins), from ``[tool.sgl-node.bootstrap] tools``."""
    tool = _load_pyproject().get("tool", {})
    assert isinstance(tool, dict)
    return list(tool.get("sgl-node", {}).get("bootstrap", {}).get("tools", []))


def lock_inputs_digest() -> str:
    """A hash of what the locks are made from (pyproject's dependency lists), written into
    each lock's header: a lock whose recorded digest differs is out of date."""
    reqs, no_deps = requirements()
    project = _load_pyproject()["project"]
    assert isinstance(project, dict)
    material = json.dumps(
        {
            "requirements": sorted(reqs),
            "no_deps": sorted(no_deps),
            "tools": sorted(tools()),
            "requires_python": project.get("requires-python", ""),
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _recorded_digest(lock: Path) -> str | None:
    match = re.search(r"inputs ([0-9a-f]{16})", lock.read_text()[:2000]) if lock.exists() else None
    return match.group(1) if match else None


def check_locks_current() -> None:
    """Exit with a clear message when a lock is missing or was made from other inputs."""
    digest = lock_inputs_digest()
    for lock in (ENV_LOCK, NO_DEPS_LOCK):
        recorded = _recorded_digest(lock)
        if recorded != digest:
            what = "is missing" if not lock.exists() else "was made from other dependencies"
            sys.exit(
                f"bootstrap: {lock.relative_to(ROOT)} {what} than pyproject.toml's "
                f"(inputs {recorded} != {digest}): run `python3 supervisor/bootstrap.py lock`"
                if recorded
                else f"bootstrap: {lock.relative_to(ROOT)} {what}: run "
                "`python3 supervisor/bootstrap.py lock`"
            )


def locked_entries(locks: list[Path]) -> int:
    """Requirement entries in the locks (a universal lock lists some for other machines)."""
    return sum(1 for lock in locks for line in lock.read_text().splitlines() if _PIN.match(line))


def env_key() -> str:
    """The environment's name: the locks' hash, with the interpreter it is built on."""
    material = json.dumps(
        {
            "layout": LAYOUT_VERSION,
            "python": sys.version,
            "executable": os.path.realpath(sys.executable),
            "machine": platform.machine(),
            "locks": [hashlib.sha256(lock.read_bytes()).hexdigest() for lock in INSTALLED_LOCKS],
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def _say(msg: str) -> None:
    print(f"[sgl-node setup] {msg}", flush=True)


def ensure_env() -> Path:
    """Build the environment if it is missing or incomplete; return its directory."""
    if sys.version_info < (3, 10):  # noqa: UP036 - this script runs on any python3
        sys.exit(f"bootstrap: sgl-node needs Python >= 3.10, this is {platform.python_version()}")
    check_locks_current()
    envs = _home() / "envs"
    envs.mkdir(parents=True, exist_ok=True)
    env = envs / env_key()
    with (envs / ".lock").open("w") as lock:
        # Concurrent runs (two terminals, CI and a developer) build once.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (env / READY_MARKER).exists():
            _build(env)
        (env / LAST_USED).touch()
        _remove_stale(envs, keep=env)
    return env


def _build(env: Path) -> None:
    if env.exists():
        _say(f"removing an incomplete environment at {env}")
        shutil.rmtree(env)
    log = env.parent / f"{env.name}.log"
    log.write_text("")
    _say(f"creating the environment in {env} from locks/ (first time only; ~11 GB)")
    _say(f"full installer log: {log}")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    installer = _install(env, log)
    seconds = time.monotonic() - started
    (env / READY_MARKER).write_text(
        json.dumps({"installer": installer, "seconds": round(seconds, 1), "key": env.name})
    )
    _say(f"environment ready in {seconds:.0f}s ({installer})")


def _install(env: Path, log: Path) -> str:
    """Install the locks with uv when it can, else with pip; return which one did."""
    python = env / "bin" / "python"
    planned = locked_entries(INSTALLED_LOCKS)
    choice = os.environ.get("SGL_NODE_INSTALLER", "auto")
    if choice not in ("auto", "uv", "pip"):
        sys.exit(f"bootstrap: SGL_NODE_INSTALLER must be auto, uv or pip, not {choice!r}")
    if choice != "pip":
        config = install.pip_config(python)
        reason = ""
        if config.untranslated():
            reason = f"pip options uv would not honour: {', '.join(config.untranslated())}"
        else:
            try:
                uv = install.tool_env(_home(), TOOLS_LOCK, tools(), _say, log) / "uv"
                install.install_with_uv(
                    uv, python, INSTALLED_LOCKS, config, _home() / "uv-cache", planned, _say, log
                )
                return "uv"
            except (install.InstallFailed, subprocess.CalledProcessError, OSError) as exc:
                reason = str(exc)
        if choice == "uv":
            sys.exit(f"bootstrap: uv could not install the environment: {reason}")
        _say(f"uv not used ({reason.splitlines()[0]}); installing with pip")
        shutil.rmtree(env)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    try:
        install.install_with_pip(python, INSTALLED_LOCKS, planned, _say, log)
    except install.InstallFailed as exc:
        sys.exit(f"bootstrap: {exc}")
    return "pip"


def lock(check: bool) -> None:
    """Regenerate the locks from pyproject.toml with uv (``check``: verify instead: exit 1
    when a lock differs from what pyproject.toml resolves to, keeping its current pins)."""
    home = _home()
    home.mkdir(parents=True, exist_ok=True)
    log = home / "lock.log"
    log.write_text("")
    uv = install.tool_env(home, TOOLS_LOCK, tools(), _say, log) / "uv"
    index_args, env = install.uv_index_args(
        install.pip_config(uv.parent / "python"), for_install=False
    )
    env.setdefault("UV_CACHE_DIR", os.environ.get("UV_CACHE_DIR", str(home / "uv-cache")))
    header = f"python3 supervisor/bootstrap.py lock  (inputs {lock_inputs_digest()})"
    options = [
        "--universal",
        "--generate-hashes",
        "--quiet",
        "--custom-compile-command",
        header,
        *index_args,
    ]
    differences: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        for target, inputs, stdin in _lock_jobs():
            out = Path(scratch) / target.name
            if target.exists():
                shutil.copy(target, out)  # uv keeps its pins where they still fit
            cmd = [str(uv), "pip", "compile", *inputs, *options, "-o", str(out)]
            proc = subprocess.run(
                cmd, input=stdin, text=True, capture_output=True, cwd=ROOT,
                env={**os.environ, **env}, check=False,
            )  # fmt: skip
            with log.open("a") as sink:
                sink.write(f"$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
            if proc.returncode != 0:
                sys.exit(f"bootstrap: uv pip compile failed for {target.name}:\n{proc.stderr}")
            if check:
                differences += _lock_differences(target, out)
            else:
                target.parent.mkdir(exist_ok=True)
                shutil.copy(out, target)
                _say(f"wrote {target.relative_to(ROOT)} ({locked_entries([target])} entries)")
    if differences:
        print("\n".join(differences), file=sys.stderr)
        sys.exit(
            "bootstrap: the locks disagree with pyproject.toml: run "
            "`python3 supervisor/bootstrap.py lock` and commit locks/"
        )
    if check:
        _say("locks agree with pyproject.toml")


def _lock_jobs() -> list[tuple[Path, list[str], str]]:
    """(lock file, uv pip compile inputs, what to feed on stdin) for each lock."""
    _, no_deps = requirements()
    tool = _load_pyproject()["tool"]
    assert isinstance(tool, dict)
    extras = tool["sgl-node"]["bootstrap"].get("extras", [])
    return [
        (ENV_LOCK, ["pyproject.toml", *(f"--extra={x}" for x in extras)], ""),
        (NO_DEPS_LOCK, ["-", "--no-deps", "--no-annotate"], "\n".join(no_deps)),
        (TOOLS_LOCK, ["-", "--no-annotate"], "\n".join(tools())),
    ]


def _lock_differences(committed: Path, resolved: Path) -> list[str]:
    """What differs between two locks: pinned entries and the recorded inputs (hash lists
    are left out: a registry may add a wheel for a pinned version without anything changing)."""

    def pins(path: Path) -> set[str]:
        if not path.exists():
            return set()
        return {m.group(0) for line in path.read_text().splitlines() if (m := _PIN.match(line))}

    old, new = pins(committed), pins(resolved)
    lines = [f"{committed.relative_to(ROOT)}: - {pin}" for pin in sorted(old - new)]
    lines += [f"{committed.relative_to(ROOT)}: + {pin}" for pin in sorted(new - old)]
    if _recorded_digest(committed) != _recorded_digest(resolved):
        lines.append(f"{committed.relative_to(ROOT)}: made from other inputs than pyproject.toml")
    return lines


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
    if command == "lock":
        if rest not in ([], ["--check"]):
            sys.exit(f"bootstrap: lock takes only --check, not {' '.join(rest)}")
        lock(check=bool(rest))
        return
    if command not in ("run", "test", "client", "exec", "env"):
        sys.exit(
            "bootstrap: unknown command "
            f"{command!r} (expected run, test, client, exec, env or lock)"
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
