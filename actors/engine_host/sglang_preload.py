"""Imported by the engine host's forkserver before it forks SGLang's children (see
`sglang_children`): the CPU preparation first, then what the scheduler and the
detokenizer run, so that a forked child starts with all of it in place."""

from __future__ import annotations

import importlib

from actors.engine_host.sglang_children import die_with_parent, prepare_cpu_process

die_with_parent()
prepare_cpu_process()  # before SGLang is imported (idempotent: that import ran it too)
for _module in ("sglang.srt.managers.scheduler", "sglang.srt.managers.detokenizer_manager"):
    importlib.import_module(_module)
