"""NVIDIA Dynamo's environment for the peer benchmark: apart from sgl-node's, outside the
checkout, built from committed locks like the main one, never by `bootstrap.py test`.

    python3 supervisor/bootstrap.py exec python -m tests.benchmarks.peer_env        # path
    python3 supervisor/bootstrap.py exec python -m tests.benchmarks.peer_env lock   # re-lock

`ai-dynamo` requires `aisimulate`, a placeholder whose build downloads from a host this
machine cannot reach (only Dynamo's planner imports it): `ai-dynamo` is installed without
its dependencies and its other requirements are listed here. The environment lives in
`$SGL_NODE_HOME/peer-envs/KEY`, KEY a hash of the locks and the interpreter; one built for
other locks is removed once unused for an hour. py-spy is here too (profiles, not product).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from supervisor import bootstrap
from supervisor import bootstrap_install as install

DYNAMO = "1.6.1"
# ai-dynamo's requirements but aisimulate, plus the profiler
REQUIREMENTS = [
    f"ai-dynamo-runtime=={DYNAMO}",
    "aiohttp>=3.14.3,<4",
    "certifi>=2026.10.19",
    "kubernetes>=32.0.1,<33",
    "msgspec>=0.19",
    "prometheus-client>=0.23.1,<1",
    "pyzmq>=26",
    "redis>=6.2,<9",
    "tqdm>=4",
    "transformers>=4.56",
    "typing-extensions>=4.10",
    "zstandard>=0.23,<1",
    "pydantic>=2.10.6,<=2.13.5",
    "uvloop>=0.21",
    "py-spy",
]
NO_DEPS = [f"ai-dynamo=={DYNAMO}"]
LOCK = bootstrap.LOCKS / "peer.txt"
NO_DEPS_LOCK = bootstrap.LOCKS / "peer-no-deps.txt"
LAYOUT = "1"


def home() -> Path:
    """Where peer environments live."""
    return bootstrap._home() / "peer-envs"


def env_key() -> str:
    """The environment's name: the locks' hash, with the interpreter it is built on."""
    material = json.dumps(
        {
            "layout": LAYOUT,
            "python": sys.version,
            "executable": os.path.realpath(sys.executable),
            "locks": [hashlib.sha256(p.read_bytes()).hexdigest() for p in (LOCK, NO_DEPS_LOCK)],
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:16]


def ensure() -> Path:
    """Build the environment if it is missing or incomplete; return its directory."""
    envs = home()
    envs.mkdir(parents=True, exist_ok=True)
    env = envs / env_key()
    with (envs / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (env / bootstrap.READY_MARKER).exists():
            _build(env)
        (env / bootstrap.LAST_USED).touch()
        bootstrap._remove_stale(envs, keep=env)
    return env


def _build(env: Path) -> None:
    shutil.rmtree(env, ignore_errors=True)
    log = env.parent / f"{env.name}.log"
    log.write_text("")
    say = bootstrap._say
    say(f"creating Dynamo's environment in {env} (log: {log})")
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    python = env / "bin" / "python"
    uv = install.tool_env(bootstrap._home(), bootstrap.TOOLS_LOCK, bootstrap.tools(), say, log)
    locks = [LOCK, NO_DEPS_LOCK]
    install.install_with_uv(
        uv / "uv",
        python,
        locks,
        install.pip_config(python),
        bootstrap._home() / "uv-cache",
        bootstrap.locked_entries(locks),
        say,
        log,
    )
    seconds = round(time.monotonic() - started, 1)
    (env / bootstrap.READY_MARKER).write_text(json.dumps({"seconds": seconds, "key": env.name}))


def lock() -> None:
    """Resolve REQUIREMENTS and NO_DEPS into the committed locks (exact pins, hashes)."""
    say = bootstrap._say
    where = bootstrap._home()
    uv = install.tool_env(where, bootstrap.TOOLS_LOCK, bootstrap.tools(), say, where / "lock.log")
    index_args, env = install.uv_index_args(install.pip_config(uv / "python"), for_install=False)
    env.setdefault("UV_CACHE_DIR", str(where / "uv-cache"))
    header = "python -m tests.benchmarks.peer_env lock"
    for target, inputs, extra in ((LOCK, REQUIREMENTS, []), (NO_DEPS_LOCK, NO_DEPS, ["--no-deps"])):
        with tempfile.TemporaryDirectory() as scratch:
            out = Path(scratch) / target.name
            subprocess.run(
                [str(uv / "uv"), "pip", "compile", "-", *extra, "--generate-hashes", "--quiet",
                 "--no-annotate", "--custom-compile-command", header, *index_args, "-o", str(out)],
                input="\n".join(inputs), text=True, check=True, env={**os.environ, **env},
            )  # fmt: skip
            shutil.copy(out, target)
        say(f"wrote {target} ({bootstrap.locked_entries([target])} entries)")


if __name__ == "__main__":
    if sys.argv[1:] == ["lock"]:
        lock()
    else:
        print(ensure())
