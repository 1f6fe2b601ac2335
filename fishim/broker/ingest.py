"""The embedded broker's durable ingest: a writer thread doing group commits for the event loop.

Why a thread in the broker process and not the bridge as a child process (measured in
BENCHMARKS.md, "durable ingest"): the child process needed the message to be routed to it, parsed
again by paho, and its PUBACK routed back before the publisher could be acknowledged; in-process the
loop hands the raw bytes over a queue and gets the committed batch back in one callback. The GIL is
shared, but SQLite releases it during the commit and its fsync, which is where a durable write
spends its time.

Flow: the loop calls :meth:`BrokerIngest.submit` (never blocks); the thread takes whatever is queued
(up to ``bridge.batch_max``), commits it with
:class:`fishim.ingest.Writer`, and hands ``(batch, work)`` back to the loop with
``call_soon_threadsafe``, in commit order. The loop then routes, stores retained values and resolves
each submission's future, which is when the publisher's PUBACK goes out.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fishim.config import Config
from fishim.ingest import Committed, Inbound, IngestHook, Work, Writer, set_synchronous
from fishim.store import DeadLetter, RetainedRow, Store

log = logging.getLogger("fishim.broker")

_STOP = object()
SWITCH_INTERVAL_S = 0.0005
Done = Callable[[list[Inbound], Work], None]


class BrokerIngest:
    """The store's single writer inside ``fishim up``: opened (and migrated) before any client is let in."""

    def __init__(self, config: Config, *, hooks: Iterable[IngestHook] = ()) -> None:
        self.config = config
        self.hooks = list(hooks)
        self.service_user = config.bridge.username
        self._writer: Writer | None = None
        self.committed = 0  # batches committed (tests and stats read it)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._open = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: Done | None = None
        self._thread = threading.Thread(target=self._run, name="fishim-ingest", daemon=True)

    def open(self) -> list[RetainedRow]:
        """Open (create, migrate) the store; every stored retained value, for the broker to hold
        before it accepts anyone. Called once the listeners are bound, so a taken port costs no I/O."""
        Path(self.config.store.path).parent.mkdir(parents=True, exist_ok=True)
        store = Store(self.config.store.path)
        set_synchronous(store, self.config.store.synchronous)
        self._writer = Writer(store, self.config, self.service_user, self.hooks)
        return store.retained()

    @property
    def writer(self) -> Writer:
        if self._writer is None:
            raise RuntimeError("ingest not opened")
        return self._writer

    def start(self, loop: asyncio.AbstractEventLoop, done: Done) -> None:
        """Start committing; ``done(batch, work)`` is called on ``loop`` after each COMMIT, in order."""
        self._loop, self._done = loop, done
        # Two threads hand every message to each other (loop -> writer -> loop). With CPython's
        # default 5 ms GIL switch interval a busy thread keeps the other waiting up to 5 ms per
        # handover; 0.5 ms keeps a message's way through fishim near the commit's own cost.
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread.start()
        log.info("ingest_started db=%s synchronous=%s next_seq=%d", self.writer.store.path,
                 self.config.store.synchronous, self.writer.store.next_seq())

    def after_commit(self, committed: list[Committed]) -> None:
        """The hooks' ``after_commit`` (on the loop, after routing); a failing hook is logged, never fatal."""
        for hook in self.hooks:
            after = getattr(hook, "after_commit", None)
            if after is None:
                continue
            try:
                after(committed)
            except Exception:
                log.exception("after_commit hook failed hook=%s", type(hook).__name__)

    @property
    def accepting(self) -> bool:
        return self._open

    def submit(self, inbound: Inbound) -> bool:
        """Queue one message (thread-safe, never blocks); False once :meth:`stop` has begun."""
        if not self._open:
            return False
        self._queue.put(inbound)
        return True

    def record(self, letters: list[DeadLetter]) -> None:
        """Dead letters that belong to no publish (a refused sync request): written by this thread."""
        if self._open:
            self._queue.put(letters)

    def stop(self, timeout: float = 15.0) -> None:
        """Take nothing new, commit everything already queued, then stop the thread (blocking)."""
        self._open = False
        self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():  # a commit stuck on a locked store: give up on it
                self._stopping.set()
                self._thread.join(timeout)
        if self._writer is not None:
            self._writer.store.close()
        log.info("ingest_stopped batches=%d", self.committed)

    # -- the writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                if batch:
                    self._commit(batch)
        except BaseException:
            log.exception("ingest writer died; fishim up stops")
            self._open = False
            raise

    def _next_batch(self) -> list[Inbound] | None:
        """What arrived together, up to ``batch_max``. None: stop.

        No fixed wait for company (the bridge's ``batch_wait_ms``): publishers here wait for their
        PUBACK, so a timer would only add to every message's latency. Batches form on their own
        from what arrives while the previous one commits; one yield of the GIL lets the loop hand
        over what it has already read before the batch closes.
        """
        item = self._queue.get()
        if item is _STOP:
            return None
        if isinstance(item, list):
            self.writer.deadletter_only(item)
            return []
        batch: list[Inbound] = [item]
        batch_max = self.config.bridge.batch_max
        yielded = False
        while len(batch) < batch_max:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                if yielded:
                    break
                time.sleep(0)  # let the event loop run: it may be holding the next messages
                yielded = True
                continue
            if not isinstance(nxt, Inbound):
                self._queue.put(nxt)  # a stop or dead letters: after this batch (order kept for stop)
                break
            batch.append(nxt)
        return batch

    def _commit(self, batch: list[Inbound]) -> None:
        done = self.writer.flush(batch, self._stopping)
        committed = {id(m) for part, _work in done for m in part}
        lost = [m for m in batch if id(m) not in committed]
        assert self._loop is not None and self._done is not None
        for part, work in done:
            self.committed += 1
            self._loop.call_soon_threadsafe(self._done, part, work)
        if lost:  # only when stopping with the store unavailable: never acknowledged, sent again
            self._loop.call_soon_threadsafe(self._done, lost, Work(now=0, next_seq=0))


class SyncWorker:
    """Serves sync requests in the broker process, off the event loop, in the order they committed.

    One worker thread with its own read connections (:class:`fishim.sync.SyncServer`): a long replay
    never holds up the loop or the writer. Refused requests are dead-lettered through the ingest.
    """

    def __init__(self, config: Config, ingest: BrokerIngest) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from fishim.sync import SyncServer

        self.ingest = ingest
        self.server = SyncServer(Path(config.store.path), config, on_reject=self._refused)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fishim-sync")

    async def answer(self, ref: Any, payload: bytes) -> list[tuple[str, bytes]]:
        """The pages (or one error message) to publish for one committed request."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.server.handle, ref, payload)

    def _refused(self, ref: Any, payload: bytes, error: Any) -> None:
        from fishim.messages import peek_identity
        from fishim.store import now_ms

        ident, _sender = peek_identity(payload)
        topic = self.ingest.writer.topics.sync_request(ref.user or "-", ref.client_id or "-")
        self.ingest.record([self.ingest.writer.dead_letter(now_ms(), topic, payload, ref.user, ident,
                                                           error.code.value, error.detail)])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.server.close()
