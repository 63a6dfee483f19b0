"""NATS connection options from `[nats.auth]`: credentials read when connecting, never logged."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from supervisor.config import NatsAuthSection, read_secret

__all__ = ["connect_options"]


def connect_options(auth: NatsAuthSection) -> dict[str, Any]:
    """Keyword arguments for `nats.connect` (user/password, token, nkey seed, TLS)."""
    options: dict[str, Any] = {}
    password = read_secret(auth.password_env, auth.password_file, "nats.auth password")
    if auth.user and password is not None:
        options["user"] = auth.user
        options["password"] = password.reveal()
    token = read_secret(auth.token_env, auth.token_file, "nats.auth token")
    if token is not None:
        options["token"] = token.reveal()
    if auth.nkey_seed_file:
        options["nkeys_seed"] = str(Path(auth.nkey_seed_file).expanduser())
    if auth.tls_ca or auth.tls_cert:
        context = ssl.create_default_context(
            cafile=str(Path(auth.tls_ca).expanduser()) if auth.tls_ca else None
        )
        if auth.tls_cert:
            context.load_cert_chain(
                str(Path(auth.tls_cert).expanduser()), str(Path(auth.tls_key).expanduser())
            )
        options["tls"] = context
        options["tls_hostname"] = "localhost"
    return options
