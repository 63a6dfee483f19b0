"""Discovery records in the instances bucket (JetStream KV, JSON values)."""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["InstanceRecord", "ModelCard", "Subjects"]


class ModelCard(msgspec.Struct, frozen=True):
    """What a router needs to know about the model behind an instance."""

    name: str
    context_length: int
    kv_block_size: int
    total_kv_blocks: int
    max_batch_size: int
    dp_size: int
    mode: str  # aggregated | prefill | decode | embedding
    backend: str  # sim | sglang
    model_type: str = "chat"  # chat | completions | embedding
    # Where a frontend finds the tokenizer (and chat template): a local Hugging Face
    # model directory, or "sim-bytes" for the sim engine's byte tokenizer.
    tokenizer: str = ""
    runtime_config: dict[str, Any] = {}


class Subjects(msgspec.Struct, frozen=True):
    """Where to send work and cancellations, and where events appear."""

    generate: str  # queue group: any instance of the component
    instance: str  # this instance only
    cancel: str
    kv_events: str
    load_metrics: str
    tree: str
    admin: str = ""  # only when [admin] is enabled
    resume: str = ""  # ask again for chunks lost in transit (ResumeRequest)


class InstanceRecord(msgspec.Struct, frozen=True):
    """One live instance; the key is `{namespace}.{component}.{endpoint}.{instance_id}`."""

    instance_id: str
    namespace: str
    component: str
    endpoint: str
    subjects: Subjects
    model: ModelCard
    host: str
    pid: int
    started_at: float  # unix time
    version: str
    # It sends a request's chunks straight to a frontend that asks (GenerateRequest.
    # reply_direct); False from nodes before direct streams, which refuse the field.
    direct_streams: bool = False
