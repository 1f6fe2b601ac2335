"""The API for the shop's other systems: place orders, change their status, read their timeline.

Every write is an MQTT publish in all but transport: the body becomes a ``status`` envelope
(``sender`` = the key's principal ``key-{name}``, ``id`` and ``ts`` filled in when absent) and goes
through the broker's ingest (:meth:`EmbeddedBroker.submit`), exactly as if that principal had
published it retained on ``{prefix}/orders/{order}/status``: the same validation, the same error
codes, the same dead letters, idempotent on the envelope ``id``, and routed to every subscriber.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from pydantic import BaseModel, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from fishim.auth import Principal
from fishim.http.context import HttpContext, HttpError
from fishim.messages import ErrorCode, Item
from fishim.store import Store, now_ms
from fishim.topics import is_name
from fishim.views import order_show

log = logging.getLogger("fishim.http.api")

# What each ingest refusal is over HTTP (docs/http.md).
STATUS_OF: dict[str, int] = {
    ErrorCode.BAD_JSON: 400, ErrorCode.BAD_SCHEMA: 422, ErrorCode.TOO_LARGE: 413, ErrorCode.UNKNOWN_TOPIC: 400,
    ErrorCode.SENDER_MISMATCH: 403, ErrorCode.FORBIDDEN: 403, ErrorCode.ILLEGAL_TRANSITION: 409,
    ErrorCode.UNKNOWN_ORDER: 404, ErrorCode.UNKNOWN_SKU: 422, ErrorCode.OVER_PICK: 409,
    ErrorCode.BAD_REPLY_TO: 422, ErrorCode.BAD_MEDIA: 422, ErrorCode.BAD_MENTION: 422,
    ErrorCode.RECEIPT_BACKWARDS: 409, ErrorCode.CURSOR_AHEAD: 409,
}


class PlaceOrder(BaseModel):
    """``POST /api/orders``: a ``placed`` status for a new order (documentation model)."""

    order: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the order id")
    customer: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="the customer's user name")
    items: list[Item] = Field(min_length=1)
    eta: str | int | None = None
    dropoff: dict[str, Any] | str | None = Field(default=None, description="where to deliver (kept as given)")
    note: str | None = None
    id: str | None = Field(default=None, max_length=64, description="envelope id; the idempotency key")


class StatusChange(BaseModel):
    """``POST /api/orders/{order}/status``: a status envelope; id, ts and sender are filled in if absent."""

    state: str = Field(description="placed, confirmed, picking, packed, assigned, picked_up, delivering, "
                                   "delivered, cancelled, failed")
    note: str | None = None
    rider: str | None = Field(default=None, description="required with 'assigned'")
    eta: str | int | None = None
    id: str | None = Field(default=None, max_length=64, description="envelope id; the idempotency key")
    ts: str | int | None = Field(default=None, description="RFC 3339 or epoch ms; default now")


class Accepted(BaseModel):
    order: str
    id: str
    state: str
    seq: int | None = None
    order_seq: int | None = None
    duplicate: bool = False


class ErrorBody(BaseModel):
    error: str
    detail: str


async def _body(request: Request, ctx: HttpContext) -> dict[str, Any]:
    limit = ctx.config.limits.max_payload
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise HttpError(413, "too_large", f"body over {limit} bytes (limits.max_payload)")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HttpError(400, "bad_json", f"body is not UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HttpError(400, "bad_json", f"body must be a JSON object, got {type(data).__name__}")
    return data


def _envelope(data: dict[str, Any], principal: Principal) -> dict[str, Any]:
    data.setdefault("id", f"api-{uuid.uuid4().hex}")
    data.setdefault("ts", now_ms())
    data.setdefault("sender", principal.username)
    return data


async def _submit(ctx: HttpContext, principal: Principal, order: str, data: dict[str, Any]) -> Response:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if getattr(ctx.broker, "ingest", None) is None:
        raise HttpError(503, "unavailable", "this broker runs without its ingest (fishim broker): use fishim up")
    verdict = await ctx.broker.submit(principal, ctx.topic(order, "status"), payload)
    if verdict.outcome == "not_committed":
        raise HttpError(503, "unavailable", "not stored: fishim is shutting down; try again")
    if verdict.outcome == "refused":
        err = verdict.error
        code = str(err.error) if err is not None else "refused"
        raise HttpError(STATUS_OF.get(code, 400), code, err.detail if err is not None else "refused")
    seq, order_seq = verdict.seq, verdict.order_seq
    if verdict.outcome == "duplicate" and seq is None:
        stored = await ctx.worker.run(Store.get_event, str(data["id"]))
        seq, order_seq = (stored.seq, stored.order_seq) if stored is not None else (None, None)
    body = Accepted(order=order, id=str(data["id"]), state=str(data.get("state")), seq=seq, order_seq=order_seq,
                    duplicate=verdict.outcome == "duplicate")
    log.info("api status order=%s state=%s by=%s outcome=%s", order, body.state, principal.username, verdict.outcome)
    return JSONResponse(body.model_dump(), status_code=200 if body.duplicate else 201,
                        headers={"Location": f"/api/orders/{order}"})


def _path_order(request: Request) -> str:
    order = request.path_params["order"]
    if not is_name(order):
        raise HttpError(404, "not_found", "an order id is 1-64 of A-Z a-z 0-9 _ -")
    return order


async def place_order(request: Request) -> Response:
    ctx: HttpContext = request.app.state.fishim
    principal = await ctx.principal(request, api=True)
    data = await _body(request, ctx)
    order = data.pop("order", None)
    if not isinstance(order, str) or not is_name(order):
        raise HttpError(422, "bad_schema", "order: must be an order id (1-64 of A-Z a-z 0-9 _ -)")
    if data.setdefault("state", "placed") != "placed":
        raise HttpError(422, "bad_schema", "state: POST /api/orders places an order; use /api/orders/{order}/status")
    return await _submit(ctx, principal, order, _envelope(data, principal))


async def change_status(request: Request) -> Response:
    ctx: HttpContext = request.app.state.fishim
    principal = await ctx.principal(request, api=True)
    order = _path_order(request)
    data = await _body(request, ctx)
    return await _submit(ctx, principal, order, _envelope(data, principal))


async def timeline(request: Request) -> Response:
    ctx: HttpContext = request.app.state.fishim
    principal = await ctx.principal(request, api=True)
    order = _path_order(request)
    if not ctx.acl.may_receive(principal, ctx.topic(order, "status")):
        raise HttpError(403, "forbidden", f"not allowed to read order {order}")
    view = await ctx.worker.run(order_show, order)
    if view is None:
        raise HttpError(404, "unknown_order", f"order {order!r} does not exist")
    return JSONResponse(view)


async def openapi(request: Request) -> Response:
    return JSONResponse(openapi_document())


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for ``/api`` (and the media and tracking routes), schemas from the pydantic models."""
    ref = "#/components/schemas/{model}"
    schemas: dict[str, Any] = {}
    for model in (PlaceOrder, StatusChange, Accepted, ErrorBody):
        schema = model.model_json_schema(ref_template=ref)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema

    def body(name: str) -> dict[str, Any]:
        return {"required": True, "content": {"application/json": {"schema": {"$ref": ref.format(model=name)}}}}

    def answers(ok: int, name: str | None, *errors: int) -> dict[str, Any]:
        out: dict[str, Any] = {str(ok): {"description": "ok"}}
        if name:
            out[str(ok)]["content"] = {"application/json": {"schema": {"$ref": ref.format(model=name)}}}
        for status in errors:
            out[str(status)] = {"description": "error", "content": {"application/json": {
                "schema": {"$ref": ref.format(model="ErrorBody")}}}}
        return out

    order_param = [{"name": "order", "in": "path", "required": True, "schema": {"type": "string"}}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "fishim HTTP API", "version": "1", "description": "docs/http.md"},
        "components": {"schemas": schemas, "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "fishim keys add NAME"},
            "account": {"type": "http", "scheme": "basic"}}},
        "security": [{"apiKey": []}],
        "paths": {
            "/api/orders": {"post": {"summary": "Place an order (a 'placed' status); idempotent on 'id'",
                                     "requestBody": body("PlaceOrder"),
                                     "responses": {**answers(201, "Accepted", 400, 401, 403, 409, 413, 422, 429),
                                                   "200": {"description": "duplicate id: already stored"}}}},
            "/api/orders/{order}/status": {"post": {
                "summary": "Change an order's status; idempotent on 'id'", "parameters": order_param,
                "requestBody": body("StatusChange"),
                "responses": answers(201, "Accepted", 400, 401, 403, 404, 409, 413, 422, 429)}},
            "/api/orders/{order}": {"get": {"summary": "The order and its timeline", "parameters": order_param,
                                            "responses": answers(200, None, 401, 403, 404, 429)}},
            "/media": {"post": {"summary": "Upload a file for an order's chat", "security": [{"account": []}, {}],
                                "parameters": [{"name": "order", "in": "query", "required": True,
                                                "schema": {"type": "string"}}],
                                "responses": answers(201, None, 400, 401, 403, 404, 413, 415, 429)}},
            "/media/{sha256}": {"get": {"summary": "Download (Range, ETag)", "security": [{"account": []}, {}],
                                        "parameters": [{"name": "sha256", "in": "path", "required": True,
                                                        "schema": {"type": "string"}}],
                                        "responses": answers(200, None, 400, 401, 403, 404, 416, 429)}},
        },
    }
