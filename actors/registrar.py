"""`RegistrarActor`: the instance in discovery, behind a readiness gate.

Started last, once the engine and the handlers are ready, it writes the instance record
(ids, subjects, model card) into the JetStream KV bucket and keeps it alive with a
heartbeat (the bucket's TTL is the lease). It withdraws the record while the engine
subtree is down and restores it when the engine is back; re-registers after a reconnect
or if the bucket was lost; and deletes the record first thing on an ordered stop, so no
new traffic comes while the rest of the node drains. It also answers `tree` requests.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from actors.discovery.lease import Action, Lease
from actors.nats.link import NatsLink
from actors.nats.replicas import explain
from actors.telemetry import node_metrics
from messages.codec import encode_json
from messages.discovery import InstanceRecord, ModelCard
from messages.engine import EngineInfo
from messages.node import (
    DeregisterAdapter,
    EngineReleased,
    EngineResumed,
    GetEngineInfo,
    GetLink,
    GetRegistration,
    LinkChanged,
    RegisterAdapter,
    RegistrationStatus,
)
from supervisor.core import (
    ChildContext,
    ChildExitedEvent,
    ChildReadyEvent,
    ExitReason,
    StopRequest,
    SupervisedActor,
    SupervisionEvent,
    WhichChildren,
    ask,
    whereis,
)
from supervisor.plan import RegistrarSettings

__all__ = ["RegistrarActor", "instance_key"]

VERSION = "0.1.0"


def instance_key(namespace: str, component: str, endpoint: str, instance_id: str) -> str:
    """The instance's key in the bucket."""
    return f"{namespace}.{component}.{endpoint}.{instance_id}"


@dataclass(frozen=True)
class _Heartbeat:
    """Time to renew the lease."""


@dataclass(frozen=True)
class _EngineDown:
    """The engine subtree went down (seen on the supervision event bus)."""


@dataclass(frozen=True)
class _EngineUp:
    """The engine subtree is ready again."""


