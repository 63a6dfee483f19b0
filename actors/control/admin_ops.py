"""The admin operations, shared by the admin subject and the `/engine/` HTTP routes.

Each op runs on the caller's worker thread (never an actor's) and returns an
`AdminReply`. Engine ops go to the EngineActor; `release_memory` withdraws the instance
from discovery until `resume_memory` (both idempotent); a loaded LoRA adapter is
registered as a model card of its own (and unloaded again if that fails), unloading it
removes the card.
"""

from __future__ import annotations

import re
from concurrent.futures import Future
from typing import Any

import msgspec

from messages.chaos import AdminReply, Fault, InjectFault
from messages.engine import ENGINE_OPS, HostControlReply
from messages.node import (
    DeregisterAdapter,
    EngineControl,
    EngineReleased,
    EngineResumed,
    RegisterAdapter,
)
from supervisor.core import WhichChildren, ask, whereis

__all__ = ["AdminOps"]

_ENGINE_TIMEOUT = 600.0
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


class AdminOps:
    """Runs admin ops against one node's tree (by path)."""

    def __init__(self, root: str, engine: str, registrar: str, chaos: str | None) -> None:
        self.root = root
        self.engine = engine
        self.registrar = registrar
        self.chaos = chaos

    def run(self, op: str, args: dict[str, Any]) -> AdminReply:
        """Run one op; never raises (failures are replies)."""
        try:
            if op == "chaos":
                return self._chaos(args)
            if op == "tree":
                rows = ask(self.root, WhichChildren(recursive=True), timeout=5)
                return AdminReply(ok=True, data={"children": msgspec.to_builtins(rows)})
            if op in ENGINE_OPS:
                return self._engine(op, args)
            return AdminReply(ok=False, error="invalid", message=f"unknown op {op!r}")
        except Exception as exc:  # noqa: BLE001 - the engine restarted, timed out...
            return AdminReply(ok=False, error="failed", message=f"{type(exc).__name__}: {exc}")

    def _chaos(self, args: dict[str, Any]) -> AdminReply:
        if self.chaos is None:
            return AdminReply(
                ok=False,
                error="disabled",
                message="fault injection is off ([chaos] enabled = false)",
            )
        try:
            fault = msgspec.convert(args, Fault)
        except msgspec.ValidationError as exc:
            return AdminReply(ok=False, error="invalid", message=str(exc))
        ok, what = ask(self.chaos, InjectFault(fault), timeout=15)
        return AdminReply(ok=ok, message=what, error="" if ok else "failed")

    def _engine(self, op: str, args: dict[str, Any]) -> AdminReply:
        name = str(args.get("name", ""))
        if op in ("lora_load", "lora_unload") and not _ADAPTER_NAME.match(name):
            return AdminReply(
                ok=False,
                error="invalid",
                message=f"adapter name {name!r}: use letters, digits, _ and -",
            )
        result = self._control(op, args)
        if result.ok and op in ("release_memory", "resume_memory"):
            self._tell_registrar(EngineReleased() if op == "release_memory" else EngineResumed())
        if result.ok and op == "lora_load":
            registered = self._ask_registrar(RegisterAdapter(name))
            if registered is not True:  # roll back: an adapter nobody can find is no use
                self._control("lora_unload", {"name": name})
                return AdminReply(
                    ok=False,
                    error="failed",
                    message=f"adapter loaded but not registered ({registered}); unloaded again",
                )
        if result.ok and op == "lora_unload":
            self._ask_registrar(DeregisterAdapter(name))
        return AdminReply(
            ok=result.ok,
            message=result.message,
            data=result.data,
            error="" if result.ok else "failed",
        )

    def _control(self, op: str, args: dict[str, Any]) -> HostControlReply:
        future: Future[HostControlReply] = ask(self.engine, EngineControl(op, args), 5)
        return future.result(timeout=_ENGINE_TIMEOUT)

    def _tell_registrar(self, message: EngineReleased | EngineResumed) -> None:
        ref = whereis(self.registrar)
        if ref is not None:
            ref.tell(message)

    def _ask_registrar(self, message: RegisterAdapter | DeregisterAdapter) -> Any:
        return ask(self.registrar, message, timeout=15)
