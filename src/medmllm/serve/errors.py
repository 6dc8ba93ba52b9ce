"""The server's one error type and its JSON shape.

Every error answer of the server is ``{"error": {"message", "type", "param", "code"}}`` (the
OpenAI shape): ``message`` is written by medmllm (never the raw text of a library exception),
``type`` the OpenAI category, ``param`` the request field at fault (dotted, e.g.
``messages.0.content.1.image_url.url``) or ``None``, ``code`` a stable machine-readable name.
"""

from __future__ import annotations

from typing import Any

# HTTP status -> OpenAI error type
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
          415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


class ServeError(Exception):
    """An error answered to the client as ``status`` with the JSON error shape (see module doc)."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, type: str | None = None,
                 detail: str | None = None):
        self.detail = detail  # for local callers and logs only (e.g. a reader's reason); never sent
        self.status = int(status)
        self.message = str(message)
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        super().__init__(f"{self.status} {code}: {message}")

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def invalid(message: str, code: str, param: str | None = None, detail: str | None = None) -> ServeError:
    """A 422 validation error."""
    return ServeError(422, message, code, param, detail=detail)


class QueueFull(ServeError):
    """The engine's bounded queue is full (answered 429)."""

    def __init__(self, size: int):
        super().__init__(429, f"the server is busy: {size} requests are already waiting; retry later",
                         "queue_full", None, "rate_limit_error")
