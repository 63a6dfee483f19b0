"""A stand-in for `sgl_kernel` that lets SGLang 0.5.23 run on the CPU without its CPU build.

SGLang's CPU path (`SGLANG_USE_CPU_ENGINE=1`, `device="cpu"`) imports a CPU build of
`sgl_kernel` that PyPI does not publish; the `sglang-kernel` wheel that pip installs is
a CUDA build and fails to import without `libcuda.so.1`. `install("cpu")` puts a
module named `sgl_kernel` into `sys.modules` — only when the real one cannot be
imported — so that `import sglang` succeeds.

What the stand-in provides, honestly: **no kernels**. It holds the nine names SGLang
imports from `sgl_kernel` at module level under a CPU condition (`UNAVAILABLE`); all
belong to speculative decoding, and calling any of them raises
`SglKernelUnavailableError` naming that feature. On a real engine with a llama model
(plain and streamed generation, abort, prefix-cache hits, KV events, batched decoding,
chunked prefill, metrics, `dp_size=2`), a tracing wrapper saw none of them called.
Every other name is absent: `from sgl_kernel import X` raises ImportError, `hasattr`
is False, and `import sgl_kernel.X` raises ModuleNotFoundError naming the feature
(NGRAM speculative decoding fails at start-up that way), so SGLang's own
`try: ... except ImportError` fallbacks (`sgl_kernel.scalar_type`, `.allreduce`,
`rmsnorm`...) take the same branch as on a machine without sgl_kernel.

It registers no `torch.ops.sgl_kernel` ops. That is deliberate: SGLang reads the op
`convert_weight_packed` (on AMX hardware) as the sign that the AMX kernels exist
(`cpu_has_amx_support`); without it every layer takes its plain-PyTorch
`forward_native` path, so the llama path calls no `torch.ops.sgl_kernel` op. Model
files that bind such ops at import (grok, qwen3_5, ...) fail to import; SGLang logs
"Ignore import error when loading sglang.srt.models.X" and carries on.

SGLang starts its scheduler and detokenizer with multiprocessing's *spawn*: each
child re-imports the parent's main module, so `install` must run on import of that
module (at top level), not only under `if __name__ == "__main__"`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

__all__ = [
    "MODULE_NAME",
    "SUBMODULE_FEATURES",
    "UNAVAILABLE",
    "SglKernelUnavailableError",
    "install",
    "is_installed",
    "stand_in_module",
]

MODULE_NAME = "sgl_kernel"
_MARKER = "__sgl_node_stand_in__"

_SPEC = "speculative decoding"
# Every name SGLang 0.5.23 imports from sgl_kernel at module level under a CPU
# condition (sglang/kernels/ops/{kvcache,speculative}/, sglang/srt/mem_cache/
# allocation.py), with the feature that calls it. All but the last are imported by any
# CPU engine; rotate_input_ids_cpu only when multi-layer EAGLE is loaded. The KV-cache
# copy also runs when the KV pool is created for any speculative algorithm, so such an
# engine fails at start-up, with this message.
UNAVAILABLE: dict[str, str] = {
    "copy_all_layer_kv_cache_cpu": f"{_SPEC} (KV-cache copy between slots)",
    "assign_req_to_token_pool_cpu": f"{_SPEC} (KV slots of draft tokens)",
    "build_tree_kernel_efficient_cpu": f"{_SPEC} (EAGLE draft tree)",
    "verify_tree_greedy_cpu": f"{_SPEC} (EAGLE tree verification)",
    "assign_draft_cache_locs_contiguous_cpu": f"{_SPEC} (EAGLE draft KV slots)",
    "assign_extend_cache_locs_cpu": f"{_SPEC} (EAGLE extend KV slots)",
    "fill_accept_out_cache_loc_cpu": f"{_SPEC} (KV slots of accepted tokens)",
    "fill_bonus_tokens_cpu": f"{_SPEC} (bonus tokens)",
    "rotate_input_ids_cpu": f"{_SPEC} (multi-layer EAGLE input rotation)",
}
# Submodules of sgl_kernel that SGLang imports inside features (none has a CPU
# kernel here); importing any submodule raises ModuleNotFoundError naming its feature.
SUBMODULE_FEATURES: dict[str, str] = {
    "speculative": f"{_SPEC} (draft-tree reconstruction, e.g. NGRAM)",
    "mamba": "Mamba and linear-attention models (causal conv1d)",
    "kvcacheio": "the hierarchical KV cache (host-memory transfers)",
}


class SglKernelUnavailableError(NotImplementedError):
    """A kernel of sgl_kernel's CPU build was called, and that build is not installed."""

    def __init__(self, name: str, feature: str, reason: str) -> None:
        self.name = name
        self.feature = feature
        super().__init__(
            f"{feature} needs sgl_kernel's CPU build: {name} is not available "
            f"(sgl-node runs SGLang on the CPU with a stand-in for sgl_kernel that "
            f"provides no kernels; the real module failed to import: {reason})"
        )


