"""The PostgreSQL store (``store.url: postgresql://…``): the same schema, migrations and typed
reads/writes as :class:`fishim.store.Store`, for bridges on several machines sharing one database.

One class, not a second copy of the queries: :class:`PgStore` is a :class:`~fishim.store.Store`
whose connection (:class:`_PgConnection`) translates the store's SQLite dialect to PostgreSQL once
per statement text (placeholders, ``INSERT OR REPLACE``/``OR IGNORE``, ``json_each``, the ``user``
column, ``LIMIT -1``). The few methods that are SQLite-only in substance (migrations, ``next_seq``,
size on disk) are overridden here.

**The writer lock.** ``seq`` is the sync cursor and must grow in commit order with no gap a client
could skip: the single writer assigns it (:class:`fishim.ingest.Writer`), so only one writer may
exist. A writer :class:`PgStore` (``writer=True``) takes a session-level advisory lock
(``pg_advisory_lock``) on its own connection before it reads anything, and does every write on that
same session. If that session ends (the process died, the network dropped it, the server cut it
after ``lock_timeout`` of silence) the lock is gone with it and so is the only connection that could
write: the next statement raises :class:`~fishim.store.StoreFenced` instead of reconnecting. A bridge
that lost the lock never writes; a standby bridge blocked in ``pg_advisory_lock`` gets it at once.
"""

from __future__ import annotations

import functools
import logging
import re
import sqlite3
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fishim.store import MIGRATIONS, SCHEMA_VERSION, NewEvent, Store, StoreError, StoreFenced, now_ms

log = logging.getLogger("fishim.pgstore")

try:
    import psycopg
except ImportError:  # pragma: no cover - only without the postgres extra
    psycopg = None  # type: ignore[assignment]

_PK = {"orders": ("id",), "retained": ("topic",), "receipts": ("order_id", "member"), "users": ("name",),
       "media": ("sha256", "order_id"), "api_keys": ("name",), "alerts": ("id",), "notify_outbox": ("id",)}
_SERIAL = re.compile(r"^\s*INSERT INTO (deadletters|webhook_outbox) \(")  # sqlite3's lastrowid: RETURNING id
_NO_OP = re.compile(r"^\s*PRAGMA\s+(synchronous|busy_timeout|journal_mode)\b", re.IGNORECASE)


@functools.lru_cache(maxsize=512)
def translate(sql: str) -> str:
    """One SQLite statement of :mod:`fishim.store`/:mod:`fishim.sync` in PostgreSQL's dialect."""
    text = sql.replace("%", "%%")
    conflict = ""
    replace = re.match(r"\s*INSERT OR REPLACE INTO (\w+) \(([^)]*)\)", text)
    if replace:
        table, cols = replace.group(1), [c.strip() for c in replace.group(2).split(",")]
        keys = _PK[table]
        sets = ", ".join(f"{_quote(c)}=EXCLUDED.{_quote(c)}" for c in cols if c not in keys)
        conflict = f" ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets}"
        text = text.replace("INSERT OR REPLACE INTO", "INSERT INTO", 1)
    elif "INSERT OR IGNORE INTO" in text:
        conflict = " ON CONFLICT DO NOTHING"
        text = text.replace("INSERT OR IGNORE INTO", "INSERT INTO", 1)
    text = re.sub(r"\buser\b", '"user"', text)
    text = text.replace("IS NOT ?", "IS DISTINCT FROM ?")
    text = text.replace("syncs=syncs+1", "syncs=devices.syncs+1")
    text = text.replace("LIMIT ?", "LIMIT NULLIF(?, -1)")  # SQLite's LIMIT -1 is "no limit"
    text = text.replace("SELECT value FROM json_each(?)", "SELECT json_array_elements_text(?::json)")
    text = text.replace("+order_id", "order_id")  # a SQLite planner hint
    text = text.replace("FROM sqlite_master WHERE name=",
                        "FROM information_schema.tables WHERE table_schema=current_schema() AND table_name=")
    return text.replace("?", "%s") + conflict


def _quote(column: str) -> str:
    return '"user"' if column == "user" else column


def translate_schema(ddl: str) -> str:
    """A migration's DDL for PostgreSQL: 64-bit integers (epoch ms), BYTEA, the writer-assigned seq."""
    text = ddl.replace("seq INTEGER PRIMARY KEY AUTOINCREMENT", "seq BIGINT PRIMARY KEY")
    text = text.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
    text = re.sub(r"\bINTEGER\b", "BIGINT", text).replace("BLOB", "BYTEA")
    return re.sub(r"\buser\b", '"user"', text)


