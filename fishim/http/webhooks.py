"""Webhooks: events POSTed to the shop's other systems, from a durable outbox in the store.

broker.yaml ``webhooks: [{url, events: [status, alert, chat], secret}]``. For every stored event of a
subscribed kind, :class:`WebhookHook` writes one ``webhook_outbox`` row per receiver inside the SAME
transaction as the event (the ingest's ``in_transaction`` hook), so an event is never stored without
its deliveries, nor the other way round, and a restart loses none. :class:`Dispatcher` (a task on the
broker's loop) POSTs due rows with ``X-Fishim-Signature: sha256=HEX`` (HMAC-SHA256 of the exact body
with the receiver's ``secret``), retries failures with exponential backoff and gives up after
``max_attempts``; ``fishim webhooks`` lists them. Secrets are config: never logged, never stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

import httpx
from pydantic import BaseModel

from fishim.config import Config, WebhookConfig
from fishim.http.context import StoreWorker
from fishim.store import Store, now_ms

log = logging.getLogger("fishim.http.webhooks")

BATCH = 50
KEEP_DELIVERED_MS = 30 * 86_400_000  # delivered rows older than this are pruned (failed ones stay)
PRUNE_EVERY_S = 3600.0
IDLE_POLL_S = 1.0  # also the most a delivery waits if the nudge after its commit came too early
SIGNATURE_HEADER = "X-Fishim-Signature"


class OutboxRow(BaseModel):
    id: int
    url: str
    event: str
    seq: int | None = None
    state: str  # pending | delivered | failed
    attempts: int
    next_at: int
    created_at: int
    updated_at: int
    last_status: int | None = None
    last_error: str | None = None
    body: bytes | None = None


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def event_body(event: str, topic: str, order: str | None, seq: int, order_seq: int | None,
               payload: bytes, order_state: str | None) -> bytes:
    """What a receiver gets: the event's kind, where it belongs, and its payload as stored."""
    data = json.loads(payload)
    if order is None and isinstance(data, dict):  # a notification names its order in the payload
        order = data.get("order")
    return json.dumps({"event": event, "order": order, "topic": topic, "seq": seq, "order_seq": order_seq,
                       "order_state": order_state, "payload": data},
                      ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def enqueue(store: Store, hooks: Iterable[WebhookConfig], event: str, key: str, body: bytes,
            seq: int | None) -> None:
    """One outbox row per receiver subscribed to ``event``, in the caller's transaction. ``key`` makes
    it idempotent: the same key for the same receiver is queued once."""
    now = now_ms()
    rows = [(h.url, event, key, seq, body, now, now, now) for h in hooks if event in h.events]
    if rows:
        store.conn.executemany("INSERT OR IGNORE INTO webhook_outbox (url, event, key, seq, body, next_at,"
                               " created_at, updated_at) VALUES (?,?,?,?,?,?,?,?)", rows)


def classify(channel: str, payload: bytes) -> tuple[str, str | None]:
    """(webhook event, dedupe key or None for "by seq") of a stored message.

    ``status`` and ``chat`` are themselves. An alert reaches each of its recipients as a notification
    on ``notify/{user}`` carrying ``alert``; the receiver gets it once per alert, priority and reason.
    """
    if channel != "notify":
        return channel, None
    body = json.loads(payload)
    alert = body.get("alert") if isinstance(body, dict) else None
    if not alert:
        return "notice", None
    return "alert", f"alert:{alert}:{body.get('reason')}:{body.get('priority')}"


class WebhookHook:
    """The ingest hook: outbox rows in the event's transaction, then a nudge to the dispatcher.

    ``in_transaction`` runs on the ingest's writer thread before COMMIT; ``after_commit`` runs on
    the loop once the rows are committed, and wakes the dispatcher (its poll, ``IDLE_POLL_S``, is
    only the safety net).
    """

    def __init__(self, config: Config) -> None:
        self.hooks = list(config.webhooks)
        self.wanted = {e for h in self.hooks for e in h.events}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dispatcher: Dispatcher | None = None
        self._queued = False  # set on the writer thread, read on the loop after the COMMIT

    def attach(self, loop: asyncio.AbstractEventLoop | None, dispatcher: Dispatcher | None) -> None:
        """Whom to nudge after queueing (None, None: nobody, e.g. while stopping)."""
        self._loop, self._dispatcher = loop, dispatcher

    def in_transaction(self, store: Store, committed: Sequence[Any]) -> None:
        queued = False
        for c in committed:
            channel = str(c.ref.channel)
            if channel not in self.wanted and channel != "notify":
                continue
            event, key = classify(channel, c.payload)
            if event in self.wanted:
                order = getattr(c, "order", None)
                body = event_body(event, c.topic, c.ref.order, c.seq, c.order_seq, c.payload,
                                  getattr(order, "state", None))
                enqueue(store, self.hooks, event, key or f"seq:{c.seq}", body, c.seq)
                queued = True
        self._queued = self._queued or queued

    def after_commit(self, committed: Sequence[Any]) -> None:
        """On the broker's loop, right after the COMMIT that queued rows: deliver them now."""
        if self._queued and self._dispatcher is not None:
            self._queued = False
            self._dispatcher.wake()


class Dispatcher:
    """Delivers due outbox rows; runs until :meth:`stop`. Rows survive restarts (they are in the store)."""

    def __init__(self, config: Config, worker: StoreWorker) -> None:
        self.hooks = {h.url: h for h in config.webhooks}
        self.worker = worker
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._client = httpx.AsyncClient(follow_redirects=False, headers={"User-Agent": "fishim-webhooks"})

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._client.aclose()

    async def _run(self) -> None:
        pruned_at = 0.0
        while not self._stopping:
            try:
                if time.monotonic() - pruned_at > PRUNE_EVERY_S:
                    pruned_at = time.monotonic()
                    await self.worker.run(prune, now_ms() - KEEP_DELIVERED_MS)
                rows = await self.worker.run(due_rows, now_ms(), BATCH)
                if rows:
                    await asyncio.gather(*(self._deliver(r) for r in rows))
                    continue
                wait = await self.worker.run(next_due_in, now_ms())
            except Exception as exc:  # a locked or broken store: log, wait, try again; never die
                log.warning("webhook dispatcher error=%s", exc)
                wait = IDLE_POLL_S
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(wait, IDLE_POLL_S))

    async def _deliver(self, row: OutboxRow) -> None:
        hook = self.hooks.get(row.url)
        if hook is None:
            await self.worker.run(finish, row.id, "failed", None, "receiver no longer in broker.yaml webhooks")
            return
        body = row.body or b""
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(hook.secret, body),
                   "X-Fishim-Event": row.event, "X-Fishim-Delivery": str(row.id)}
        status: int | None = None
        try:
            response = await self._client.post(row.url, content=body, headers=headers, timeout=hook.timeout_s)
            status = response.status_code
            error = None if 200 <= status < 300 else f"HTTP {status}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
        attempts = row.attempts + 1
        if error is None:
            await self.worker.run(finish, row.id, "delivered", status, None)
            log.info("webhook delivered id=%d event=%s url=%s attempts=%d", row.id, row.event, row.url, attempts)
        elif attempts >= hook.max_attempts:
            await self.worker.run(finish, row.id, "failed", status, error)
            log.warning("webhook given up id=%d url=%s attempts=%d error=%s", row.id, row.url, attempts, error)
        else:
            delay = min(hook.backoff_s * 2 ** (attempts - 1), hook.backoff_max_s) * random.uniform(0.8, 1.2)
            await self.worker.run(retry_later, row.id, status, error, now_ms() + int(delay * 1000))
            log.info("webhook retry id=%d url=%s attempts=%d in=%.1fs error=%s", row.id, row.url, attempts, delay,
                     error)


