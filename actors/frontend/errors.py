"""Errors answered to HTTP clients, in OpenAI's format, and how node errors map onto them.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": "invalid_request"}}

| status | when |
| --- | --- |
| 400 | the request is malformed, or a node refused it (`invalid_request`) |
| 404 | no live instance serves the model (or an unknown route) |
| 429 | every instance that serves the model is overloaded |
| 503 | no instance can take the request now (none left, restarting, stopping, lost) |
| 504 | the request did not finish within its deadline |
| 500 | an engine failed the request, or a bug (logged with the request id) |
"""

from __future__ import annotations

from typing import Any

from messages.request import ErrorInfo

__all__ = ["FrontendError", "from_node_error", "status_of_code", "unknown_model"]

# Node error code (messages.request.ERROR_CODES, plus the frontend's own) → (HTTP status, type)
_STATUS: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "overloaded": (429, "rate_limit_error"),
    "too_many_streams": (429, "rate_limit_error"),
    "engine_restarting": (503, "service_unavailable_error"),
    "not_ready": (503, "service_unavailable_error"),
    "node_lost": (503, "service_unavailable_error"),
    "kv_transfer_failed": (503, "service_unavailable_error"),
    "no_instances": (503, "service_unavailable_error"),
    "shutdown": (503, "service_unavailable_error"),
    "cancelled": (503, "service_unavailable_error"),
    "deadline_exceeded": (504, "timeout_error"),
    "engine_error": (500, "server_error"),
    "internal": (500, "server_error"),
}


class FrontendError(Exception):
    """An error for the HTTP client: status, OpenAI error type, message, param and code."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    @classmethod
    def of_code(cls, code: str, message: str, param: str | None = None) -> FrontendError:
        """The error for a node (or frontend) error code, with the status it maps to."""
        status, type_ = _STATUS.get(code, (500, "server_error"))
        return cls(status, message, type_, param, code)

    def body(self) -> dict[str, Any]:
        """The JSON body: `{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __repr__(self) -> str:
        return f"FrontendError({self.status}, {self.code!r}, {self.message!r})"


def status_of_code(code: str) -> int:
    """The HTTP status a node error code maps to."""
    return _STATUS.get(code, (500, "server_error"))[0]


def from_node_error(
    error: ErrorInfo | None, where: str = "", input_param: str = "messages"
) -> FrontendError:
    """A node's `ErrorInfo` as an OpenAI error; `field` becomes `param` (its last part,
    which is the OpenAI name: `stop.max_tokens` → `max_tokens`; the token ids the frontend
    made are the client's `input_param`)."""
    if error is None:
        return FrontendError.of_code("internal", f"the request failed without an error{where}")
    param = error.field.rsplit(".", 1)[-1] if error.field else None
    if param in ("token_ids", "input"):
        param = input_param
    return FrontendError.of_code(error.code, f"{error.message}{where}", param)


def unknown_model(model: str) -> FrontendError:
    """404 for a model no instance serves."""
    return FrontendError(
        404,
        f"the model {model!r} does not exist (see /v1/models)",
        param="model",
        code="model_not_found",
    )