class _Empty:
    """What a PRAGMA that means nothing on PostgreSQL returns."""

    rowcount = 0

    def fetchone(self) -> None:
        return None

    def fetchall(self) -> list[Any]:
        return []

    def __iter__(self) -> Iterator[Any]:
        return iter(())


class _Inserted(_Empty):
    """A one-row INSERT's result with :class:`sqlite3.Cursor`'s ``lastrowid`` (from ``RETURNING id``)."""

    def __init__(self, cur: Any) -> None:
        row = cur.fetchone()
        self.lastrowid = int(row[0]) if row else None
        self.rowcount = cur.rowcount


class _PgConnection:
    """The subset of :class:`sqlite3.Connection` the store uses, over one psycopg connection.

    A reader reconnects when its connection broke; a writer never does (:class:`StoreFenced`).
    """

    def __init__(self, store: PgStore) -> None:
        self.store = store
        self.raw = store.open_raw()

    def execute(self, sql: str, params: Any = ()) -> Any:
        if _NO_OP.match(sql):
            return _Empty()
        if sql.strip() == "BEGIN" and self.store.readonly:
            sql = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"  # one snapshot for a sync's scan
        if self.raw.broken or self.raw.closed:
            if self.store.writer:
                self.store._fenced.set()
                raise StoreFenced("the writer's PostgreSQL session (and its lock) is gone; not writing")
            self.raw = self.store.open_raw()
        text = translate(sql)
        returning = bool(_SERIAL.match(text)) and "),(" not in text
        try:
            cur = self.raw.execute(text + " RETURNING id" if returning else text, params or None, prepare=False)
        except psycopg.OperationalError as exc:
            self._fence_if_broken(exc)
            raise
        return _Inserted(cur) if returning else cur

    def executemany(self, sql: str, seq: Any) -> Any:
        cur = self.raw.cursor()
        try:
            cur.executemany(translate(sql), list(seq))
        except psycopg.OperationalError as exc:
            self._fence_if_broken(exc)
            raise
        return cur

    def _fence_if_broken(self, exc: Exception) -> None:
        if self.store.writer and self.raw.broken:
            self.store._fenced.set()
            raise StoreFenced(f"the writer's PostgreSQL session ended ({exc}); not writing") from exc

    def close(self) -> None:
        self.raw.close()


