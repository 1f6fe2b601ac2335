"""``GET /t/{token}``: the customer's tracking page for one order, no account needed.

A valid token gets the live page (fishim.http.pages, fishim/web/track.html): the browser logs in over
MQTT/WebSocket as ``t-{order}`` with the token as its password. The server adds only a plain summary
for browsers without JavaScript. An invalid, expired or revoked token gets a page that says so and
shows nothing of the order. The token is in the URL, so pages set ``Referrer-Policy: no-referrer``
and ``Cache-Control: no-store``; the access log never prints it (fishim.http.app).
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse

from fishim.http import pages
from fishim.http.context import HttpContext, HttpError
from fishim.store import Store
from fishim.topics import tracking_user

_REFUSED = {
    "token_expired": ("Link expired", "This tracking link has expired. Ask the shop for a new one."),
    "token_revoked": ("Link no longer valid", "This order is finished, so its tracking link no longer works."),
}


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
        return pages.refused_page(exc.code, title, text, exc.status)
    view = await ctx.worker.run(_order_view, principal.order)
    if view is None:  # the token checked out a moment ago; the order cannot vanish, but never show a 500
        return pages.refused_page("token_invalid", "Link not valid", "No such order.", 404)
    order = view["order"]
    items = "".join(f"<li>{escape(str(i.get('name') or i['sku']))} x {int(i.get('qty', 1))}</li>" for i in order.items)
    rows = "".join(f"<tr><td>{escape(_when(int(s['ts'])))}</td><td>{escape(str(s['state']))}</td>"
                   f"<td>{escape(str(s.get('note') or ''))}</td></tr>" for s in view["statuses"])
    summary = (f"<p>Order <b>{escape(order.id)}</b> is <b>{escape(order.state)}</b>.</p>"
               f"<ul>{items}</ul><table>{rows}</table>")
    return pages.live_tracking_page(ctx, request, order.id, tracking_user(order.id), summary)
