"""The CPU stand-in for sgl_kernel: what install() does to sys.modules, and what it holds.

Everything that touches sys.modules runs in a fresh interpreter, so this test process
never sees a stand-in (or a half-imported real sgl_kernel).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from actors.engine_host import sgl_kernel_cpu
from actors.engine_host.sgl_kernel_cpu import UNAVAILABLE, SglKernelUnavailableError

REPO = Path(__file__).resolve().parents[2]


def run_python(
    code: str, *, path: Sequence[Path] = (), env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `code` in a fresh interpreter; it prints one JSON line last, returned decoded."""
    pythonpath = [str(p) for p in path] + [str(REPO)]
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def fake_package(root: Path, init: str, **submodules: str) -> Path:
    """A real, importable `sgl_kernel` package under `root` (put `root` first on the path)."""
    package = root / "sgl_kernel"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(init))
    for name, source in submodules.items():
        (package / f"{name}.py").write_text(textwrap.dedent(source))
    return root


@pytest.fixture
def broken_real_kernel(tmp_path: Path) -> Path:
    """Like the CUDA wheel here: loads a submodule, then fails for want of libcuda."""
    return fake_package(
        tmp_path / "broken",
        """
        from . import version
        raise ImportError("\\nlibcuda.so.1: cannot open shared object file\\nmore detail")
        """,
        version="__version__ = '0.0.0'",
    )


@pytest.fixture
def working_real_kernel(tmp_path: Path) -> Path:
    return fake_package(tmp_path / "working", "KIND = 'real'\n")


# -- install(): when it acts ------------------------------------------------------


@pytest.mark.parametrize("device", ["cuda", "xpu", "npu", "mps"])
def test_install_is_a_no_op_for_other_devices(device: str, broken_real_kernel: Path) -> None:
    result = run_python(
        f"""
        import json, sys
        from actors.engine_host import sgl_kernel_cpu
        installed = sgl_kernel_cpu.install({device!r})
        print(json.dumps({{"installed": installed,
                           "loaded": [k for k in sys.modules if k.startswith("sgl_kernel")]}}))
        """,
        path=[broken_real_kernel],
    )
    assert result == {"installed": False, "loaded": []}


def test_install_never_shadows_a_real_sgl_kernel_that_imports(working_real_kernel: Path) -> None:
    result = run_python(
        """
        import json, sys
        from actors.engine_host import sgl_kernel_cpu
        installed = sgl_kernel_cpu.install("cpu")
        import sgl_kernel
        print(json.dumps({"installed": installed, "kind": getattr(sgl_kernel, "KIND", None),
                          "stand_in": sgl_kernel_cpu.is_installed()}))
        """,
        path=[working_real_kernel],
    )
    assert result == {"installed": False, "kind": "real", "stand_in": False}


def test_install_places_the_stand_in_when_the_real_one_fails(broken_real_kernel: Path) -> None:
    result = run_python(
        """
        import json, sys
        from actors.engine_host import sgl_kernel_cpu
        first = sgl_kernel_cpu.install("cpu")
        second = sgl_kernel_cpu.install("cpu")
        import sgl_kernel
        from sgl_kernel import build_tree_kernel_efficient_cpu
        try:
            build_tree_kernel_efficient_cpu(1, 2, x=3)
        except sgl_kernel_cpu.SglKernelUnavailableError as exc:
            error = str(exc)
        print(json.dumps({
            "first": first, "second": second, "stand_in": sgl_kernel_cpu.is_installed(),
            "module_name": sgl_kernel.__name__,
            "leftovers": [k for k in sys.modules if k.startswith("sgl_kernel.")],
            "finders": [type(f).__name__ for f in sys.meta_path].count("_SubmoduleFinder"),
            "error": error,
        }))
        """,
        path=[broken_real_kernel],
    )
    assert result["first"] is True
    assert result["second"] is True  # idempotent
    assert result["stand_in"] is True
    assert result["module_name"] == "sgl_kernel"
    # the half-imported real package's submodule is gone
    assert result["leftovers"] == []
    assert result["finders"] == 1
    assert result["error"].startswith(
        "speculative decoding (EAGLE draft tree) needs sgl_kernel's CPU build: "
        "build_tree_kernel_efficient_cpu is not available"
    )
    assert "ImportError: libcuda.so.1: cannot open shared object file" in result["error"]


