"""The web pages: the customer's live tracking page (``/t/{token}``) and the shop console (``/console``).

Both are static files in ``fishim/web`` (package data, so an installed fishim serves them) that talk
MQTT over WebSocket from the browser with mqtt.js and fishim's own ``fishim-sync.js``; the server only
hands each page a small JSON config (prefix, where the WebSocket listener is) and the files. Nothing
of an order is rendered here except the tracking page's no-script summary, and only for a valid token.

mqtt.js is not committed: ``scripts/web_setup.sh`` installs it from the npm registry into
``fishim/web/node_modules`` and ``/web/mqtt.min.js`` serves its browser bundle.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response

from fishim.config import ListenerConfig
from fishim.http.context import HttpContext, HttpError

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
MQTT_BUNDLE = WEB_DIR / "node_modules" / "mqtt" / "dist" / "mqtt.min.js"

# What /web/{name} serves: the pages' own files, and mqtt.js's browser bundle.
ASSETS: dict[str, tuple[Path, str]] = {
    "fishim-sync.js": (WEB_DIR / "fishim-sync.js", "text/javascript"),
    "common.js": (WEB_DIR / "common.js", "text/javascript"),
    "track.js": (WEB_DIR / "track.js", "text/javascript"),
    "console.js": (WEB_DIR / "console.js", "text/javascript"),
    "style.css": (WEB_DIR / "style.css", "text/css"),
    "mqtt.min.js": (MQTT_BUNDLE, "text/javascript"),
}

NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff"}


def _csp(ws_url: str) -> str:
    """Scripts and styles from this origin only; the one WebSocket; media as fetched blobs."""
    return (f"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
            f"media-src 'self' blob:; connect-src 'self' {ws_url}; base-uri 'none'; form-action 'none'; "
            f"frame-ancestors 'none'")


def ws_url(ctx: HttpContext, request: Request) -> str | None:
    """Where the pages open MQTT over WebSocket: ``http.ws_url``, else the first ``ws`` listener on the
    host name the page was loaded from (so a phone on the shop's Wi-Fi reaches the same machine)."""
    if ctx.config.http.ws_url:
        return ctx.config.http.ws_url
    listener = next((lst for lst in ctx.config.listeners if lst.type == "ws"), None)
    if listener is None:
        return None
    return f"{_scheme(listener)}://{request.url.hostname or listener.host}:{listener.port}/mqtt"


def _scheme(listener: ListenerConfig) -> str:
    return "wss" if listener.tls else "ws"


def _render(template: str, config: dict[str, Any], extra: str = "") -> str:
    """Fill a page template: its config as inert JSON (never executed, so CSP holds) and extra HTML."""
    blob = json.dumps(config).replace("<", "\\u003c")
    text = (WEB_DIR / template).read_text(encoding="utf-8")
    return text.replace("{{CONFIG}}", escape(blob, quote=False)).replace("{{NOSCRIPT}}", extra)


def live_tracking_page(ctx: HttpContext, request: Request, order: str, user: str, summary: str) -> HTMLResponse:
    """The customer's page for a valid token; ``summary`` is the server-rendered no-script fallback,
    and all there is when broker.yaml has no ``ws`` listener to go live over."""
    url = ws_url(ctx, request)
    if url is None:
        return _static_page(summary)
    config = {"prefix": ctx.config.prefix, "ws_url": url, "order": order, "user": user}
    return HTMLResponse(_render("track.html", config, summary),
                        headers={**NO_STORE, "Content-Security-Policy": _csp(url)})


_CLOCK = ("<svg class=big-icon viewBox='0 0 24 24' aria-hidden=true><circle cx=12 cy=12 r=9 fill=none "
          "stroke=currentColor stroke-width=1.6 /><path d='M12 7v5l3 2' fill=none stroke=currentColor "
          "stroke-width=1.6 stroke-linecap=round /></svg>")


def _static_page(summary: str) -> HTMLResponse:
    html = ("<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            "content='width=device-width,initial-scale=1'><title>Order tracking</title>"
            f"<link rel=stylesheet href=/web/style.css></head><body><main class=track-main><section class=card>"
            f"{summary}</section></main></body></html>")
    return HTMLResponse(html, headers={**NO_STORE, "Content-Security-Policy": "default-src 'none'; style-src 'self'"})


def refused_page(code: str, title: str, detail: str, status: int) -> HTMLResponse:
    """An invalid, expired or revoked link: says which, in both languages, and nothing of the order."""
    zh = {"token_expired": "链接已过期，请向店家索取新链接。",  # noqa: RUF001
          "token_revoked": "订单已完成，此跟踪链接已失效。"}.get(code, "这不是有效的跟踪链接。")  # noqa: RUF001
    body = (f"<main class=refused><div class=card>{_CLOCK}"
            f"<h1 id=refused data-code={escape(code)}>{escape(title)}</h1><p>{escape(detail)}</p>"
            f"<p lang=zh>{escape(zh)}</p>"
            f"<p class=muted>fishim</p></div></main>")
    html = (f"<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport "
            f"content='width=device-width,initial-scale=1'><title>{escape(title)}</title>"
            f"<link rel=stylesheet href=/web/style.css></head><body>{body}</body></html>")
    return HTMLResponse(html, status_code=status,
                        headers={**NO_STORE, "Content-Security-Policy": "default-src 'none'; style-src 'self'"})


async def console(request: Request) -> Response:
    """``GET /console``: the shop console. The page itself is public; it logs in over MQTT, where the
    broker decides (staff and owner accounts see every order, anyone else is turned away by the page)."""
    ctx: HttpContext = request.app.state.fishim
    url = ws_url(ctx, request)
    if url is None:
        raise HttpError(503, "no_websocket", "broker.yaml has no ws listener; the console needs one")
    config = {"prefix": ctx.config.prefix, "ws_url": url}
    return HTMLResponse(_render("console.html", config),
                        headers={**NO_STORE, "Content-Security-Policy": _csp(url)})


STAFF_ROLES = frozenset({"owner", "staff"})


async def console_me(request: Request) -> Response:
    """``GET /console/me`` (HTTP Basic): who the console is about to sign in as. The page asks first so
    a wrong password or a non-staff account gets a clear answer before any MQTT connection opens."""
    ctx: HttpContext = request.app.state.fishim
    if not request.headers.get("authorization", "").lower().startswith("basic "):
        raise HttpError(401, "unauthorized", "sign in with a staff or owner account (HTTP Basic)")
    try:
        principal = await ctx.principal(request)
    except HttpError as exc:  # no WWW-Authenticate: the browser must not pop its own login dialog
        raise HttpError(exc.status, exc.code, exc.detail) from None
    if principal.role not in STAFF_ROLES:
        raise HttpError(403, "forbidden", "only staff and owner accounts can use the console")
    return JSONResponse({"user": principal.username, "role": principal.role}, headers=NO_STORE)


async def asset(request: Request) -> Response:
    """``GET /web/{name}``: one of :data:`ASSETS`."""
    name = request.path_params["name"]
    if name not in ASSETS:
        raise HttpError(404, "not_found", "no such file")
    path, mime = ASSETS[name]
    if not path.is_file():
        raise HttpError(503, "not_installed", f"{name} is missing: run scripts/web_setup.sh (npm install mqtt)")
    return FileResponse(path, media_type=mime, headers={"Cache-Control": "no-cache",
                                                        "X-Content-Type-Options": "nosniff"})
