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
from typing import Any

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from actors import node_metrics
from actors.nats_link import NatsLink
from messages.codec import encode_json
from messages.control import ExitReason, StopRequest, WhichChildren
from messages.discovery import InstanceRecord, ModelCard, Subjects
from messages.engine import EngineInfo
from messages.node import (
    GetEngineInfo,
    GetLink,
    GetRegistration,
    LinkChanged,
    RegistrationStatus,
    Tick,
)
from messages.supervision import ChildExitedEvent, ChildReadyEvent, SupervisionEvent
from supervisor import ChildContext, SupervisedActor, ask, whereis
from supervisor.config import DisaggregationSection, DiscoverySection

__all__ = ["RegistrarActor", "instance_key"]

VERSION = "0.1.0"


def instance_key(namespace: str, component: str, endpoint: str, instance_id: str) -> str:
    """The instance's key in the bucket."""
    return f"{namespace}.{component}.{endpoint}.{instance_id}"


class RegistrarActor(SupervisedActor):
    """Registers the instance; see the module docstring."""

    def __init__(
        self,
        context: ChildContext,
        fabric_path: str,
        engine_supervisor_path: str,
        root_path: str,
        instance_id: str,
        namespace: str,
        component: str,
        endpoint: str,
        subjects: Subjects,
        mode: str,
        discovery: DiscoverySection,
        engine_children: list[str],
        disaggregation: DisaggregationSection | None = None,
    ) -> None:
        super().__init__(context)
        self.disaggregation = disaggregation or DisaggregationSection()
        self.fabric_path = fabric_path
        self.engine_supervisor_path = engine_supervisor_path
        self.root_path = root_path
        self.instance_id = instance_id
        self.namespace = namespace
        self.component = component
        self.endpoint = endpoint
        self.subjects = subjects
        self.mode = mode
        self.discovery = discovery
        self.engine_children = engine_children
        self.key = instance_key(namespace, component, endpoint, instance_id)
        self.link: NatsLink | None = None
        self.kv: KeyValue | None = None
        self.registered = False
        self.engine_up = True
        self.started_at = time.time()
        self._halt = threading.Event()
        self._unsubscribe_bus: Any = None
        self._tree_subscription: Any = None
        self._write_failures = 0
        self.released = False  # the engine released its memory (admin): not in discovery
        self.adapters: set[str] = set()

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
        self._register()
        threading.Thread(target=self._heartbeat, name="registrar-heartbeat", daemon=True).start()

    def on_shutdown(self, request: StopRequest) -> None:
        self._deregister(f"stopping: {request.reason}")

    def on_exit(self, reason: ExitReason) -> None:
        self._halt.set()
        if self._unsubscribe_bus is not None:
            self._unsubscribe_bus()
        if self.registered:  # a crash: withdraw rather than leave a record that lies
            self._deregister(f"registrar exiting: {reason.describe()}")
        if self.link is not None and self._tree_subscription is not None:
            self.link.unsubscribe(self._tree_subscription)
        node_metrics.REGISTERED.set(0)

    # --- messages -----------------------------------------------------------------------

    def handle(self, message: Any) -> Any:
        match message:
            case GetRegistration():
                return RegistrationStatus(self.registered, self.instance_id, self.key)
            case Tick(kind="heartbeat"):
                if self.registered:
                    self._put("heartbeat")
            case Tick(kind="engine_down"):
                self.engine_up = False
                self._deregister("the engine subtree is down")
            case Tick(kind="engine_up"):
                self.engine_up = True
                if not self.released:
                    self._register()
            case Tick(kind="engine_released"):
                self.released = True
                self._deregister("the engine released its memory (admin)")
            case Tick(kind="engine_resumed"):
                self.released = False
                if self.engine_up:
                    self._register()
            case Tick(kind=kind) if kind.startswith("lora_register:"):
                return self._adapter(kind.split(":", 1)[1], add=True)
            case Tick(kind=kind) if kind.startswith("lora_deregister:"):
                return self._adapter(kind.split(":", 1)[1], add=False)
            case LinkChanged(event="reconnected"):
                if self.engine_up and not self.released:
                    self._register()
            case LinkChanged():
                pass
            case _:
                return super().handle(message)
        return None

    def _on_supervision_event(self, event: SupervisionEvent) -> None:
        # Runs on a supervisor's thread: only hand it on.
        if event.supervisor != self.engine_supervisor_path or not self.actor_ref.is_alive():
            return
        if isinstance(event, ChildExitedEvent) and self.engine_up:
            self.actor_ref.tell(Tick("engine_down"))
        elif isinstance(event, ChildReadyEvent) and event.child_id == self.engine_children[-1]:
            self.actor_ref.tell(Tick("engine_up"))

    def _heartbeat(self) -> None:
        while not self._halt.wait(self.discovery.heartbeat):
            if self.actor_ref.is_alive():
                self.actor_ref.tell(Tick("heartbeat"))

    # --- the record ---------------------------------------------------------------------

    def _record(self) -> InstanceRecord:
        info: EngineInfo = ask(
            f"{self.engine_supervisor_path}/engine_actor", GetEngineInfo(), timeout=10
        )
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

        async def open_bucket() -> KeyValue:
            assert link.nc is not None
            js = link.nc.jetstream()
            try:
                return await js.key_value(name)
            except nats.js.errors.BucketNotFoundError:
                return await js.create_key_value(bucket=name, ttl=ttl, history=1)

        return link.call(open_bucket, timeout=10)

    def _register(self) -> None:
        record = encode_json(self._record())
        self._put("register", record)

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
                self.adapters.add(name)
                if self.registered:
                    self._kv_put(
                        kv, self._adapter_key(name), self._adapter_record(self._record(), name)
                    )
            else:
                self.adapters.discard(name)
                self._kv_delete(kv, self._adapter_key(name))
        except Exception as exc:  # noqa: BLE001 - the caller rolls back
            if add:
                self.adapters.discard(name)
            return f"{type(exc).__name__}: {exc}"
        self.log.info("lora adapter " + ("registered" if add else "deregistered"), adapter=name)
        return True

    def _put(self, why: str, value: bytes | None = None) -> None:
        assert self.link is not None
        try:
            if self.kv is None:
                self.kv = self._bucket()
            kv = self.kv
            record = self._record()
            data = value if value is not None else encode_json(record)
            self.link.call(lambda: kv.put(self.key, data), timeout=5)
            for name in sorted(self.adapters):  # each adapter's card lives as long as the base
                self._kv_put(kv, self._adapter_key(name), self._adapter_record(record, name))
        except Exception as exc:  # noqa: BLE001 - retried at the next heartbeat
            self.kv = None  # the bucket may be gone (server restart): open it again
            self._write_failures += 1
            self.log.warning(
                "registration write failed; retrying at the next heartbeat",
                why=why,
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        if not self.registered:
            self.log.info("registered", key=self.key, bucket=self.discovery.bucket)
        elif self._write_failures:
            self.log.info(
                "registration restored", key=self.key, after_failures=self._write_failures
            )
        self._write_failures = 0
        self.registered = True
        node_metrics.REGISTERED.set(1)

    def _deregister(self, why: str) -> None:
        if not self.registered:
            return
        self.registered = False
        node_metrics.REGISTERED.set(0)
        assert self.link is not None
        try:
            kv = self.kv or self._bucket()
            self.link.call(lambda: kv.delete(self.key), timeout=5)
            for name in sorted(self.adapters):
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
