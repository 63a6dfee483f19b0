"""How the bootstrap installs a lock into an environment: uv when it can, pip otherwise.

Standard library only: it runs before anything is installed (see `bootstrap.py`).

- **The machine's pip configuration is the source of truth** for where packages come
  from (index, extra indexes, find-links, certificate) and what is allowed (constraint
  files). pip reads it itself; for uv, which does not read it, it is translated into
  uv's options. A pip option that has no translation here makes the bootstrap use pip,
  so that uv never installs from somewhere pip would not.
- **uv comes from a small tool environment of its own** (`$SGL_NODE_HOME/tools/<hash>`),
  installed by pip from the hash-locked `locks/tools.txt`.
- **Progress**: the installer's own step lines, and every few seconds a line with the
  packages in place and the bytes unpacked so far, so no minute of an install is silent.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "InstallFailed",
    "InstallProgress",
    "PipConfig",
    "install_with_pip",
    "install_with_uv",
    "pip_config",
    "tool_env",
    "uv_index_args",
]

DEFAULT_INDEX = "https://pypi.org/simple"
HEARTBEAT = 10.0  # seconds between progress lines while an installer is quiet

# pip options that do not change what gets installed or from where: uv may go ahead.
_HARMLESS_PIP_OPTIONS = frozenset(
    {
        "disable-pip-version-check",
        "default-timeout",
        "timeout",
        "progress-bar",
        "no-cache-dir",
        "cache-dir",
        "quiet",
        "verbose",
        "root-user-action",
        "no-input",
        "no-color",
        "retries",
        "require-virtualenv",
        "break-system-packages",
    }
)
# pip options translated into uv's (see `uv_index_args`).
_TRANSLATED_PIP_OPTIONS = frozenset(
    {"index-url", "extra-index-url", "find-links", "no-index", "constraint", "cert", "trusted-host"}
)


class InstallFailed(Exception):
    """An installer ended with an error; the message says which and where its log is."""


Say = Callable[[str], None]


@dataclass(frozen=True)
class PipConfig:
    """The machine's effective pip options (``pip config list``: env > install > global)."""

    options: dict[str, str] = field(default_factory=dict)

    def values(self, key: str) -> list[str]:
        """A multi-valued option (whitespace separated, as pip reads it)."""
        return self.options.get(key, "").split()

    @property
    def index_url(self) -> str:
        """The primary index (PyPI unless configured)."""
        return self.options.get("index-url", "").strip() or DEFAULT_INDEX

    def untranslated(self) -> list[str]:
        """Options uv would not honour; non-empty means: install with pip."""
        return sorted(
            key
            for key in self.options
            if key not in _HARMLESS_PIP_OPTIONS and key not in _TRANSLATED_PIP_OPTIONS
        )


_SECTION_RANK = {":env:": 0, "install": 1, "global": 2}


def parse_pip_config(listing: str) -> PipConfig:
    """Parse ``pip config list`` output (``section.key='value'`` lines) into one value per
    key, the most specific section winning as pip does (environment, install, global)."""
    best: dict[str, tuple[int, str]] = {}
    for line in listing.splitlines():
        name, sep, raw = line.partition("=")
        section, dot, key = name.rpartition(".")
        if not sep or not dot or section not in _SECTION_RANK:
            continue
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw.strip("'\"")
        rank = _SECTION_RANK[section]
        if key not in best or rank < best[key][0]:
            best[key] = (rank, str(value))
    return PipConfig({key: value for key, (_, value) in best.items()})