class RegistrarActor(SupervisedActor):
    """Registers the instance; see the module docstring."""

    def __init__(self, context: ChildContext, settings: RegistrarSettings) -> None:
        super().__init__(context)
        self.disaggregation = settings.disaggregation
        self.fabric_path = settings.fabric
        self.engine_supervisor_path = settings.engine
        self.engine_actor_path = settings.engine_actor
        self.engine_last_child = settings.engine_last_child
        self.root_path = settings.root
        self.instance_id = settings.instance_id
        self.namespace = settings.namespace
        self.component = settings.component
        self.endpoint = settings.endpoint
        self.subjects = settings.subjects
        self.mode = settings.mode
        self.discovery = settings.discovery
        self.key = instance_key(self.namespace, self.component, self.endpoint, self.instance_id)
        self.link: NatsLink | None = None
        self.kv: KeyValue | None = None
        self.lease = Lease()
        self.started_at = time.time()
        self._unsubscribe_bus: Any = None
        self._tree_subscription: Any = None

    # --- start and stop ------------------------------------------------------------------

    def on_start_up(self) -> None:
        self.link = ask(self.fabric_path, GetLink(), timeout=10)
        assert self.link is not None
        ref = self.actor_ref
        self.link.add_listener(
            lambda event: ref.tell(LinkChanged(event)) if ref.is_alive() else None
        )
        self._unsubscribe_bus = self.context.bus.subscribe(self._on_supervision_event)
        self._tree_subscription = self.link.subscribe(self.subjects.tree, self._on_tree_request)
        self._put("register")
        self.send_every(self.discovery.heartbeat, _Heartbeat())

    def on_shutdown(self, request: StopRequest) -> None:
        self._deregister(f"stopping: {request.reason}")

    def on_exit(self, reason: ExitReason) -> None:
        if self._unsubscribe_bus is not None:
            self._unsubscribe_bus()
        if self.lease.registered:  # a crash: withdraw rather than leave a record that lies
            self._deregister(f"registrar exiting: {reason.describe()}")
        if self.link is not None and self._tree_subscription is not None:
            self.link.unsubscribe(self._tree_subscription)
        node_metrics.REGISTERED.set(0)

    # --- messages -----------------------------------------------------------------------

    def handle(self, message: Any) -> Any:
        lease = self.lease
        match message:
            case GetRegistration():
                return RegistrationStatus(lease.registered, self.instance_id, self.key)
            case _Heartbeat():
                self._carry_out(lease.heartbeat(), "heartbeat")
            case _EngineDown():
                self._carry_out(lease.engine_down(), "the engine subtree is down")
            case _EngineUp():
                self._carry_out(lease.engine_back(), "the engine subtree is back")
            case EngineReleased():
                self._carry_out(lease.memory_released(), "the engine released its memory (admin)")
            case EngineResumed():
                self._carry_out(lease.memory_resumed(), "the engine resumed its memory")
            case RegisterAdapter(name=name):
                return self._adapter(name, add=True)
            case DeregisterAdapter(name=name):
                return self._adapter(name, add=False)
            case LinkChanged(event="reconnected"):
                self._carry_out(lease.reconnected(), "reconnected")
            case LinkChanged():
                pass
            case _:
                return super().handle(message)
        return None

    def _carry_out(self, action: Action, why: str) -> None:
        if action == "write":
            self._put(why)
        elif action == "delete":
            self._deregister(why)

    def _on_supervision_event(self, event: SupervisionEvent) -> None:
        # Runs on a supervisor's thread: only hand it on.
        if event.supervisor != self.engine_supervisor_path or not self.actor_ref.is_alive():
            return
        if isinstance(event, ChildExitedEvent) and self.lease.engine_up:
            self.actor_ref.tell(_EngineDown())
        elif isinstance(event, ChildReadyEvent) and event.child_id == self.engine_last_child:
            self.actor_ref.tell(_EngineUp())

    # --- the record ---------------------------------------------------------------------

    def _record(self) -> InstanceRecord:
        info: EngineInfo = ask(self.engine_actor_path, GetEngineInfo(), timeout=10)
        card = ModelCard(
            name=info.model_name,
            context_length=info.context_length,
            kv_block_size=info.page_size,
            total_kv_blocks=info.total_kv_blocks,
            max_batch_size=info.max_batch_size,
            dp_size=info.dp_size,
            mode=self.mode,
            backend=info.backend,
            model_type="embedding" if self.mode == "embedding" else "chat",
            tokenizer=info.tokenizer,
            runtime_config=self._runtime_config(info),
        )
        return InstanceRecord(
            instance_id=self.instance_id,
            namespace=self.namespace,
            component=self.component,
            endpoint=self.endpoint,
            subjects=self.subjects,
            model=card,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self.started_at,
            version=VERSION,
            direct_streams=True,
        )

    def _runtime_config(self, info: EngineInfo) -> dict[str, Any]:
        config: dict[str, Any] = {
            "eos_token_ids": info.eos_token_ids,
            "engine_version": info.version,
            **info.parsers,  # tool_call_parser, reasoning_parser, force_reasoning
        }
        if self.mode == "prefill":  # decode nodes fetch KV from here
            config["bootstrap_host"] = self.disaggregation.bootstrap_host
            config["bootstrap_port"] = self.disaggregation.bootstrap_port
        return config

    def _bucket(self) -> KeyValue:
        assert self.link is not None
        link = self.link
        name, ttl = self.discovery.bucket, self.discovery.lease_ttl
        replicas = self.discovery.replicas

        async def open_bucket() -> KeyValue:
            assert link.nc is not None
            js = link.nc.jetstream()
            try:
                return await js.key_value(name)
            except nats.js.errors.BucketNotFoundError:
                pass
            try:
                return await js.create_key_value(bucket=name, ttl=ttl, history=1, replicas=replicas)
            except nats.js.errors.APIError as exc:
                raise RuntimeError(explain(exc, "discovery.replicas", replicas)) from None

        return link.call(open_bucket, timeout=10)

    def _kv_put(self, kv: KeyValue, key: str, data: bytes) -> None:
        assert self.link is not None

        async def put() -> None:
            await kv.put(key, data)

        self.link.call(put, timeout=5)

    def _kv_delete(self, kv: KeyValue, key: str) -> None:
        assert self.link is not None

        async def delete() -> None:
            await kv.delete(key)

        self.link.call(delete, timeout=5)

    def _adapter_key(self, name: str) -> str:
        return f"{self.key}.lora.{name}"

    def _adapter_record(self, base: InstanceRecord, name: str) -> bytes:
        """A loaded LoRA adapter is a model of its own: the base card under its name."""
        config = {**base.model.runtime_config, "lora": name, "base_model": base.model.name}
        card = msgspec.structs.replace(base.model, name=name, runtime_config=config)
        return encode_json(msgspec.structs.replace(base, model=card))

    def _adapter(self, name: str, add: bool) -> bool | str:
        """Register (or remove) a LoRA adapter's card; True, or why it failed."""
        assert self.link is not None
        try:
            kv = self.kv or self._bucket()
            if add:
                self.lease.adapters.add(name)
                if self.lease.registered:
                    self._kv_put(
                        kv, self._adapter_key(name), self._adapter_record(self._record(), name)
                    )
            else:
                self.lease.adapters.discard(name)
                self._kv_delete(kv, self._adapter_key(name))
        except Exception as exc:  # noqa: BLE001 - the caller rolls back
            if add:
                self.lease.adapters.discard(name)
            return f"{type(exc).__name__}: {exc}"
        self.log.info("lora adapter " + ("registered" if add else "deregistered"), adapter=name)
        return True

    def _put(self, why: str) -> None:
        assert self.link is not None
        try:
            if self.kv is None:
                self.kv = self._bucket()
            kv = self.kv
            record = self._record()
            data = encode_json(record)
            self.link.call(lambda: kv.put(self.key, data), timeout=5)
            for name in sorted(self.lease.adapters):  # an adapter's card lives with the base
                self._kv_put(kv, self._adapter_key(name), self._adapter_record(record, name))
        except Exception as exc:  # noqa: BLE001 - retried at the next heartbeat
            self.kv = None  # the bucket may be gone (server restart): open it again
            self.lease.write_failed()
            self.log.warning(
                "registration write failed; retrying at the next heartbeat",
                why=why,
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        failures = self.lease.write_failures
        outcome = self.lease.written()
        if outcome == "registered":
            self.log.info("registered", key=self.key, bucket=self.discovery.bucket)
        elif outcome == "restored":
            self.log.info("registration restored", key=self.key, after_failures=failures)
        node_metrics.REGISTERED.set(1)

    def _deregister(self, why: str) -> None:
        if not self.lease.deleting():
            return
        node_metrics.REGISTERED.set(0)
        assert self.link is not None
        try:
            kv = self.kv or self._bucket()
            self.link.call(lambda: kv.delete(self.key), timeout=5)
            for name in sorted(self.lease.adapters):
                self._kv_delete(kv, self._adapter_key(name))
            self.log.info("deregistered", key=self.key, why=why)
        except Exception as exc:  # noqa: BLE001 - the lease ends it anyway
            self.log.warning(
                "deregistration failed; the lease will expire", error=str(exc), why=why
            )

    # --- introspection over NATS ------------------------------------------------------------

    def _on_tree_request(self, _subject: str, reply: str, _data: bytes) -> None:
        # On the NATS thread: ask the root (never blocks on this actor) and answer.
        if not reply or self.link is None:
            return
        root = whereis(self.root_path)
        link = self.link

        def answer() -> None:
            try:
                rows = root.ask(WhichChildren(recursive=True), timeout=2) if root else ()
                body = encode_json({"instance_id": self.instance_id, "children": rows})
            except Exception as exc:  # noqa: BLE001
                body = encode_json({"instance_id": self.instance_id, "error": str(exc)})
            link.publish(reply, body)

        threading.Thread(target=answer, daemon=True).start()
