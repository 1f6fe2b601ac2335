"""The SQLite store: event log, order projection, retained state, receipts, users, dead letters.

One file in WAL mode. The bridge is the only writer of events; the CLI and the broker read through
their own connections (``readonly=True``) while it runs. The schema is created and migrated here,
versioned by ``PRAGMA user_version``, never by hand.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger("fishim.store")

SCHEMA_VERSION = 3

FILE_MODE = 0o600
"""The store and its -wal/-shm files hold customers' names, phones and addresses: owner only."""
DEADLETTER_PAYLOAD_BYTES = 4096
"""Bytes of a refused payload kept in its dead letter: enough to see what it was, not a disk filler."""
DEADLETTER_DETAIL_CHARS = 1000
MAX_DEADLETTERS = 10_000
"""Dead letters kept; the oldest go first (a flood of bad input cannot fill the disk)."""

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    order_id TEXT NOT NULL,
    order_seq INTEGER NOT NULL,
    channel TEXT NOT NULL,
    topic TEXT NOT NULL,
    sender TEXT NOT NULL,
    ts INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    retain INTEGER NOT NULL DEFAULT 0,
    payload TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_order_seq ON events(order_id, order_seq);
CREATE INDEX IF NOT EXISTS events_order_channel ON events(order_id, channel, seq);
CREATE TABLE IF NOT EXISTS orders (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    customer TEXT,
    rider TEXT,
    items TEXT NOT NULL DEFAULT '[]',
    picked TEXT NOT NULL DEFAULT '{}',
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    order_seq INTEGER NOT NULL,
    last_location TEXT
);
CREATE INDEX IF NOT EXISTS orders_state ON orders(state, updated_at);
CREATE INDEX IF NOT EXISTS orders_rider ON orders(rider, updated_at);
CREATE INDEX IF NOT EXISTS orders_customer ON orders(customer, updated_at);
CREATE INDEX IF NOT EXISTS orders_updated ON orders(updated_at);
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL DEFAULT 1,
    seq INTEGER,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS receipts (
    order_id TEXT NOT NULL,
    member TEXT NOT NULL,
    read_up_to INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (order_id, member)
);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS deadletters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at INTEGER NOT NULL,
    topic TEXT NOT NULL,
    user TEXT,
    msg_id TEXT,
    error TEXT NOT NULL,
    detail TEXT NOT NULL,
    payload BLOB
);
CREATE INDEX IF NOT EXISTS deadletters_received ON deadletters(received_at);
"""

# v2: each device's sync cursor, learnt from its sync requests (`fishim devices`, `fishim replay`).
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS devices (
    user TEXT NOT NULL,
    client_id TEXT NOT NULL,
    cursor INTEGER NOT NULL,
    served INTEGER NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    syncs INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (user, client_id)
);
"""

# v3: the HTTP side (fishim.http): uploaded media, API keys, the webhook outbox.
_SCHEMA_V3 = """
CREATE TABLE IF NOT EXISTS media (
    sha256 TEXT NOT NULL,
    order_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    mime TEXT NOT NULL,
    size INTEGER NOT NULL,
    uploaded_by TEXT,
    uploaded_at INTEGER NOT NULL,
    PRIMARY KEY (sha256, order_id)
);
CREATE TABLE IF NOT EXISTS api_keys (
    name TEXT PRIMARY KEY,
    key_sha256 TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    last_used_at INTEGER
);
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    url TEXT NOT NULL,
    event TEXT NOT NULL,
    key TEXT NOT NULL,
    seq INTEGER,
    body BLOB NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    last_status INTEGER,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox(state, next_at);
CREATE UNIQUE INDEX IF NOT EXISTS webhook_outbox_key ON webhook_outbox(url, key);
"""

MIGRATIONS: dict[int, str] = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3}


def now_ms() -> int:
    return int(time.time() * 1000)


class NewEvent(BaseModel):
    """An accepted message on its way into the log."""

    id: str
    order_id: str
    channel: str
    topic: str
    sender: str
    ts: int
    payload: str  # the JSON text as received (unknown fields kept)
    retain: bool = False


