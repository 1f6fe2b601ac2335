"""The Starlette application: routes, JSON errors, per-address rate limit, an access log without tokens.

Every refusal is ``{"error": code, "detail": text}`` with its 4xx status (docs/http.md lists them);
an unexpected failure is a 500 with the same shape and never a traceback (that goes to the log).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fishim.auth import LoginLimiter
from fishim.http import api, media, pages, tracking
from fishim.http.context import HttpContext, HttpError

log = logging.getLogger("fishim.http")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type", 416: "range_not_satisfiable",
               422: "bad_schema", 429: "rate_limited"}


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


async def _fishim_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HttpError)
    return error_response(exc.status, exc.code, exc.detail, exc.headers)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "error"), str(exc.detail),
                          dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("http internal error method=%s path=%s error=%s", request.method, safe_path(request.url.path),
              type(exc).__name__, exc_info=exc)
    return error_response(500, "internal", "internal error (logged)")


def safe_path(path: str) -> str:
    """A path fit for a log line: a tracking token in ``/t/{token}`` is a credential."""
    return "/t/…" if path.startswith("/t/") else path[:200]


class Guard:
    """ASGI middleware: the per-address request limit (429), then one access-log line per request."""

    def __init__(self, app: ASGIApp, requests_per_minute: int) -> None:
        self.app = app
        self.limiter = LoginLimiter(requests_per_minute)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host = scope["client"][0] if scope.get("client") else "?"
        path = safe_path(scope.get("path", ""))
        if self.limiter.begin(f"http:{host}") is None:
            log.warning("http rate_limited peer=%s path=%s", host, path)
            response = error_response(429, "rate_limited", "too many requests from this address; try again in a "
                                      "minute", {"Retry-After": "60"})
            await response(scope, receive, send)
            return
        started, status = time.monotonic(), 0

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            log.info("http %s %s %d peer=%s ms=%.0f", scope.get("method"), path, status, host,
                     (time.monotonic() - started) * 1000)


class QuietServer(uvicorn.Server):
    """uvicorn's server without its signal handlers: ``fishim up`` owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def create_app(ctx: HttpContext) -> ASGIApp:
    routes = [
        Route("/media", media.upload, methods=["POST"]),
        Route("/media/{sha256}", media.download, methods=["GET", "HEAD"]),
        Route("/t/{token}", tracking.page, methods=["GET", "HEAD"]),
        Route("/console", pages.console, methods=["GET", "HEAD"]),
        Route("/console/me", pages.console_me, methods=["GET"]),
        Route("/web/{name}", pages.asset, methods=["GET", "HEAD"]),
        Route("/api/orders", api.place_order, methods=["POST"]),
        Route("/api/orders/{order}/status", api.change_status, methods=["POST"]),
        Route("/api/orders/{order}", api.timeline, methods=["GET"]),
        Route("/api/openapi.json", api.openapi, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HttpError: _fishim_error, HTTPException: _http_exception,
                                                       Exception: _unexpected})
    app.state.fishim = ctx
    return Guard(app, ctx.config.http.requests_per_minute)