_COLS = "id, url, event, seq, state, attempts, next_at, created_at, updated_at, last_status, last_error"


def _row(values: tuple[Any, ...], body: bytes | None = None) -> OutboxRow:
    return OutboxRow(**dict(zip(_COLS.split(", "), values, strict=True)), body=body)


def due_rows(store: Store, now: int, limit: int) -> list[OutboxRow]:
    rows = store.conn.execute(f"SELECT {_COLS}, body FROM webhook_outbox WHERE state='pending' AND next_at<=?"
                              f" ORDER BY id LIMIT ?", (now, limit)).fetchall()
    return [_row(r[:-1], bytes(r[-1])) for r in rows]


def next_due_in(store: Store, now: int) -> float:
    row = store.conn.execute("SELECT min(next_at) FROM webhook_outbox WHERE state='pending'").fetchone()
    return IDLE_POLL_S if row[0] is None else max((row[0] - now) / 1000, 0.0)


def finish(store: Store, row_id: int, state: str, status: int | None, error: str | None) -> None:
    store.conn.execute("UPDATE webhook_outbox SET state=?, attempts=attempts+1, updated_at=?, last_status=?,"
                       " last_error=? WHERE id=?", (state, now_ms(), status, error, row_id))


def retry_later(store: Store, row_id: int, status: int | None, error: str, next_at: int) -> None:
    store.conn.execute("UPDATE webhook_outbox SET attempts=attempts+1, updated_at=?, last_status=?, last_error=?,"
                       " next_at=? WHERE id=?", (now_ms(), status, error, next_at, row_id))


def prune(store: Store, before: int) -> int:
    """Forget deliveries that succeeded before ``before``: the outbox is not an archive."""
    return store.conn.execute("DELETE FROM webhook_outbox WHERE state='delivered' AND updated_at<?",
                              (before,)).rowcount


def list_rows(store: Store, state: str | None = None, limit: int = 100) -> list[OutboxRow]:
    """The newest ``limit`` outbox rows (optionally in ``state``), oldest first, without bodies."""
    where, args = ("WHERE state=?", [state]) if state else ("", [])
    rows = store.conn.execute(f"SELECT {_COLS} FROM webhook_outbox {where} ORDER BY id DESC LIMIT ?",
                              (*args, limit)).fetchall()
    return [_row(r) for r in reversed(rows)]