class StoredEvent(NewEvent):
    seq: int
    order_seq: int
    received_at: int

    def payload_dict(self) -> dict[str, Any]:
        return json.loads(self.payload)


class OrderRow(BaseModel):
    """The order projection, rebuilt from the event log if needed."""

    id: str
    state: str
    customer: str | None = None
    rider: str | None = None
    items: list[dict[str, Any]] = Field(default_factory=list)
    picked: dict[str, int] = Field(default_factory=dict)
    created_at: int
    updated_at: int
    last_seq: int
    order_seq: int
    last_location: dict[str, Any] | None = None


class UserRow(BaseModel):
    name: str
    role: str
    password_hash: str
    created_at: int


class DeadLetter(BaseModel):
    id: int | None = None
    received_at: int
    topic: str
    user: str | None = None
    msg_id: str | None = None
    error: str
    detail: str
    payload: bytes | None = None


class DeviceRow(BaseModel):
    """One device (a user's MQTT client id) as its sync requests showed it.

    ``cursor`` is the ``since`` of its last sync request: everything up to it was delivered to the app
    (the client library only asks from a cursor its app has taken). ``served`` is the ``next_since``
    fishim answered that request with.
    """

    user: str
    client_id: str
    cursor: int
    served: int
    first_seen: int
    last_seen: int
    syncs: int = 1


class RetainedRow(BaseModel):
    topic: str
    payload: bytes
    qos: int = 1
    seq: int | None = None
    updated_at: int


class EventRow(NamedTuple):
    """One ``events`` row as the bridge writes it in bulk: a plain tuple, no validation cost."""

    seq: int
    id: str
    order_id: str
    order_seq: int
    channel: str
    topic: str
    sender: str
    ts: int
    received_at: int
    retain: int
    payload: str


class ReceiptRow(BaseModel):
    """One member's read mark on one order (``read_up_to`` is an order seq)."""

    order_id: str
    member: str
    read_up_to: int
    updated_at: int


class OrderOverview(BaseModel):
    """One line of ``fishim orders list``: the projection plus what the owner scans for.

    ``unread`` maps the role (``customer``, ``rider``) to how many status changes and chat messages
    from others came after that member's read receipt; None when the order has no such member.
    """

    order: OrderRow
    last_event: StoredEvent | None = None
    unread: dict[str, int | None] = Field(default_factory=dict)


_EVENT_COLS = "seq, id, order_id, order_seq, channel, topic, sender, ts, received_at, retain, payload"
_ORDER_COLS = (
    "id, state, customer, rider, items, picked, created_at, updated_at, last_seq, order_seq, last_location"
)


class StoreError(Exception):
    """The store file is missing or unusable; ``str()`` is one line for the CLI."""