class PgStore(Store):
    """:class:`~fishim.store.Store` on PostgreSQL. ``writer=True`` blocks until this process holds
    the writer lock (see the module docstring); ``lock_timeout`` bounds how long a dead holder's
    session can keep it (server-side TCP keepalives)."""

    def __init__(self, url: str, *, readonly: bool = False, writer: bool = False,
                 lock_timeout: float = 10.0) -> None:
        if psycopg is None:
            raise StoreError("store.url is PostgreSQL but psycopg is not installed (pip install 'fishim[postgres]')")
        self.url = url
        self.target = url
        self.label = re.sub(r"//[^@/]*@", "//", url)  # for messages and logs: never the user or password
        self.path = Path(self.label)  # no file: only so code that logs store.path still works
        self.readonly = readonly
        self.writer = writer
        self.lock_timeout = lock_timeout
        self.transient_errors = (sqlite3.OperationalError, psycopg.OperationalError)
        self.errors = (sqlite3.Error, psycopg.Error)
        self._pg = _PgConnection(self)
        self.conn = self._pg  # type: ignore[assignment]  # the sqlite3.Connection subset the store uses
        self._fenced = threading.Event()
        if writer:
            self._take_lock()
            threading.Thread(target=self._heartbeat, name="fishim-pg-lock", daemon=True).start()
        if not readonly:
            self.migrate()

    def open_raw(self) -> psycopg.Connection[Any]:
        idle = max(1, int(self.lock_timeout / 2))
        interval = max(1, int(self.lock_timeout / 6))
        try:
            raw = psycopg.connect(self.url, autocommit=True, connect_timeout=max(2, int(self.lock_timeout)),
                                  keepalives=1, keepalives_idle=idle, keepalives_interval=interval,
                                  keepalives_count=3, application_name="fishim")
        except psycopg.OperationalError as exc:
            raise StoreError(f"cannot connect to PostgreSQL {self.label}: {str(exc).strip()}") from None
        # The server notices a vanished client (power cut, cable) within ~lock_timeout and ends its
        # session, which releases the lock for the standby.
        raw.execute(f"SET tcp_keepalives_idle = {idle}")
        raw.execute(f"SET tcp_keepalives_interval = {interval}")
        raw.execute("SET tcp_keepalives_count = 3")
        if self.readonly:
            raw.execute("SET default_transaction_read_only = on")
        return raw

    # -- the writer lock ----------------------------------------------------------------------

    def lock_key(self) -> int:
        """One lock per database and schema: the shop's store."""
        name = self._pg.raw.execute("SELECT current_database() || '.' || current_schema()").fetchone()
        return zlib.crc32(f"fishim-writer:{name[0] if name else ''}".encode())

    def _take_lock(self) -> None:
        key = self.lock_key()
        held = self._pg.raw.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        if not (held and held[0]):
            log.warning("standby: another bridge holds the writer lock of %s; waiting for it", self.label)
            try:
                self._pg.raw.execute("SELECT pg_advisory_lock(%s)", (key,))
            except psycopg.OperationalError as exc:  # the server went away while we waited
                raise StoreError(f"lost PostgreSQL {self.label} while waiting for the writer lock: "
                                 f"{str(exc).strip()}") from None
        # A holder that stops talking (hung, stopped, cut off) loses its session, hence the lock, after
        # lock_timeout; the heartbeat keeps a live but idle holder's session open.
        timeout_ms = int(self.lock_timeout * 1000)
        self._pg.raw.execute(f"SET idle_session_timeout = {timeout_ms}")
        self._pg.raw.execute(f"SET idle_in_transaction_session_timeout = {timeout_ms}")
        log.info("writer lock acquired store=%s key=%d", self.label, key)

    def _heartbeat(self) -> None:
        """Every lock_timeout/4, a statement on the lock session; the first failure fences this store."""
        raw = self._pg.raw
        while not self._fenced.wait(self.lock_timeout / 4):
            if raw.closed:
                return  # closed by us
            try:
                raw.execute("SELECT 1")
            except psycopg.Error as exc:
                if raw.broken:  # the session is gone, and the lock with it
                    log.error("writer lock lost store=%s error=%s; this process must not write again",
                              self.label, str(exc).strip())
                    self._fenced.set()
                elif raw.closed:
                    return

    def lost_lock(self) -> bool:
        return self._fenced.is_set()

    def close(self) -> None:
        self._fenced.set()  # stops the heartbeat; a closed writer writes no more either
        self.conn.close()

    def holds_lock(self) -> bool:
        """True while this store's session still holds the writer lock."""
        if self._pg.raw.broken or self._pg.raw.closed:
            return False
        row = self._pg.raw.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype='advisory' AND pid=pg_backend_pid() AND granted"
            " AND ((classid::bigint << 32) | objid::bigint) = %s", (self.lock_key(),)).fetchone()
        return bool(row and row[0])

    # -- schema -------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the database up to :data:`SCHEMA_VERSION`; concurrent starters wait on a lock."""
        raw = self._pg.raw
        with raw.transaction():
            raw.execute("SELECT pg_advisory_xact_lock(%s)", (self.lock_key() ^ 1,))
            raw.execute("CREATE TABLE IF NOT EXISTS fishim_schema (version BIGINT NOT NULL)")
            row = raw.execute("SELECT version FROM fishim_schema").fetchone()
            if row is None:
                raw.execute("INSERT INTO fishim_schema VALUES (0)")
            version = int(row[0]) if row else 0
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in translate_schema(MIGRATIONS[target]).split(";"):
                    if statement.strip():
                        raw.execute(statement)
                raw.execute("UPDATE fishim_schema SET version=%s", (target,))
                log.info("store migrated url=%s version=%d", self.label, target)

    @property
    def schema_version(self) -> int:
        row = self.conn.execute("SELECT version FROM fishim_schema").fetchone()
        return int(row[0]) if row else 0

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        """BEGIN … COMMIT on this store's session (the lock holder's, for a writer)."""
        self.conn.execute("BEGIN")
        try:
            yield self.conn
        except BaseException:
            if not (self._pg.raw.broken or self._pg.raw.closed):
                self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- what differs in substance ------------------------------------------------------------

    def insert_event(self, event: NewEvent, order_seq: int, received_at: int | None = None) -> int | None:
        row = self.conn.execute(
            "INSERT INTO events (seq, id, order_id, order_seq, channel, topic, sender, ts, received_at, retain,"
            " payload) VALUES ((SELECT coalesce(max(seq), 0) + 1 FROM events),?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (id) DO NOTHING RETURNING seq",
            (event.id, event.order_id, order_seq, event.channel, event.topic, event.sender, event.ts,
             received_at or now_ms(), int(event.retain), event.payload)).fetchone()
        return int(row[0]) if row else None

    def next_seq(self) -> int:
        return self.max_seq() + 1

    def file_bytes(self) -> int:
        row = self.conn.execute("SELECT pg_database_size(current_database())").fetchone()
        return int(row[0]) if row else 0
