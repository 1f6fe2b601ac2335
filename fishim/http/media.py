"""Photos, voice notes and videos: content-addressed blobs beside the store, guarded by order membership.

A blob lives at ``<db>.media/ab/abcdef…`` (its sha256), so the same photo sent twice is stored once.
The ``media`` table remembers for which order each blob was uploaded, by whom, its MIME type and
size. Who may fetch it: members of an order the blob was uploaded for whose chat references it
(``media[].sha256`` in a stored chat message), decided by the same ACL as MQTT (reading that order's
``status`` topic). :func:`collect_garbage` removes blobs no stored chat references.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, MalformedRangeHeader, RangeNotSatisfiable, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from fishim.config import MediaConfig
from fishim.http.context import HttpContext, HttpError
from fishim.store import Store, now_ms
from fishim.topics import is_name

log = logging.getLogger("fishim.http.media")

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
GC_MIN_AGE_MS = 3_600_000  # an upload gets an hour to be referenced by a chat before gc may take it


class MediaTooLarge(Exception):
    """The body went past the kind's ``max_bytes``."""


class MediaRow(BaseModel):
    sha256: str
    order_id: str
    kind: str
    mime: str
    size: int
    uploaded_by: str | None = None
    uploaded_at: int


class GcReport(BaseModel):
    removed: int = 0
    removed_bytes: int = 0
    kept: int = 0


def normalise_mime(content_type: str | None) -> str:
    """``Image/JPEG; charset=x`` -> ``image/jpeg``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def kind_of(config: MediaConfig, mime: str) -> str | None:
    """The media kind (image, voice, video, file) a MIME type is accepted as, or None."""
    return next((name for name, kind in config.kinds().items() if mime in kind.mimes), None)


def blob_path(root: Path, sha256: str) -> Path:
    return root / sha256[:2] / sha256


async def receive(root: Path, chunks: AsyncIterator[bytes], max_bytes: int) -> tuple[str, int]:
    """Stream a body into the blob store; returns (sha256, size). Nothing is kept if it is too big.

    Written to a temporary file first and renamed into place, so a blob path only ever holds a
    complete file whose name is its hash.
    """
    tmp_dir = root / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir)
    try:
        with os.fdopen(fd, "wb") as out:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise MediaTooLarge
                digest.update(chunk)
                out.write(chunk)
        sha = digest.hexdigest()
        final = blob_path(root, sha)
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp_name, final)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return sha, size


def record(store: Store, row: MediaRow) -> None:
    with store.transaction():
        store.conn.execute(
            "INSERT OR REPLACE INTO media (sha256, order_id, kind, mime, size, uploaded_by, uploaded_at)"
            " VALUES (?,?,?,?,?,?,?)",
            (row.sha256, row.order_id, row.kind, row.mime, row.size, row.uploaded_by, row.uploaded_at))


def uploads(store: Store, sha256: str) -> list[MediaRow]:
    rows = store.conn.execute(
        "SELECT sha256, order_id, kind, mime, size, uploaded_by, uploaded_at FROM media WHERE sha256=?",
        (sha256,)).fetchall()
    return [MediaRow(sha256=s, order_id=o, kind=k, mime=m, size=z, uploaded_by=u, uploaded_at=t)
            for s, o, k, m, z, u, t in rows]


_REFERENCED = (
    "SELECT 1 FROM events e, json_each(e.payload, '$.media') m WHERE e.order_id=? AND e.channel='chat'"
    " AND json_extract(m.value, '$.sha256')=? LIMIT 1"
)


def referenced_in(store: Store, order_id: str, sha256: str) -> bool:
    """Does a stored chat message of ``order_id`` carry ``sha256`` in its ``media``? (indexed per order)"""
    return store.conn.execute(_REFERENCED, (order_id, sha256)).fetchone() is not None


def readable_orders(store: Store, sha256: str) -> tuple[list[MediaRow], list[str]]:
    """The blob's upload rows, and those of its orders whose chat references it."""
    rows = uploads(store, sha256)
    return rows, [r.order_id for r in rows if referenced_in(store, r.order_id, sha256)]


def collect_garbage(store: Store, root: Path, min_age_ms: int = GC_MIN_AGE_MS,
                    now: int | None = None) -> GcReport:
    """Delete blobs that no stored chat of their orders references and that are older than
    ``min_age_ms`` (a fresh upload is usually referenced a moment later), with their rows; and files
    the table does not know (an interrupted upload)."""
    now = now_ms() if now is None else now
    report = GcReport()
    known: set[str] = set()
    shas = [r[0] for r in store.conn.execute("SELECT DISTINCT sha256 FROM media")]
    for sha in shas:
        rows, readable = readable_orders(store, sha)
        if readable or max(r.uploaded_at for r in rows) > now - min_age_ms:
            known.add(sha)
            report.kept += 1
            continue
        report.removed_bytes += _unlink(blob_path(root, sha))
        with store.transaction():
            store.conn.execute("DELETE FROM media WHERE sha256=?", (sha,))
        report.removed += 1
    if root.exists():
        cutoff = now / 1000 - min_age_ms / 1000
        for path in root.glob("*/*"):
            if path.name not in known and path.is_file() and path.stat().st_mtime < cutoff:
                report.removed_bytes += _unlink(path)
                if SHA256_RE.match(path.name):
                    report.removed += 1
    return report