class Store:
    """Typed access to the fishim SQLite file."""

    max_deadletters = MAX_DEADLETTERS

    def __init__(self, path: Path | str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.conn = self._connect()
        if not readonly:
            self.migrate()
            self._restrict_files()

    @property
    def db(self) -> sqlite_utils.Database:
        """A sqlite-utils view of the same connection, imported on first use: importing it costs
        ~40 ms that every short CLI command would otherwise pay at start-up."""
        import sqlite_utils

        return sqlite_utils.Database(self.conn)

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            if not self.path.exists():
                raise StoreError(f"no store at {self.path} (start `fishim up` or pass --db)")
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False,
                                   isolation_level=None)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # created 0600 before SQLite opens it; SQLite gives -wal and -shm the same mode
            with contextlib.suppress(FileExistsError):
                os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _restrict_files(self) -> None:
        """Make the file and its -wal/-shm owner-only, also when an older version made them 0644
        (a file someone else owns is left as it is: chmod is not ours to do there)."""
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError, PermissionError):
                os.chmod(f"{self.path}{suffix}", FILE_MODE)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema -------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the file up to :data:`SCHEMA_VERSION`, one migration per transaction."""
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.transaction():
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version={target}")
            log.info("store migrated path=%s version=%d", self.path, target)

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT; rolled back on any exception."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- events -------------------------------------------------------------------------------

    def insert_event(self, event: NewEvent, order_seq: int, received_at: int | None = None) -> int | None:
        """Append one event inside the caller's transaction; None if its id is already stored."""
        cur = self.conn.execute(
            "INSERT OR IGNORE INTO events (id, order_id, order_seq, channel, topic, sender, ts, received_at,"
            " retain, payload) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (event.id, event.order_id, order_seq, event.channel, event.topic, event.sender, event.ts,
             received_at or now_ms(), int(event.retain), event.payload),
        )
        return cur.lastrowid if cur.rowcount else None

    def insert_events(self, rows: Iterable[EventRow]) -> None:
        """Append a batch with the caller's ``seq`` values, inside the caller's transaction.

        Plain INSERT: a duplicate id or seq raises IntegrityError, because the bridge filters
        duplicates before applying the rules and a silent IGNORE would let the projection drift.
        """
        _insert_rows(self.conn, f"INSERT INTO events ({_EVENT_COLS})", rows)

    def next_seq(self) -> int:
        """The seq AUTOINCREMENT would give the next event (the bridge, sole writer, assigns it)."""
        row = self.conn.execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name='events'), 0),"
            " coalesce((SELECT max(seq) FROM events), 0))"
        ).fetchone()
        return int(row[0]) + 1

    def existing_ids(self, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` are already stored: one indexed query per 500 ids, not one per message."""
        wanted = list(ids)
        found: set[str] = set()
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.conn.execute(f"SELECT id FROM events WHERE id IN ({marks})", chunk))
        return found

    def has_event(self, event_id: str) -> bool:
        return self.conn.execute("SELECT 1 FROM events WHERE id=?", (event_id,)).fetchone() is not None

    def event_in_order(self, order_id: str, event_id: str) -> bool:
        row = self.conn.execute("SELECT order_id FROM events WHERE id=?", (event_id,)).fetchone()
        return row is not None and row[0] == order_id

    def get_event(self, event_id: str) -> StoredEvent | None:
        row = self.conn.execute(f"SELECT {_EVENT_COLS} FROM events WHERE id=?", (event_id,)).fetchone()
        return _event(row) if row else None

    def events_since(self, since: int, orders: Iterable[str] | None = None, limit: int = 1000) -> list[StoredEvent]:
        """Events with ``seq > since`` in seq order, optionally only of ``orders``."""
        if orders is None:
            rows = self.conn.execute(
                f"SELECT {_EVENT_COLS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (since, limit)
            ).fetchall()
        else:
            ids = list(orders)
            if not ids:
                return []
            marks = ",".join("?" * len(ids))
            rows = self.conn.execute(
                f"SELECT {_EVENT_COLS} FROM events WHERE seq > ? AND order_id IN ({marks})"
                " ORDER BY seq LIMIT ?",
                (since, *ids, limit),
            ).fetchall()
        return [_event(r) for r in rows]

    def order_events(self, order_id: str) -> list[StoredEvent]:
        rows = self.conn.execute(
            f"SELECT {_EVENT_COLS} FROM events WHERE order_id=? ORDER BY order_seq", (order_id,)
        ).fetchall()
        return [_event(r) for r in rows]

    def max_seq(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])

    def count_events(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM events").fetchone()[0])

    # -- orders -------------------------------------------------------------------------------

    def get_order(self, order_id: str) -> OrderRow | None:
        row = self.conn.execute(f"SELECT {_ORDER_COLS} FROM orders WHERE id=?", (order_id,)).fetchone()
        return _order(row) if row else None

    def put_order(self, order: OrderRow) -> None:
        """Insert or replace the projection row, inside the caller's transaction."""
        self.put_orders([order])

    def put_orders(self, orders: Iterable[OrderRow]) -> None:
        """:meth:`put_order` for a batch of orders, in as few statements as possible."""
        _insert_rows(self.conn, f"INSERT OR REPLACE INTO orders ({_ORDER_COLS})", [
            (o.id, o.state, o.customer, o.rider, json.dumps(o.items), json.dumps(o.picked), o.created_at,
             o.updated_at, o.last_seq, o.order_seq, json.dumps(o.last_location) if o.last_location is not None
             else None) for o in orders])

    def list_orders(self, state: str | None = None, rider: str | None = None, customer: str | None = None,
                    updated_since: int | None = None, limit: int = 1000) -> list[OrderRow]:
        where, args = _order_filters("", state=state, rider=rider, customer=customer, updated_since=updated_since)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self.conn.execute(
            f"SELECT {_ORDER_COLS} FROM orders {clause} ORDER BY updated_at DESC LIMIT ?", (*args, limit)
        ).fetchall()
        return [_order(r) for r in rows]

    def order_ids_for(self, user: str, role: str) -> list[str] | None:
        """Orders ``user`` may read: None means every order (owner, staff, service)."""
        if role in ("owner", "staff", "service"):
            return None
        column = {"rider": "rider", "customer": "customer"}.get(role)
        if column is None:
            return []
        return [r[0] for r in self.conn.execute(f"SELECT id FROM orders WHERE {column}=?", (user,))]

    def orders_by_state(self) -> dict[str, int]:
        return dict(self.conn.execute("SELECT state, count(*) FROM orders GROUP BY state").fetchall())

    # -- retained -----------------------------------------------------------------------------

    def put_retained(self, topic: str, payload: bytes, qos: int = 1, seq: int | None = None) -> None:
        """Latest retained payload per topic; an empty payload clears it (MQTT 3.3.1-10)."""
        if not payload:
            self.conn.execute("DELETE FROM retained WHERE topic=?", (topic,))
            return
        self.conn.execute(
            "INSERT OR REPLACE INTO retained (topic, payload, qos, seq, updated_at) VALUES (?,?,?,?,?)",
            (topic, payload, qos, seq, now_ms()),
        )

    def put_retained_rows(self, rows: Iterable[tuple[str, bytes, int, int | None]]) -> None:
        """:meth:`put_retained` for a batch of ``(topic, payload, qos, seq)``, payloads not empty."""
        now = now_ms()
        _insert_rows(self.conn, "INSERT OR REPLACE INTO retained (topic, payload, qos, seq, updated_at)",
                     [(topic, payload, qos, seq, now) for topic, payload, qos, seq in rows])

    def get_retained(self, topic: str) -> RetainedRow | None:
        row = self.conn.execute(
            "SELECT topic, payload, qos, seq, updated_at FROM retained WHERE topic=?", (topic,)
        ).fetchone()
        if row is None:
            return None
        return RetainedRow(topic=row[0], payload=bytes(row[1]), qos=row[2], seq=row[3], updated_at=row[4])

    def retained(self) -> list[RetainedRow]:
        rows = self.conn.execute("SELECT topic, payload, qos, seq, updated_at FROM retained ORDER BY topic")
        return [RetainedRow(topic=t, payload=bytes(p), qos=q, seq=s, updated_at=u) for t, p, q, s, u in rows]

    # -- receipts -----------------------------------------------------------------------------

    def get_receipt(self, order_id: str, member: str) -> int | None:
        row = self.conn.execute(
            "SELECT read_up_to FROM receipts WHERE order_id=? AND member=?", (order_id, member)
        ).fetchone()
        return int(row[0]) if row else None

    def put_receipt(self, order_id: str, member: str, read_up_to: int) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO receipts (order_id, member, read_up_to, updated_at) VALUES (?,?,?,?)",
            (order_id, member, read_up_to, now_ms()),
        )

    def put_receipts(self, rows: Iterable[tuple[str, str, int]]) -> None:
        """:meth:`put_receipt` for a batch of ``(order_id, member, read_up_to)``."""
        now = now_ms()
        _insert_rows(self.conn, "INSERT OR REPLACE INTO receipts (order_id, member, read_up_to, updated_at)",
                     [(*row, now) for row in rows])

    def receipts(self, order_id: str) -> dict[str, int]:
        rows = self.conn.execute("SELECT member, read_up_to FROM receipts WHERE order_id=?", (order_id,))
        return {m: int(r) for m, r in rows}

    # -- users --------------------------------------------------------------------------------

    def get_user(self, name: str) -> UserRow | None:
        row = self.conn.execute(
            "SELECT name, role, password_hash, created_at FROM users WHERE name=?", (name,)
        ).fetchone()
        return UserRow(name=row[0], role=row[1], password_hash=row[2], created_at=row[3]) if row else None

    def put_user(self, user: UserRow) -> None:
        with self.transaction():
            self.conn.execute(
                "INSERT OR REPLACE INTO users (name, role, password_hash, created_at) VALUES (?,?,?,?)",
                (user.name, user.role, user.password_hash, user.created_at),
            )

    def remove_user(self, name: str) -> bool:
        with self.transaction():
            return self.conn.execute("DELETE FROM users WHERE name=?", (name,)).rowcount > 0

    def users(self) -> list[UserRow]:
        rows = self.conn.execute("SELECT name, role, password_hash, created_at FROM users ORDER BY name")
        return [UserRow(name=n, role=r, password_hash=h, created_at=c) for n, r, h, c in rows]

    def count_users(self, exclude_role: str | None = "service") -> int:
        """Human accounts; the bridge's own service account does not end anonymous loopback access."""
        return int(self.conn.execute(
            "SELECT count(*) FROM users WHERE role IS NOT ?", (exclude_role,)
        ).fetchone()[0])

    # -- devices ------------------------------------------------------------------------------

    def record_device(self, user: str, client_id: str, cursor: int, served: int, seen_at: int) -> None:
        """Upsert what one sync request said about its device (autocommit, or the caller's transaction)."""
        self.conn.execute(
            "INSERT INTO devices (user, client_id, cursor, served, first_seen, last_seen) VALUES (?,?,?,?,?,?)"
            " ON CONFLICT (user, client_id) DO UPDATE SET cursor=excluded.cursor, served=excluded.served,"
            " last_seen=excluded.last_seen, syncs=syncs+1",
            (user, client_id, cursor, served, seen_at, seen_at))

    def devices(self, user: str | None = None) -> list[DeviceRow]:
        """A user's devices (everyone's with None), most recently seen first."""
        sql = "SELECT user, client_id, cursor, served, first_seen, last_seen, syncs FROM devices"
        try:
            rows = self.conn.execute(sql + (" WHERE user=?" if user else "") + " ORDER BY last_seen DESC",
                                     (user,) if user else ()).fetchall()
        except sqlite3.OperationalError:  # a v1 file opened read-only: nobody has synced since v2
            return []
        return [DeviceRow(user=u, client_id=c, cursor=k, served=s, first_seen=f, last_seen=la, syncs=n)
                for u, c, k, s, f, la, n in rows]

    def device(self, user: str, client_id: str) -> DeviceRow | None:
        return next((d for d in self.devices(user) if d.client_id == client_id), None)

    # -- dead letters -------------------------------------------------------------------------

    def add_deadletter(self, letter: DeadLetter) -> None:
        """Inside the caller's transaction (or autocommit when there is none).

        Bounded, because refused input is the attacker's to choose: the payload keeps its first
        ``DEADLETTER_PAYLOAD_BYTES`` (the detail says how long it was), id and detail are cut, and
        past ``max_deadletters`` rows the oldest are deleted (one range delete on the primary key).
        """
        payload, detail = letter.payload, letter.detail[:DEADLETTER_DETAIL_CHARS]
        if payload is not None and len(payload) > DEADLETTER_PAYLOAD_BYTES:
            detail = f"{detail} (payload cut to its first {DEADLETTER_PAYLOAD_BYTES} of {len(payload)} bytes)"
            payload = payload[:DEADLETTER_PAYLOAD_BYTES]
        msg_id = letter.msg_id[:200] if letter.msg_id is not None else None
        cur = self.conn.execute(
            "INSERT INTO deadletters (received_at, topic, user, msg_id, error, detail, payload)"
            " VALUES (?,?,?,?,?,?,?)",
            (letter.received_at, letter.topic[:1024], letter.user, msg_id, letter.error, detail, payload),
        )
        if cur.lastrowid is not None and cur.lastrowid > self.max_deadletters:
            self.conn.execute("DELETE FROM deadletters WHERE id <= ?", (cur.lastrowid - self.max_deadletters,))

    def deadletters(self, since: int | None = None, limit: int = 1000) -> list[DeadLetter]:
        rows = self.conn.execute(
            "SELECT id, received_at, topic, user, msg_id, error, detail, payload FROM deadletters"
            " WHERE received_at >= ? ORDER BY id LIMIT ?",
            (since or 0, limit),
        )
        return [DeadLetter(id=i, received_at=r, topic=t, user=u, msg_id=m, error=e, detail=d,
                           payload=bytes(p) if p is not None else None) for i, r, t, u, m, e, d, p in rows]


    # -- owner views (read-only queries behind the CLI) ----------------------------------------

    def order_overview(self, state: str | None = None, rider: str | None = None,
                       updated_since: int | None = None, open_created_before: int | None = None,
                       limit: int | None = 50) -> list[OrderOverview]:
        """Orders with their last event and unread counts, in one query (indexes: orders_*).

        ``open_created_before`` keeps only open orders (not delivered/cancelled) created before that
        time, oldest first: the "late" view. Otherwise the most recently updated come first.
        """
        where, args = _order_filters("o.", state=state, rider=rider, updated_since=updated_since)
        order_by = "o.updated_at DESC"
        if open_created_before is not None:
            where.append("o.state NOT IN ('delivered','cancelled') AND o.created_at<?")
            args.append(open_created_before)
            order_by = "o.created_at"
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        cols = ", ".join(f"o.{c.strip()}" for c in _ORDER_COLS.split(","))
        ecols = ", ".join(f"e.{c.strip()}" for c in _EVENT_COLS.split(","))
        rows = self.conn.execute(
            f"SELECT {cols}, {_unread_sql('customer')}, {_unread_sql('rider')}, {ecols}"
            f" FROM orders o LEFT JOIN events e ON e.seq=o.last_seq {clause} ORDER BY {order_by} LIMIT ?",
            (*args, -1 if limit is None else limit),
        ).fetchall()
        width = len(_ORDER_COLS.split(","))
        result = []
        for row in rows:
            event = row[width + 2:]
            result.append(OrderOverview(order=_order(row[:width]),
                                        last_event=_event(event) if event[0] is not None else None,
                                        unread={"customer": row[width], "rider": row[width + 1]}))
        return result

    def receipt_rows(self, order_id: str) -> list[ReceiptRow]:
        rows = self.conn.execute(
            "SELECT order_id, member, read_up_to, updated_at FROM receipts WHERE order_id=? ORDER BY member",
            (order_id,))
        return [ReceiptRow(order_id=o, member=m, read_up_to=r, updated_at=u) for o, m, r, u in rows]

    def recent_deadletters(self, since: int | None = None, limit: int = 100) -> list[DeadLetter]:
        """The newest ``limit`` dead letters received at or after ``since``, oldest first."""
        rows = self.conn.execute(
            "SELECT id, received_at, topic, user, msg_id, error, detail, payload FROM deadletters"
            " WHERE received_at >= ? ORDER BY id DESC LIMIT ?",
            (since or 0, limit),
        ).fetchall()
        return [_deadletter(r) for r in reversed(rows)]

    def deadletters_after(self, after_id: int, limit: int = 1000) -> list[DeadLetter]:
        """Dead letters with ``id > after_id``: what ``orders watch`` follows besides events."""
        rows = self.conn.execute(
            "SELECT id, received_at, topic, user, msg_id, error, detail, payload FROM deadletters"
            " WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall()
        return [_deadletter(r) for r in rows]

    def max_deadletter_id(self) -> int:
        return int(self.conn.execute("SELECT coalesce(max(id), 0) FROM deadletters").fetchone()[0])

    def count_deadletters(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM deadletters").fetchone()[0])

    def count_events_received_since(self, received_at: int) -> int:
        """Events stored at or after ``received_at`` (epoch ms), without an index on received_at.

        The bridge stamps ``received_at`` as it appends, so it grows with ``seq``; a binary search on
        the primary key finds the first such seq in ~17 lookups on 100k events, instead of a scan or
        an index the writer would pay for on every insert.
        """
        lo, hi = 0, self.max_seq()
        if hi == 0:
            return 0
        while lo < hi:  # smallest seq in (lo, hi] whose received_at >= received_at
            mid = (lo + hi) // 2
            row = self.conn.execute(
                "SELECT received_at FROM events WHERE seq > ? ORDER BY seq LIMIT 1", (mid,)).fetchone()
            if row is None or row[0] >= received_at:
                hi = mid
            else:
                lo = mid + 1
        return int(self.conn.execute("SELECT count(*) FROM events WHERE seq > ?", (lo,)).fetchone()[0])

    def file_bytes(self) -> int:
        """The store's size on disk: the main file plus its write-ahead log."""
        wal = self.path.with_name(self.path.name + "-wal")
        return sum(p.stat().st_size for p in (self.path, wal) if p.exists())


def _order_filters(alias: str, *, state: str | None = None, rider: str | None = None,
                   customer: str | None = None, updated_since: int | None = None) -> tuple[list[str], list[Any]]:
    """WHERE terms and their arguments for the order list filters (``alias`` is ``""`` or ``"o."``)."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("state", state), ("rider", rider), ("customer", customer)):
        if value is not None:
            where.append(f"{alias}{column}=?")
            args.append(value)
    if updated_since is not None:
        where.append(f"{alias}updated_at>=?")
        args.append(updated_since)
    return where, args


ROWS_PER_INSERT = 100  # rows per multi-row INSERT: 1,100 parameters at most, far below SQLite's limit


def _insert_rows(conn: sqlite3.Connection, head: str, rows: Iterable[Sequence[Any]]) -> None:
    """``head`` (``INSERT … (columns)``) for every row, as multi-row VALUES of up to ROWS_PER_INSERT rows.

    Not ``executemany``: that runs one statement per row, and each one releases and re-takes the GIL,
    which under load means a thread switch with the bridge's network thread per row.
    """
    rows = rows if isinstance(rows, list | tuple) else list(rows)
    for start in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[start:start + ROWS_PER_INSERT]
        conn.execute(_values_sql(head, len(chunk[0]), len(chunk)), list(chain.from_iterable(chunk)))


@functools.cache
def _values_sql(head: str, width: int, count: int) -> str:
    row = f"({','.join('?' * width)})"
    return f"{head} VALUES {','.join([row] * count)}"


def _event(row: tuple[Any, ...]) -> StoredEvent:
    seq, ident, order_id, order_seq, channel, topic, sender, ts, received_at, retain, payload = row
    return StoredEvent(seq=seq, id=ident, order_id=order_id, order_seq=order_seq, channel=channel,
                       topic=topic, sender=sender, ts=ts, received_at=received_at, retain=bool(retain),
                       payload=payload)


def _order(row: tuple[Any, ...]) -> OrderRow:
    ident, state, customer, rider, items, picked, created, updated, last_seq, order_seq, loc = row
    return OrderRow(id=ident, state=state, customer=customer, rider=rider, items=json.loads(items),
                    picked=json.loads(picked), created_at=created, updated_at=updated, last_seq=last_seq,
                    order_seq=order_seq, last_location=json.loads(loc) if loc else None)


def _deadletter(row: tuple[Any, ...]) -> DeadLetter:
    i, r, t, u, m, e, d, p = row
    return DeadLetter(id=i, received_at=r, topic=t, user=u, msg_id=m, error=e, detail=d,
                      payload=bytes(p) if p is not None else None)


def _unread_sql(member_column: str) -> str:
    """Status and chat events from others after ``o.<member_column>``'s read receipt (NULL: no member)."""
    return (
        f"CASE WHEN o.{member_column} IS NULL THEN NULL ELSE (SELECT count(*) FROM events x"
        f" WHERE x.order_id=o.id AND x.order_seq > coalesce((SELECT r.read_up_to FROM receipts r"
        f" WHERE r.order_id=o.id AND r.member=o.{member_column}), 0)"
        f" AND x.channel IN ('status','chat') AND x.sender<>o.{member_column}) END"
    )
