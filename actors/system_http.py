"""`SystemHttpActor`: the node's system HTTP server.

    /health   200 while the tree answers (liveness)
    /ready    200 once the instance is registered and the engine healthy (readiness gate)
    /metrics  Prometheus: the node's metrics, plus SGLang's own when it runs
    /tree     which_children of the whole tree, as JSON

It binds 127.0.0.1 unless configured otherwise. Requests are served on the server's own
threads; they ask actors with short timeouts and never block an actor.
"""

from __future__ import annotations

import contextlib
import hmac
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from actors.control.admin_ops import AdminOps
from actors.telemetry import node_metrics
from messages.node import EngineStatus, GetEngineStatus, GetRegistration, RegistrationStatus
from supervisor.config import read_secret
from supervisor.core import ChildContext, ExitReason, SupervisedActor, WhichChildren, whereis
from supervisor.plan import SystemSettings

__all__ = ["SystemHttpActor"]

_ASK_TIMEOUT = 1.0
# How often the idle server looks at its stop flag (socketserver's default is 0.5 s: two
# wake-ups a second for ever); a stop wakes it at once (on_exit).
_POLL = 30.0


class SystemHttpActor(SupervisedActor):
    """Serves /health, /ready, /metrics and /tree; see the module docstring."""

    def __init__(self, context: ChildContext, settings: SystemSettings) -> None:
        super().__init__(context)
        paths = settings.paths
        registrar = paths.registrar if settings.leader else ""  # a follower registers nothing
        self.admin = settings.admin
        self.ops = AdminOps(paths.root, paths.engine_actor, registrar, paths.chaos or None)
        self._token = b""
        self.host = settings.host
        self.port = settings.port
        self.root_path = paths.root
        self.registrar_path = registrar
        self.engine_path = paths.engine_actor
        self.prometheus_dir = settings.sglang_metrics_dir
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def on_start_up(self) -> None:
        if self.admin.enabled:
            env = "" if self.admin.token_file else self.admin.token_env
            secret = read_secret(env, self.admin.token_file, "admin token")
            self._token = secret.reveal().encode() if secret else b""
        actor = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                status, content_type, body = actor.route(self.path.split("?", 1)[0])
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, 1 << 20)) if length else b""
                auth = self.headers.get("Authorization", "")
                status, content_type, answer = actor.route_post(
                    self.path.split("?", 1)[0], auth, body
                )
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one access line per scrape is noise

        self._server = ThreadingHTTPServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(_POLL,), name="system-http", daemon=True
        )
        self._thread.start()
        self.log.info("system http listening", host=self.host, port=self.port)

    def on_exit(self, reason: ExitReason) -> None:
        if self._server is not None:
            server = self._server
            stopper = threading.Thread(target=server.shutdown, name="system-http-stop")
            stopper.start()
            # The server looks at its stop flag between requests or every _POLL seconds: a
            # connection of our own wakes it (again, until the flag was seen).
            host, port = server.server_address[:2]
            if host in ("0.0.0.0", "::", ""):
                host = "127.0.0.1"
            deadline = time.monotonic() + 5.0
            while stopper.is_alive() and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    socket.create_connection((str(host), int(port)), timeout=0.5).close()
                stopper.join(0.05)
            server.server_close()

    def handle(self, message: Any) -> Any:
        return super().handle(message)

    # --- routes (on the server's threads) -------------------------------------------------

    def route(self, path: str) -> tuple[int, str, bytes]:
        """Status, content type and body for a GET of `path`."""
        if path == "/health":
            return self._health()
        if path == "/ready":
            return self._ready()
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self._metrics()
        if path == "/tree":
            return self._tree()
        return (
            404,
            "application/json",
            _json({"error": f"no route {path}; try /health /ready /metrics /tree"}),
        )

    def route_post(self, path: str, authorization: str, body: bytes) -> tuple[int, str, bytes]:
        """POST /engine/<op>: an admin op (needs `[admin] enabled` and `Bearer <token>`)."""
        if not path.startswith("/engine/"):
            return (
                404,
                "application/json",
                _json({"error": f"no route POST {path}; try /engine/<op>"}),
            )
        op = path.removeprefix("/engine/")
        if not self.admin.enabled or not self._token:
            return (
                403,
                "application/json",
                _json({"ok": False, "error": "disabled", "message": "[admin] is not enabled"}),
            )
        token = authorization.removeprefix("Bearer ").encode()
        if not hmac.compare_digest(token, self._token):
            self.log.warning("admin HTTP request refused: bad or missing token", op=op)
            return (
                401,
                "application/json",
                _json(
                    {"ok": False, "error": "unauthorized", "message": "bad or missing admin token"}
                ),
            )
        try:
            args = msgspec.json.decode(body) if body.strip() else {}
        except msgspec.DecodeError as exc:
            return (
                400,
                "application/json",
                _json({"ok": False, "error": "invalid", "message": f"body is not JSON: {exc}"}),
            )
        if not isinstance(args, dict):
            return (
                400,
                "application/json",
                _json({"ok": False, "error": "invalid", "message": "body must be a JSON object"}),
            )
        answer = self.ops.run(op, args)
        node_metrics.ADMIN_REQUESTS.labels(op, answer.error or "ok").inc()
        status = {"": 200, "invalid": 400, "disabled": 403, "unauthorized": 401}.get(
            answer.error, 500
        )
        return status, "application/json", msgspec.json.encode(answer)

    def _health(self) -> tuple[int, str, bytes]:
        root = whereis(self.root_path)
        try:
            if root is None:
                raise RuntimeError("the root supervisor is not running")
            root.ask(WhichChildren(), timeout=_ASK_TIMEOUT)
        except Exception as exc:  # noqa: BLE001
            return 503, "application/json", _json({"status": "unhealthy", "detail": str(exc)})
        return 200, "application/json", _json({"status": "alive"})

    def _ready(self) -> tuple[int, str, bytes]:
        registrar = whereis(self.registrar_path) if self.registrar_path else None
        engine = whereis(self.engine_path)
        registration: RegistrationStatus | None = None
        status: EngineStatus | None = None
        try:
            if registrar is not None:
                registration = cast(
                    RegistrationStatus, registrar.ask(GetRegistration(), timeout=_ASK_TIMEOUT)
                )
            if engine is not None:
                status = cast(EngineStatus, engine.ask(GetEngineStatus(), timeout=_ASK_TIMEOUT))
        except Exception:  # noqa: BLE001 - a busy or restarting actor: not ready
            pass
        # A multi-node follower registers nothing (registrar_path ""): healthy is ready.
        registered = registration is not None and registration.registered
        healthy = status is not None and status.healthy
        body = {
            "ready": (registered or not self.registrar_path) and healthy,
            "registered": registered,
            "engine_healthy": healthy,
            "instance_id": registration.instance_id if registration else None,
            "inflight": status.inflight if status else None,
            "detail": status.detail if status else "the engine is not running",
        }
        return (200 if body["ready"] else 503), "application/json", _json(body)

    def _metrics(self) -> bytes:
        body = generate_latest(node_metrics.REGISTRY)
        if self.prometheus_dir:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            try:
                multiprocess.MultiProcessCollector(registry, path=self.prometheus_dir)  # type: ignore[no-untyped-call]
                body += generate_latest(registry)
            except Exception as exc:  # noqa: BLE001 - SGLang's files may be mid-write
                self.log.warning("sglang metrics unreadable", error=str(exc))
        return body

    def _tree(self) -> tuple[int, str, bytes]:
        root = whereis(self.root_path)
        try:
            rows = root.ask(WhichChildren(recursive=True), timeout=2.0) if root else ()
        except Exception as exc:  # noqa: BLE001
            return 503, "application/json", _json({"error": str(exc)})
        return 200, "application/json", _json({"root": self.root_path, "children": rows})


def _json(value: Any) -> bytes:
    return msgspec.json.encode(value)
