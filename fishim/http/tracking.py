"""``GET /t/{token}``: the customer's tracking page for one order, no account needed.

Server-rendered and deliberately plain (the real page comes later and can use the same token as its
MQTT-over-WebSocket password). An invalid, expired or revoked token gets a page that says so and
shows nothing of the order. The token is in the URL, so the page sets ``Referrer-Policy: no-referrer``
and ``Cache-Control: no-store``; the access log never prints it (fishim.http.app).
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse

from fishim.http.context import HttpContext, HttpError
from fishim.http.tokens import tracking_user
from fishim.store import Store

_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"}

_REFUSED = {
    "token_expired": ("Link expired", "This tracking link has expired. Ask the shop for a new one."),
    "token_revoked": ("Link no longer valid", "This order is finished, so its tracking link no longer works."),
}


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=en><meta charset=utf-8><meta name=viewport content='width=device-width'>"
            f"<title>{escape(title)}</title><style>body{{font-family:sans-serif;max-width:40em;margin:2em auto;"
            f"padding:0 1em}}td{{padding:.2em .6em}}</style><body><h1>{escape(title)}</h1>{body}</body></html>")


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _order_view(store: Store, order_id: str) -> dict[str, Any] | None:
    order = store.get_order(order_id)
    if order is None:
        return None
    statuses = [e.payload_dict() for e in store.order_events(order_id) if e.channel == "status"]
    return {"order": order, "statuses": statuses}


async def page(request: Request) -> HTMLResponse:
    ctx: HttpContext = request.app.state.fishim
    try:
        principal = await ctx.tracking_principal(request.path_params["token"])
    except HttpError as exc:
        title, text = _REFUSED.get(exc.code, ("Link not valid", "This is not a valid tracking link."))
        return HTMLResponse(_page(title, f"<p>{escape(text)}</p>"), status_code=exc.status, headers=_HEADERS)
    view = await ctx.worker.run(_order_view, principal.order)
    if view is None:  # the token checked out a moment ago; the order cannot vanish, but never show a 500
        return HTMLResponse(_page("Link not valid", "<p>No such order.</p>"), status_code=404, headers=_HEADERS)
    order = view["order"]
    items = "".join(f"<li>{escape(str(i.get('name') or i['sku']))} x {int(i.get('qty', 1))}</li>" for i in order.items)
    rows = "".join(f"<tr><td>{escape(_when(int(s['ts'])))}</td><td>{escape(str(s['state']))}</td>"
                   f"<td>{escape(str(s.get('note') or ''))}</td></tr>" for s in view["statuses"])
    body = (f"<p>Order <b>{escape(order.id)}</b> is <b id=state>{escape(order.state)}</b>.</p>"
            f"<h2>Items</h2><ul>{items}</ul><h2>Progress</h2><table>{rows}</table>"
            f"<meta name=fishim-mqtt-user content='{escape(tracking_user(order.id))}'>")
    return HTMLResponse(_page(f"Order {order.id}", body), headers=_HEADERS)