def install(device: str) -> bool:
    """Put the stand-in into `sys.modules["sgl_kernel"]` if SGLang on `device` needs it.

    Acts only for `device == "cpu"` and only when the real `sgl_kernel` cannot be
    imported; a working one (a GPU install, or a CPU build) is never shadowed. Call
    it before SGLang is imported. Returns whether the stand-in is in place (also when
    an earlier call installed it).
    """
    if device != "cpu":
        return False
    if is_installed():
        return True
    try:
        importlib.import_module(MODULE_NAME)
    except Exception as exc:  # a broken build fails in many ways: ImportError, OSError...  # noqa: BLE001
        first_line = next(iter(str(exc).strip().splitlines()), "")
        reason = f"{type(exc).__name__}: {first_line}"
    else:
        return False
    # A failed package import leaves the submodules it had loaded behind; drop them,
    # or `import sgl_kernel.<sub>` would find those halves of the real package.
    for key in [k for k in sys.modules if k.startswith(MODULE_NAME + ".")]:
        del sys.modules[key]
    sys.modules[MODULE_NAME] = stand_in_module(reason)
    sys.meta_path.insert(0, _SubmoduleFinder(reason))
    return True


def is_installed() -> bool:
    """Whether `sys.modules["sgl_kernel"]` is this stand-in."""
    return getattr(sys.modules.get(MODULE_NAME), _MARKER, False) is True


def stand_in_module(reason: str) -> types.ModuleType:
    """The module `install` places as `sgl_kernel`; `reason` says why the real one failed."""
    module = types.ModuleType(MODULE_NAME, __doc__)
    module.__spec__ = importlib.machinery.ModuleSpec(
        MODULE_NAME, None, origin=__file__, is_package=True
    )
    # A package with nowhere to look: submodule imports reach _SubmoduleFinder, whose
    # error names the feature ("'sgl_kernel' is not a package" would name none).
    module.__path__ = []
    setattr(module, _MARKER, True)
    for name, feature in UNAVAILABLE.items():
        setattr(module, name, _unavailable(name, feature, reason))

    def __getattr__(name: str) -> NoReturn:  # noqa: N807 (PEP 562 module __getattr__)
        raise AttributeError(
            f"module {MODULE_NAME!r} (sgl-node's CPU stand-in, no kernels) has no "
            f"attribute {name!r}; the real sgl_kernel failed to import: {reason}"
        )

    module.__dict__["__getattr__"] = __getattr__
    return module


def _unavailable(name: str, feature: str, reason: str) -> Callable[..., NoReturn]:
    def kernel(*_args: Any, **_kwargs: Any) -> NoReturn:
        raise SglKernelUnavailableError(name, feature, reason)

    kernel.__name__ = kernel.__qualname__ = name
    kernel.__doc__ = f"Unavailable here: {feature} needs sgl_kernel's CPU build."
    return kernel


class _SubmoduleFinder(importlib.abc.MetaPathFinder):
    """Turns `import sgl_kernel.<sub>` into a ModuleNotFoundError that names the feature."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(MODULE_NAME + ".") or not is_installed():
            return None
        submodule = fullname.split(".")[1]
        feature = SUBMODULE_FEATURES.get(submodule, f"the feature that imports {fullname}")
        # ModuleNotFoundError with name=fullname: SGLang's `except ImportError` fallbacks
        # and `from sgl_kernel import x` (which probes a submodule x) work as usual.
        raise ModuleNotFoundError(
            f"No module named {fullname!r}: {feature} needs sgl_kernel's CPU build "
            f"(sgl-node runs SGLang on the CPU with a stand-in for sgl_kernel that "
            f"provides no kernels; the real module failed to import: {self.reason})",
            name=fullname,
        )
