"""Messages between the node's actors (in-process; never on the wire)."""

from __future__ import annotations

from typing import Any

import msgspec

from messages.engine import HostChunk
from messages.request import EmbedRequest, GenerateRequest

__all__ = [
    "AbortGenerate",
    "DeregisterAdapter",
    "EngineControl",
    "EngineOutput",
    "EngineOutputs",
    "EngineReleased",
    "EngineResumed",
    "EngineStatus",
    "FrontendFailed",
    "GetEngineInfo",
    "GetEngineStatus",
    "GetFrontendPort",
    "GetLink",
    "GetRegistration",
    "IncomingCancel",
    "IncomingRequest",
    "IncomingResume",
    "LinkChanged",
    "RegisterAdapter",
    "RegistrationStatus",
    "SubmitEmbed",
    "SubmitGenerate",
]


class GetLink(msgspec.Struct, frozen=True):
    """Ask the FabricActor for the node's NATS link."""


class LinkChanged(msgspec.Struct, frozen=True):
    """The NATS connection was lost or came back."""

    event: str  # disconnected | reconnected | closed


class IncomingRequest(msgspec.Struct, frozen=True):
    """A raw request from the request plane, handed from the NATS thread to a handler."""

    subject: str
    reply: str
    data: bytes
    received_at: float  # monotonic


class IncomingCancel(msgspec.Struct, frozen=True):
    """A raw cancel message from the cancel subject."""

    data: bytes


class IncomingResume(msgspec.Struct, frozen=True):
    """A raw resume request (chunks lost in transit) from the resume subject."""

    reply: str
    data: bytes


class SubmitGenerate(msgspec.Struct, frozen=True):
    """Handler → EngineActor: run `request`; outputs go back to the actor at `reply_path`."""

    request: GenerateRequest
    reply_path: str
    max_prompt_tokens: int = 0
    engine_id: str = ""  # the attempt's id in the engine; "" the request's own id
    continuation_ids: list[int] = []  # tokens already generated, after the prompt


class SubmitEmbed(msgspec.Struct, frozen=True):
    """Handler → EngineActor: embed; the answer comes back as one EngineOutputs chunk."""

    request: EmbedRequest
    texts: list[str] | None
    token_ids: list[list[int]] | None
    reply_path: str
    max_prompt_tokens: int = 0


class AbortGenerate(msgspec.Struct, frozen=True):
    """Handler → EngineActor: abort a request (cancel, deadline, drain)."""

    request_id: str
    reason: str  # cancelled | deadline_exceeded | shutdown


class EngineOutput(msgspec.Struct, frozen=True):
    """EngineActor → handler: one chunk of a request's output."""

    chunk: HostChunk


class EngineOutputs(msgspec.Struct, frozen=True):
    """EngineActor → handler: the chunks for this handler that arrived together."""

    chunks: list[HostChunk]


class GetEngineInfo(msgspec.Struct, frozen=True):
    """Ask EngineActor for the engine's `EngineInfo`."""


class GetEngineStatus(msgspec.Struct, frozen=True):
    """Ask EngineActor whether the engine is healthy, and its in-flight count."""


class EngineStatus(msgspec.Struct, frozen=True):
    """Answer to GetEngineStatus."""

    healthy: bool
    inflight: int
    consecutive_probe_failures: int
    detail: str = ""


class EngineControl(msgspec.Struct, frozen=True):
    """Run a control op on the engine host (ask; answered with a HostControlReply)."""

    op: str
    args: dict[str, Any] = {}
    timeout: float = 30.0


class EngineReleased(msgspec.Struct, frozen=True):
    """Admin → RegistrarActor: the engine released its memory; withdraw the instance."""


class EngineResumed(msgspec.Struct, frozen=True):
    """Admin → RegistrarActor: the engine resumed its memory; list the instance again."""


class RegisterAdapter(msgspec.Struct, frozen=True):
    """Admin → RegistrarActor (ask): a LoRA adapter was loaded; register its model card.
    The answer is True, or why it failed."""

    name: str


class DeregisterAdapter(msgspec.Struct, frozen=True):
    """Admin → RegistrarActor (ask): a LoRA adapter was unloaded; remove its card."""

    name: str


class GetRegistration(msgspec.Struct, frozen=True):
    """Ask the RegistrarActor whether the instance is registered."""


class RegistrationStatus(msgspec.Struct, frozen=True):
    """Answer of the RegistrarActor: is the instance in discovery now?"""

    registered: bool
    instance_id: str
    key: str


class FrontendFailed(msgspec.Struct, frozen=True):
    """The server thread reports that the HTTP server ended on its own."""

    detail: str


class GetFrontendPort(msgspec.Struct, frozen=True):
    """Ask the port the frontend listens on (useful when configured as 0)."""