def pip_config(python: Path) -> PipConfig:
    """The effective pip configuration as the environment's pip sees it."""
    result = subprocess.run(
        [str(python), "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    return parse_pip_config(result.stdout if result.returncode == 0 else "")


def uv_index_args(config: PipConfig, *, for_install: bool) -> tuple[list[str], dict[str, str]]:
    """uv options and environment variables that say what pip's configuration says.

    A lock is resolved against the primary index only (its hashes are the registry's);
    installs also use the extra indexes and find-links (local mirrors), every file checked
    against the lock's hashes. uv would take a package from the first index that has it
    at all; ``unsafe-best-match`` lets it find the pinned version on any of them, as pip does.
    """
    args = ["--index-url", config.index_url]
    env: dict[str, str] = {}
    if for_install:
        if config.options.get("no-index", "").lower() in ("1", "true", "yes", "on"):
            args = ["--no-index"]
        for url in config.values("extra-index-url"):
            args += ["--extra-index-url", url]
        for link in config.values("find-links"):
            args += ["--find-links", link]
        args += ["--index-strategy", "unsafe-best-match"]
    for path in config.values("constraint"):
        args += ["--constraint", path]
    for host in config.values("trusted-host"):
        args += ["--allow-insecure-host", host]
    if config.options.get("cert"):
        env["SSL_CERT_FILE"] = config.options["cert"]
    return args, env


def tool_env(home: Path, tools_lock: Path, fallback: list[str], say: Say, log: Path) -> Path:
    """The bootstrap's own tool environment (uv), built once per content of its lock.

    Installed by pip from ``tools_lock`` (hashes checked); before that lock exists (the
    first ``bootstrap.py lock``), from ``fallback`` (exact pins). Returns its ``bin``.
    """
    spec = tools_lock.read_bytes() if tools_lock.exists() else "\n".join(fallback).encode()
    tools = home / "tools"
    where = tools / hashlib.sha256(spec).hexdigest()[:16]
    if (where / ".complete").exists():
        return where / "bin"
    tools.mkdir(parents=True, exist_ok=True)
    for other in tools.iterdir():  # a tool env of another lock: rebuilt in seconds if needed
        if other.is_dir() and other != where:
            shutil.rmtree(other, ignore_errors=True)
    shutil.rmtree(where, ignore_errors=True)
    say(f"installing the bootstrap's tools ({', '.join(fallback)}) in {where}")
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    if tools_lock.exists():
        args = ["--no-deps", "--require-hashes", "-r", str(tools_lock)]
    else:
        args = list(fallback)
    run_logged(
        [
            str(where / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            *args,
        ],
        log,
        lambda _line: None,
        {},
    )
    (where / ".complete").touch()
    return where / "bin"


def run_logged(
    cmd: list[str], log: Path, on_line: Callable[[str], None], env: dict[str, str]
) -> None:
    """Run ``cmd``, its output appended to ``log`` and fed line by line to ``on_line``;
    raise `InstallFailed` with the log's tail if it fails."""
    with log.open("a") as sink:
        sink.write(f"$ {' '.join(cmd)}\n")
        sink.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, **env},
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sink.write(line)
            on_line(line.strip())
        code = proc.wait()
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        what = " ".join([Path(cmd[0]).name, *cmd[1:4]])
        msg = f"{what} failed (exit {code}); full log: {log}\n{tail}"
        raise InstallFailed(msg)


def _site_packages(env: Path) -> Path:
    found = sorted((env / "lib").glob("python3*/site-packages"))
    return found[0] if found else env / "lib"


def _tree_bytes(roots: Iterable[Path]) -> int:
    """Bytes under ``roots``, each hard-linked file counted once (uv links its cache)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in roots:
        for folder, _dirs, files in os.walk(root):
            for name in files:
                with contextlib.suppress(OSError):
                    st = os.lstat(os.path.join(folder, name))
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        total += st.st_size
    return total


class InstallProgress:
    """Progress of one install: step lines from the installer's output, and a heartbeat
    line every `HEARTBEAT` s (packages in place / total, bytes unpacked) in between."""

    def __init__(self, say: Say, tool: str, env: Path, planned: int, watch: list[Path]) -> None:
        self.say = say
        self.tool = tool
        self.site = _site_packages(env)
        self.planned = planned  # requirement entries in the lock (before markers)
        self.total: int | None = None  # packages this machine gets, once the tool says
        self.ignored = 0
        self.fetched = 0
        self.step = "starting"
        self.watch = [*watch, self.site]
        self.started = time.monotonic()
        self._baseline_bytes = _tree_bytes(self.watch)
        self._baseline_pkgs = self._installed()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="progress", daemon=True)

    def __enter__(self) -> InstallProgress:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _installed(self) -> int:
        with contextlib.suppress(OSError):
            return sum(1 for p in self.site.iterdir() if p.name.endswith(".dist-info"))
        return 0

    def _line(self, text: str) -> None:
        self.say(f"{int(time.monotonic() - self.started):4d}s  {self.tool}: {text}")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            placed = self._installed() - self._baseline_pkgs
            written = (_tree_bytes(self.watch) - self._baseline_bytes) / 1e9
            total = self.total if self.total is not None else self.planned - self.ignored
            fetched = f", {self.fetched} fetched" if self.step == "fetching" else ""
            self._line(
                f"{self.step}: {max(placed, 0)}/{total} packages in place{fetched}, "
                f"{max(written, 0):.1f} GB unpacked"
            )

    def pip_line(self, line: str) -> None:
        """Follow pip's output (``pip install --no-deps -r LOCK``)."""
        if line.startswith("Ignoring "):  # a marker that does not match this machine
            self.ignored += 1
        elif line.startswith(("Collecting ", "Processing ")):  # from an index / a local file
            self.fetched += 1
            self.step = "fetching"
            if self.fetched == 1 or self.fetched % 25 == 0:
                self._line(f"fetching ({self.fetched}/{self.planned - self.ignored})")
        elif line.startswith("Installing collected packages:"):
            self.total = len(line.split(":", 1)[1].split(","))
            self.step = "unpacking"
            self._line(f"unpacking {self.total} packages")
        elif line.startswith("Successfully installed"):
            self._line(f"installed {len(line.split()) - 2} packages")

    def uv_line(self, line: str) -> None:
        """Follow uv's output (``uv pip install``: Resolved / Prepared / Installed)."""
        match = re.match(r"(Resolved|Prepared|Installed|Uninstalled) (\d+) packages?", line)
        if not match:
            return
        what, count = match.group(1), int(match.group(2))
        if what == "Resolved":
            self.total = count
            self.step = "fetching and unpacking into the cache"
        elif what == "Prepared":
            self.step = "linking into the environment and compiling bytecode"
        self._line(line)


def install_with_pip(
    python: Path, requirements: list[Path], planned: int, say: Say, log: Path
) -> None:
    """Install the locked requirements with the environment's own pip (hashes checked,
    no dependency resolution: the lock is complete; pip applies the machine's config)."""
    args = ["--no-deps", "--require-hashes", "--progress-bar", "off"]
    for path in requirements:
        args += ["-r", str(path)]
    env = python.parent.parent
    with InstallProgress(say, "pip", env, planned, []) as progress:
        run_logged(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", *args],
            log,
            progress.pip_line,
            {"PIP_NO_INPUT": "1"},
        )


def install_with_uv(
    uv: Path,
    python: Path,
    requirements: list[Path],
    config: PipConfig,
    cache: Path,
    planned: int,
    say: Say,
    log: Path,
) -> None:
    """Install the locked requirements with uv, from the same sources pip would use."""
    index_args, env = uv_index_args(config, for_install=True)
    env.setdefault("UV_CACHE_DIR", os.environ.get("UV_CACHE_DIR", str(cache)))
    # Not --require-hashes: uv then refuses the machine's constraint files (torch<=X is not
    # an exact pin). Every lock entry carries its hashes, and uv checks each one it is given.
    # Bytecode compiled as pip does: otherwise every first import pays for it, and the
    # comparison with pip would not be of the same environment.
    args = ["--python", str(python), "--no-deps", "--compile-bytecode", *index_args]
    for path in requirements:
        args += ["-r", str(path)]
    watch = [Path(env["UV_CACHE_DIR"])]
    with InstallProgress(say, "uv", python.parent.parent, planned, watch) as progress:
        run_logged([str(uv), "pip", "install", *args], log, progress.uv_line, env)