def test_only_the_known_names_exist_so_sglangs_import_fallbacks_work(
    broken_real_kernel: Path,
) -> None:
    result = run_python(
        """
        import importlib, importlib.util, json
        from actors.engine_host import sgl_kernel_cpu
        sgl_kernel_cpu.install("cpu")
        import sgl_kernel
        outcomes = {}
        for statement in ["from sgl_kernel import rmsnorm",
                          "from sgl_kernel.scalar_type import ScalarType",
                          "import sgl_kernel.allreduce",
                          "from sgl_kernel.mamba import causal_conv1d_fn_cpu"]:
            try:
                exec(statement)
                outcomes[statement] = "ok"
            except ImportError as exc:
                outcomes[statement] = type(exc).__name__ + ": " + str(exc)
        print(json.dumps({
            "outcomes": outcomes,
            "hasattr_rmsnorm": hasattr(sgl_kernel, "rmsnorm"),
            "names": sorted(n for n in vars(sgl_kernel) if not n.startswith("__")),
            "find_spec": importlib.util.find_spec("sgl_kernel").name,
        }))
        """,
        path=[broken_real_kernel],
    )
    outcomes = result["outcomes"]
    assert outcomes["from sgl_kernel import rmsnorm"].startswith("ImportError: cannot import")
    for statement in list(outcomes)[1:]:
        assert outcomes[statement].startswith("ModuleNotFoundError: No module named"), statement
    assert (
        "Mamba and linear-attention models (causal conv1d) needs sgl_kernel's CPU build"
        in (outcomes["from sgl_kernel.mamba import causal_conv1d_fn_cpu"])
    )
    assert (
        "the feature that imports sgl_kernel.allreduce needs sgl_kernel's CPU build"
        in (outcomes["import sgl_kernel.allreduce"])
    )
    assert result["hasattr_rmsnorm"] is False
    assert result["names"] == sorted(UNAVAILABLE)
    assert result["find_spec"] == "sgl_kernel"


def test_sglang_cpu_path_imports_with_the_stand_in_and_sees_no_amx_kernels() -> None:
    # One interpreter for both looks (each pays torch's import): first the real
    # sgl_kernel, which cannot load on this CPU machine (the CUDA build), then the stand-in.
    result = run_python(
        """
        import json
        try:
            import sgl_kernel
            real_imports = True
        except Exception:
            real_imports = False
        from actors.engine_host import sgl_kernel_cpu
        installed = sgl_kernel_cpu.install("cpu")
        import torch
        import sglang.srt.mem_cache.allocation
        import sglang.kernels.ops.kvcache.cache_move
        import sglang.kernels.ops.speculative.spec_tree
        import sglang.kernels.ops.speculative.cache_locs
        import sglang.kernels.ops.speculative.eagle
        import sglang.kernels.ops.speculative.multi_layer_eagle
        from sglang.srt.utils import common
        print(json.dumps({
            "real_imports": real_imports,
            "installed": installed,
            "is_cpu": common.is_cpu(),
            "amx_backend": common._is_intel_amx_backend_available(),
            "amx": common.cpu_has_amx_support(),
        }))
        """,
        env={"SGLANG_USE_CPU_ENGINE": "1"},
    )
    assert not result.pop("real_imports"), "the real sgl_kernel imports here: nothing to test"
    assert result == {"installed": True, "is_cpu": True, "amx_backend": False, "amx": False}


# -- what the stand-in holds -------------------------------------------------------


FROM_SGL_KERNEL = re.compile(r"\bfrom\s+sgl_kernel\s+import\b")


def cpu_guarded_sgl_kernel_imports(tree: ast.Module) -> set[str]:
    """Names imported from sgl_kernel in module-level `if`/`elif` branches about the CPU."""
    names: set[str] = set()
    for node in tree.body:
        branch: ast.stmt | None = node
        while isinstance(branch, ast.If):
            if "cpu" in ast.unparse(branch.test).lower():
                for statement in branch.body:
                    for sub in ast.walk(statement):
                        if isinstance(sub, ast.ImportFrom) and sub.module == "sgl_kernel":
                            names.update(alias.name for alias in sub.names)
            orelse = branch.orelse
            branch = orelse[0] if len(orelse) == 1 else None
    return names


def test_every_name_sglang_imports_at_module_level_on_the_cpu_is_in_the_stand_in() -> None:
    spec = importlib.util.find_spec("sglang")
    assert spec is not None
    assert spec.origin is not None
    imported: set[str] = set()
    for path in Path(spec.origin).parent.rglob("*.py"):
        source = path.read_text(errors="replace")
        # only the files that could hold such an import are parsed (120 files and 15 s
        # without this filter; ~37 with it)
        if "cpu" in source and FROM_SGL_KERNEL.search(source):
            imported |= cpu_guarded_sgl_kernel_imports(ast.parse(source))
    # A new SGLang that imports more must extend UNAVAILABLE (and find what calls it).
    assert imported == set(UNAVAILABLE)


@pytest.mark.parametrize("name", sorted(UNAVAILABLE))
def test_each_name_raises_a_clear_error_naming_its_feature(name: str) -> None:
    module = sgl_kernel_cpu.stand_in_module("ImportError: libcuda.so.1: cannot open")
    kernel = getattr(module, name)
    assert kernel.__name__ == name
    with pytest.raises(SglKernelUnavailableError) as raised:
        kernel(object(), 1, key="value")
    assert isinstance(raised.value, NotImplementedError)
    assert raised.value.name == name
    assert raised.value.feature == UNAVAILABLE[name]
    assert str(raised.value).startswith(
        f"{UNAVAILABLE[name]} needs sgl_kernel's CPU build: {name} is not available"
    )
    assert UNAVAILABLE[name].startswith("speculative decoding (")


def test_unknown_attributes_raise_attribute_error_with_the_reason() -> None:
    module = sgl_kernel_cpu.stand_in_module("ImportError: libcuda.so.1")
    with pytest.raises(AttributeError, match=r"has no attribute 'rmsnorm'.*libcuda\.so\.1"):
        _ = module.rmsnorm
    assert module.__path__ == []  # a package with no submodules
    assert not hasattr(module, "convert_weight_packed")
