"""Benchmark-only: prepare SGLang's CPU path in every Python process started with this
directory on PYTHONPATH (SGLang's own server and its spawned children included)."""

import os

if os.environ.get("SGLNODE_SGLANG_CPU") == "1":
    from actors.engine_host.sglang_children import prepare_cpu_process

    prepare_cpu_process()
