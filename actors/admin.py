"""`AdminActor`: the admin subject, `{namespace}.{component}.admin.{instance_id}`.

Off unless `[admin] enabled`. Every request must carry the admin token (read from the
environment or a file at start, compared in constant time, never logged); a request
without it is refused with `unauthorized` and logged. Ops: `chaos` (only with
`[chaos] enabled`), `tree`, and the engine's `stats`, `flush_cache`, `release_memory`,
`resume_memory`, `update_weights`, `start_profile`, `stop_profile`.
"""

from __future__ import annotations

import hmac
import threading
from typing import Any

from actors.control.admin_ops import AdminOps
from actors.nats.link import NatsLink
from actors.telemetry import node_metrics
from messages.chaos import AdminReply, AdminRequest
from messages.codec import DecodeError, decode_json, encode_json
from messages.node import GetLink, IncomingRequest
from supervisor.config import ConfigError, read_secret
from supervisor.core import ChildContext, ExitReason, SupervisedActor, ask
from supervisor.plan import AdminSettings

__all__ = ["AdminActor"]


class AdminActor(SupervisedActor):
    """Serves the admin subject; see the module docstring."""

    def __init__(self, context: ChildContext, settings: AdminSettings) -> None:
        super().__init__(context)
        paths = settings.paths
        self.ops = AdminOps(paths.root, paths.engine_actor, paths.registrar, paths.chaos or None)
        self.fabric_path = paths.fabric
        self.subject = settings.subject
        self.admin = settings.admin
        self.root_path = paths.root
        self.engine_path = paths.engine_actor
        self.chaos_path = paths.chaos or None
        self.link: NatsLink | None = None
        self._token = b""
        self._subscription: Any = None

    def on_start_up(self) -> None:
        env = "" if self.admin.token_file else self.admin.token_env  # a file wins
        secret = read_secret(env, self.admin.token_file, "admin token")
        if not secret:
            where = self.admin.token_file or f"environment variable {self.admin.token_env}"
            raise ConfigError("admin", f"admin.enabled needs a non-empty token in {where}")
        self._token = secret.reveal().encode()
        self.link = ask(self.fabric_path, GetLink(), timeout=10)
        ref, clock = self.actor_ref, self.context.clock
        assert self.link is not None
        self._subscription = self.link.subscribe(
            self.subject, lambda s, r, d: ref.tell(IncomingRequest(s, r, d, clock.now()))
        )
        self.log.info("admin subject open", subject=self.subject, chaos=self.chaos_path is not None)

    def on_exit(self, reason: ExitReason) -> None:
        if self.link is not None and self._subscription is not None:
            self.link.unsubscribe(self._subscription)

    def handle(self, message: Any) -> Any:
        if isinstance(message, IncomingRequest):
            if message.reply:
                self._serve(message.reply, message.data)
            return None
        return super().handle(message)

    def _serve(self, reply: str, data: bytes) -> None:
        try:
            request = decode_json(data, AdminRequest)
        except DecodeError as exc:
            self._answer(reply, "?", AdminReply(ok=False, error="invalid", message=str(exc)))
            return
        if not hmac.compare_digest(request.token.encode(), self._token):
            self.log.warning("admin request refused: bad or missing token", op=request.op)
            refused = AdminReply(
                ok=False, error="unauthorized", message="bad or missing admin token"
            )
            self._answer(reply, request.op, refused)
            return
        # Ops may take minutes (weights, profiles): never on this actor's thread.
        threading.Thread(
            target=self._run, args=(reply, request.op, request.args), daemon=True
        ).start()

    def _run(self, reply: str, op: str, args: dict[str, Any]) -> None:
        self._answer(reply, op, self.ops.run(op, args))

    def _answer(self, reply: str, op: str, answer: AdminReply) -> None:
        node_metrics.ADMIN_REQUESTS.labels(op, answer.error or "ok").inc()
        assert self.link is not None
        self.link.publish(reply, encode_json(answer))