def _unlink(path: Path) -> int:
    try:
        size = path.stat().st_size
        path.unlink()
    except FileNotFoundError:
        return 0
    return size


# -- HTTP ------------------------------------------------------------------------------------------


async def upload(request: Request) -> Response:
    """``POST /media?order=ID``: the body is the file, ``Content-Type`` its MIME type -> 201 reference."""
    ctx: HttpContext = request.app.state.fishim
    principal = await ctx.principal(request)
    order = request.query_params.get("order", "")
    if not is_name(order):
        raise HttpError(400, "bad_request", "query parameter 'order' must be an order id (1-64 of A-Z a-z 0-9 _ -)")
    if not ctx.acl.may_publish(principal, ctx.topic(order, "chat", principal.username or "anonymous")):
        raise HttpError(403, "forbidden", f"not allowed to send media on order {order}")
    if await ctx.worker.run(Store.get_order, order) is None:
        raise HttpError(404, "unknown_order", f"order {order!r} does not exist")
    mime = normalise_mime(request.headers.get("content-type"))
    kind = kind_of(ctx.config.media, mime)
    if kind is None:
        raise HttpError(415, "unsupported_media_type", f"{mime or 'no Content-Type'} is not accepted "
                        f"(broker.yaml media.*.mimes)")
    limit = ctx.config.media.kinds()[kind].max_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, "too_large", f"{kind} is {declared} bytes, limit {limit} (media.{kind}.max_bytes)")
    try:
        sha, size = await receive(ctx.media_dir, request.stream(), limit)
    except MediaTooLarge:
        raise HttpError(413, "too_large", f"{kind} over {limit} bytes (media.{kind}.max_bytes)") from None
    if size == 0:
        raise HttpError(400, "bad_request", "empty body: send the file as the request body")
    row = MediaRow(sha256=sha, order_id=order, kind=kind, mime=mime, size=size, uploaded_by=principal.username,
                   uploaded_at=now_ms())
    await ctx.worker.run(record, row)
    log.info("media stored order=%s kind=%s size=%d by=%s", order, kind, size, principal.username)
    return JSONResponse({"kind": kind, "sha256": sha, "mime": mime, "size": size, "url": f"/media/{sha}"},
                        status_code=201)


async def download(request: Request) -> ASGIApp:
    """``GET /media/{sha256}``: for members of an order whose chat references it; ETag and Range."""
    ctx: HttpContext = request.app.state.fishim
    sha = request.path_params["sha256"]
    if not SHA256_RE.match(sha):
        raise HttpError(400, "bad_request", "a media address is 64 lowercase hex digits (its sha256)")
    principal = await ctx.principal(request)
    rows, readable = await ctx.worker.run(readable_orders, sha)
    path = blob_path(ctx.media_dir, sha)
    if not rows or not path.is_file():
        raise HttpError(404, "not_found", "no such media")
    allowed = [o for o in readable if ctx.acl.may_receive(principal, ctx.topic(o, "status"))]
    if not allowed:
        raise HttpError(403, "forbidden", "only members of an order whose chat carries this media may fetch it")
    etag = f'"{sha}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable",
               "X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox; default-src 'none'"}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    row = next(r for r in rows if r.order_id == allowed[0])
    size = path.stat().st_size
    problem = _range_problem(request.headers["range"], size) if "range" in request.headers else None
    if problem == "unsatisfiable":
        return JSONResponse({"error": "range_not_satisfiable", "detail": f"the file has {size} bytes"},
                            status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    response = FileResponse(path, media_type=row.mime, headers=headers, content_disposition_type="inline")
    return _WithoutRange(response) if problem == "malformed" else response


def _range_problem(header: str, size: int) -> str | None:
    """``unsatisfiable`` (RFC 9110 14.1.2: no range overlaps the file; Starlette would answer 416 with
    a bad ``Content-Range`` and a text body, so that answer is ours), ``malformed``, or None."""
    try:
        FileResponse._parse_range_header(header, size)
    except RangeNotSatisfiable:
        return "unsatisfiable"
    except MalformedRangeHeader:
        return "malformed"
    return None


class _WithoutRange:
    """RFC 9110 14.2: a Range header the server cannot parse is ignored (the whole file, 200)."""

    def __init__(self, response: FileResponse) -> None:
        self.response = response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"range"]
        await self.response({**scope, "headers": headers}, receive, send)


def _matches(if_none_match: str | None, etag: str) -> bool:
    """RFC 9110 13.1.2: weak comparison; ``*`` matches any current representation."""
    tags = {t.strip().removeprefix("W/") for t in (if_none_match or "").split(",")}
    return "*" in tags or etag in tags
