"""Ingest: the one pipeline every order-tree message goes through before anyone may see it.

topic -> payload model -> sender bound to the login -> duplicate check by envelope ``id`` -> order
rules -> rows, for a whole batch in ONE transaction (group commit). :class:`Writer` is that batch
processor, and the store's single writer. Two callers drive it:

- the embedded broker (:mod:`fishim.broker.ingest`): a writer thread in the broker process; after
  COMMIT the broker routes what was stored (stamped with ``seq``/``order_seq``) and only then PUBACKs
  the publisher, so nothing is acknowledged before it is durable and nothing refused is ever seen;
- the bridge (:mod:`fishim.bridge`) behind Mosquitto/EMQX, over MQTT: it PUBACKs after COMMIT.

Everything a commit changes comes back as a :class:`Work`: one :class:`Result` per input, in input
order, and the membership changes the ACL must take before the next delivery.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from fishim import orders
from fishim.config import Config
from fishim.logs import mask
from fishim.messages import (
    ErrorCode,
    ErrorMessage,
    Message,
    Receipt,
    Rejected,
    Status,
    decode,
    near_misses,
    peek_identity,
)
from fishim.store import DeadLetter, EventRow, OrderRow, Store, now_ms
from fishim.topics import ORDER_CHANNELS, Channel, TopicError, TopicRef, Topics, is_name, matches

log = logging.getLogger("fishim.ingest")

CACHE_LIMIT = 50_000  # projection/receipt/topic cache entries; a small shop never gets near it
ROLE_TTL_S = 5.0  # a new or removed user takes effect within this long
INTERNAL_ERROR = "internal"  # dead-letter code for a message the writer itself failed on
_STAMP_KEYS = ("seq", "order_seq")


class Kind(StrEnum):
    """What one input came to."""

    STORED = "stored"  # committed; route it (stamped)
    DUPLICATE = "duplicate"  # its id is already stored: acknowledge, never route again
    REFUSED = "refused"  # dead-lettered; the sender is told on its errors topic
    SYNC = "sync"  # a sync request: serve it now that everything before it is committed
    CLEARED = "cleared"  # an empty payload on a retained channel (someone cleared the slot)
    IGNORED = "ignored"  # not a fishim topic at all


@dataclass(slots=True)
class Inbound:
    """One publish handed to the writer.

    ``user``: the authenticated publisher whose name the envelope ``sender`` must carry (None: not
    bound, e.g. behind Mosquitto, the service account, anonymous loopback). ``refusal``: refused
    before ingest (ACL, size): only its dead letter and error are written. ``quiet``: no error
    message (the caller already answered). ``tag``: the caller's own handle (a future, a paho mid).
    ``role``: the login's role, which the order rules use for ``user`` (a tracking link or an API key
    has no account row to look it up in).
    """

    topic: str
    payload: bytes
    user: str | None = None
    refusal: Rejected | None = None
    quiet: bool = False
    tag: Any = None
    role: str | None = None  # the login's role, as the authenticator said (tracking links, API keys)


@dataclass(slots=True)
class Committed:
    """One stored event, as routed and as handed to hooks. ``payload`` carries the server stamps."""

    topic: str
    ref: TopicRef
    msg: Message
    payload: bytes
    seq: int
    order_seq: int
    order: OrderRow


@dataclass(slots=True)
class Result:
    """The fate of one :class:`Inbound`; ``events`` is the stored event then its automatic follow-ups."""

    kind: Kind
    ref: TopicRef | None = None
    ident: str | None = None
    events: list[Committed] = field(default_factory=list)
    error_to: str | None = None  # who is told (None: nobody to tell, or the caller answers itself)
    error: ErrorMessage | None = None

    @property
    def error_payload(self) -> bytes:
        return self.error.model_dump_json(exclude_none=True).encode() if self.error else b""


class Verdict(BaseModel):
    """What one submission came to, for callers outside MQTT (the HTTP API)."""

    outcome: Literal["stored", "duplicate", "refused", "not_committed"]
    seq: int | None = None
    order_seq: int | None = None
    payload: bytes | None = None  # the stored event as routed, with the server stamps
    error: ErrorMessage | None = None

    @classmethod
    def of(cls, result: Result | None) -> Verdict:
        if result is None:
            return cls(outcome="not_committed")
        if result.kind is Kind.STORED and result.events:
            first = result.events[0]
            return cls(outcome="stored", seq=first.seq, order_seq=first.order_seq, payload=first.payload)
        if result.kind is Kind.DUPLICATE:
            return cls(outcome="duplicate")
        error = result.error or ErrorMessage(topic="", error=ErrorCode.UNKNOWN_TOPIC, detail="not an order event")
        return cls(outcome="refused", error=error)


class IngestHook(Protocol):
    """Extra rows written in the same transaction as the events (webhook outbox, alert state).

    ``in_transaction`` runs on the writer thread inside the transaction. If the hook also has
    ``after_commit(committed)``, the embedded broker calls it on its loop once the batch is
    committed and routed (the bridge calls it on its writer thread after COMMIT).
    """

    def in_transaction(self, store: Store, committed: Sequence[Committed]) -> None: ...


@dataclass
class Work:
    """Everything one batch changes: rows for the transaction, then what to do after COMMIT."""

    now: int
    next_seq: int
    results: list[Result] = field(default_factory=list)
    known: set[str] = field(default_factory=set)  # envelope ids already in SQLite
    ids: dict[str, str] = field(default_factory=dict)  # id -> order of events stored in this batch
    events: list[EventRow] = field(default_factory=list)
    committed: list[Committed] = field(default_factory=list)
    drafts: dict[str, OrderRow] = field(default_factory=dict)  # the batch's working copy of each order used
    orders: dict[str, OrderRow] = field(default_factory=dict)  # the drafts an accepted event changed
    retained: dict[str, tuple[str, int, bytes]] = field(default_factory=dict)  # topic -> (id, seq, payload)
    receipts: dict[tuple[str, str], int] = field(default_factory=dict)
    deadletters: list[DeadLetter] = field(default_factory=list)
    membership: dict[str, OrderRow] = field(default_factory=dict)

    @property
    def stored(self) -> int:
        return len(self.events)

    def count(self, kind: Kind) -> int:
        return sum(1 for r in self.results if r.kind is kind)


class _Directory:
    """:class:`fishim.orders.Directory` over the writer's caches, the open batch and the store.

    Lives on the writer thread only. Roles are cached for :data:`ROLE_TTL_S` so a busy sender costs
    no query per message; receipts are cached because the writer is their only writer.
    """

    def __init__(self, store: Store, service_user: str) -> None:
        self.store = store
        self.service_user = service_user
        self.work: Work | None = None
        self.receipts: dict[tuple[str, str], int | None] = {}
        self._roles: dict[str, tuple[str | None, float]] = {}

    def learn(self, user: str, role: str) -> None:
        """The authenticator's word on ``user``'s role (it may have no account row at all)."""
        bounded(self._roles)
        self._roles[user] = (role, time.monotonic() + ROLE_TTL_S)

    def role_of(self, user: str) -> str | None:
        if user == self.service_user:
            return "service"
        now = time.monotonic()
        hit = self._roles.get(user)
        if hit is not None and hit[1] > now:
            return hit[0]
        row = self.store.get_user(user)
        role = row.role if row else None
        bounded(self._roles)
        self._roles[user] = (role, now + ROLE_TTL_S)
        return role

    def event_in_order(self, order_id: str, event_id: str) -> bool:
        if self.work is not None and event_id in self.work.ids:
            return self.work.ids[event_id] == order_id
        return self.store.event_in_order(order_id, event_id)

    def receipt(self, order_id: str, member: str) -> int | None:
        key = (order_id, member)
        if self.work is not None and key in self.work.receipts:
            return self.work.receipts[key]
        if key not in self.receipts:
            bounded(self.receipts)
            self.receipts[key] = self.store.get_receipt(order_id, member)
        return self.receipts[key]


def bounded(cache: dict[Any, Any]) -> None:
    """Forget everything once a cache is full: entries reload from SQLite on the next miss."""
    if len(cache) >= CACHE_LIMIT:
        cache.clear()


def stamp(text: str, msg: Message, seq: int, order_seq: int) -> str:
    """``text`` with the server's ``seq`` and ``order_seq`` first; a client's own values are replaced.

    Spliced after the opening brace (the payload is a validated JSON object), so the common case
    costs one string join; only a payload that carried its own stamps is re-serialised.
    """
    extra = msg.model_extra
    if extra and any(key in extra for key in _STAMP_KEYS):
        data = json.loads(text)
        for key in _STAMP_KEYS:
            data.pop(key, None)
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    brace = text.index("{") + 1
    return f'{text[:brace]}"seq":{seq},"order_seq":{order_seq},{text[brace:]}'


@dataclass(slots=True)
class _Decoded:
    ref: TopicRef | None  # None: a topic outside fishim's tree
    msg: Message | None  # None: a sync request or an empty retained payload
    text: str = ""


@dataclass(slots=True)
class _Bad:
    ref: TopicRef | None
    error: Rejected


class Writer:
    """Group commits of order-tree messages: validate, apply the rules, store, in one transaction.

    Not thread-safe: one thread owns it. ``hooks`` add their rows to each transaction.
    """

    def __init__(self, store: Store, config: Config, service_user: str,
                 hooks: Iterable[IngestHook] = ()) -> None:
        self.store = store
        self.config = config
        self.topics = Topics(config.prefix)
        self.service_user = service_user
        self.hooks = list(hooks)
        self.directory = _Directory(store, service_user)
        self._orders: dict[str, OrderRow | None] = {}
        self._refs: dict[str, TopicRef] = {}  # parsed topics: the same few repeat all day
        self._next_seq = store.next_seq()
        self._subscribed = (self.topics.all_orders, self.topics.all_sync_requests)

    # -- the batch ------------------------------------------------------------------------------

    def flush(self, batch: list[Inbound], stopping: threading.Event) -> list[tuple[list[Inbound], Work]]:
        """Commit ``batch``, retrying while SQLite is unavailable; the commits made, in order.

        A transient SQLite error (busy, disk full) retries with backoff until ``stopping`` is set
        (then nothing is committed: nothing acknowledged, so the publishers send again). Any other
        failure is a bug or a poison message: the batch is split so one message cannot hold up the
        rest, and a single message that still fails is dead-lettered as ``internal``.
        """
        backoff = 0.1
        while True:
            try:
                return [(batch, self.commit(batch))]
            except sqlite3.OperationalError as exc:
                self.forget()
                log.error("commit failed error=%s messages=%d retry_in=%.1fs", exc, len(batch), backoff)
                if stopping.wait(backoff):
                    return []
                backoff = min(backoff * 2, 5.0)
            except Exception:
                self.forget()
                if len(batch) > 1:
                    log.exception("batch failed messages=%d; retrying one by one", len(batch))
                    return [done for one in batch for done in self.flush([one], stopping)]
                log.exception("message failed topic=%s", mask(batch[0].topic))
                try:
                    return [(batch, self._quarantine(batch[0]))]
                except sqlite3.Error as exc:
                    log.error("dead letter failed topic=%s error=%s (left unacknowledged)", mask(batch[0].topic), exc)
                    return []

    def commit(self, batch: list[Inbound]) -> Work:
        """One transaction for ``batch``; raises (after ROLLBACK) if SQLite fails."""
        if not self._next_seq:
            self._next_seq = self.store.next_seq()
        work = Work(now=now_ms(), next_seq=self._next_seq)
        decoded = [self._decode(m) for m in batch]
        ids = [d.msg.id for d in decoded if isinstance(d, _Decoded) and d.msg is not None]
        self.directory.work = work
        for m in batch:
            if m.user is not None and m.role is not None:
                self.directory.learn(m.user, m.role)
        with self.store.transaction():
            work.known = self.store.existing_ids(ids) if ids else set()
            for m, d in zip(batch, decoded, strict=True):
                work.results.append(self._process(m, d, work))
            self._write(work)
            for hook in self.hooks:
                if work.committed:
                    hook.in_transaction(self.store, work.committed)
        self.directory.work = None
        self._next_seq = work.next_seq
        self._orders.update(work.orders)
        self.directory.receipts.update(work.receipts)
        return work

    def forget(self) -> None:
        """After a rollback, cached projections may be ahead of SQLite: reload them on demand."""
        self._orders.clear()
        self.directory.receipts.clear()
        self.directory.work = None
        self._next_seq = 0  # re-read from SQLite by the next commit

    def deadletter_only(self, letters: list[DeadLetter]) -> None:
        """Record refusals that never reach a batch (a refused sync request) in their own commit."""
        with self.store.transaction():
            for letter in letters:
                self.store.add_deadletter(letter)

    # -- one message ----------------------------------------------------------------------------

    def _decode(self, m: Inbound) -> _Decoded | _Bad:
        """Topic and payload checks that need no database (done before the transaction opens)."""
        ref = self._refs.get(m.topic)
        if ref is None:
            try:
                ref = self.topics.parse(m.topic)
            except TopicError as exc:
                if m.refusal is None and not any(matches(m.topic, f) for f in self._subscribed):
                    return _Decoded(None, None)  # not ours (a broker leaking retained messages): skip
                return _Bad(None, m.refusal or Rejected(ErrorCode.UNKNOWN_TOPIC, str(exc)))
            bounded(self._refs)
            self._refs[m.topic] = ref
        if m.refusal is not None:
            return _Bad(ref, m.refusal)
        if ref.channel not in ORDER_CHANNELS:
            return _Decoded(ref, None)  # a sync request (fishim.sync validates it) or something else
        try:
            if not m.payload and ref.retained:
                return _Decoded(ref, None)  # someone cleared a retained topic
            msg = decode(ref, m.payload, self.config.limits.max_payload)
            return _Decoded(ref, msg, m.payload.decode("utf-8"))
        except Rejected as exc:
            return _Bad(ref, exc)
        except UnicodeDecodeError:
            return _Bad(ref, Rejected(ErrorCode.BAD_JSON, "payload is not UTF-8"))

    def _process(self, m: Inbound, d: _Decoded | _Bad, work: Work) -> Result:
        if isinstance(d, _Bad):
            return self._reject(m, d.ref, d.error, work)
        ref, msg = d.ref, d.msg
        if ref is None:
            return Result(Kind.IGNORED)
        if msg is None:
            if ref.channel is Channel.SYNC_REQUEST:
                return Result(Kind.SYNC, ref)
            if ref.retained:
                return Result(Kind.CLEARED, ref)
            return Result(Kind.IGNORED, ref)
        if m.user is not None and msg.sender != m.user:
            return self._reject(m, ref, Rejected(ErrorCode.SENDER_MISMATCH, (
                f"envelope sender {msg.sender!r} is not the logged-in user {m.user!r}")), work, msg.id)
        if msg.id in work.known or msg.id in work.ids:
            return Result(Kind.DUPLICATE, ref, msg.id)
        order = self._order(ref.order or "", work)
        try:
            outcome = orders.apply(order, ref, msg, work.next_seq, work.now, self.directory, self.service_user,
                                   in_place=True)
        except Rejected as exc:
            return self._reject(m, ref, exc, work, msg.id, msg.sender)
        result = Result(Kind.STORED, ref, msg.id)
        result.events.append(self._accept(ref, m.topic, msg, d.text, outcome, work))
        if msg.model_extra:
            self._warn(m, msg, result, work.now)
        for follow in outcome.follow_ups:
            done = self._follow_up(follow, outcome.order.id, work)
            if done is not None:
                result.events.append(done)
        return result

    @staticmethod
    def _warn(m: Inbound, msg: Message, result: Result, now: int) -> None:
        """Stored, but a field looks misspelt: tell the sender (``unknown_field``), one message for all."""
        misses = near_misses(msg)
        if misses and not m.quiet:
            result.error_to = m.user or msg.sender
            result.error = ErrorMessage(topic=m.topic, id=msg.id, error=ErrorCode.UNKNOWN_FIELD, ts=now,
                                        detail="; ".join(miss.rejected().detail for miss in misses))

    def _follow_up(self, follow: Status, order_id: str, work: Work) -> Committed | None:
        """An automatic status (``picking``/``packed``) from the service account, stored in this batch."""
        ref = TopicRef(channel=Channel.STATUS, order=order_id)
        try:
            outcome = orders.apply(work.drafts[order_id], ref, follow, work.next_seq, work.now,
                                   self.directory, self.service_user, in_place=True)
        except Rejected as exc:
            log.error("follow-up refused order=%s state=%s error=%s", order_id, follow.state.value, exc)
            return None
        return self._accept(ref, self.topics.status(order_id), follow, follow.model_dump_json(exclude_none=True),
                            outcome, work)

    def _accept(self, ref: TopicRef, topic: str, msg: Message, text: str, outcome: orders.Outcome,
                work: Work) -> Committed:
        seq = work.next_seq  # orders.apply gave the order this last_seq
        work.next_seq += 1
        order = outcome.order
        work.orders[order.id] = work.drafts[order.id] = order
        work.ids[msg.id] = order.id
        stamped = stamp(text, msg, seq, order.order_seq)
        payload = stamped.encode()
        work.events.append(EventRow(seq, msg.id, order.id, order.order_seq, ref.channel.value, topic,
                                    msg.sender, msg.ts, work.now, int(ref.retained), stamped))
        if ref.retained:
            work.retained[topic] = (msg.id, seq, payload)
        if isinstance(msg, Receipt):
            work.receipts[(order.id, ref.leaf or msg.sender)] = msg.read_up_to
        if outcome.membership_changed:
            work.membership[order.id] = order
        committed = Committed(topic, ref, msg, payload, seq, order.order_seq, order.model_copy())
        work.committed.append(committed)
        return committed

    def _reject(self, m: Inbound, ref: TopicRef | None, error: Rejected, work: Work,
                ident: str | None = None, sender: str | None = None) -> Result:
        """Dead letter (in the batch), an error for the publisher, one log line."""
        if ident is None and sender is None:
            ident, sender = peek_identity(m.payload)
        user = m.user or ((ref.leaf or ref.user) if ref is not None else None)  # names in a topic are checked
        if user is None and sender is not None and is_name(sender):
            user = sender
        work.deadletters.append(self.dead_letter(work.now, m.topic, m.payload, user, ident, error.code.value,
                                                 error.detail))
        log.warning("rejected topic=%s user=%s id=%s error=%s detail=%s", mask(m.topic), user,
                    mask(ident) if ident else None, error.code.value, mask(error.detail))
        result = Result(Kind.REFUSED, ref, ident, error_to=None if m.quiet else user,
                        error=ErrorMessage(topic=m.topic, id=ident, error=error.code, detail=error.detail,
                                           ts=work.now))
        return result

    def dead_letter(self, now: int, topic: str, payload: bytes, user: str | None, ident: str | None,
                    error: str, detail: str) -> DeadLetter:
        """A dead-letter row; the payload is kept up to ``limits.max_payload`` bytes."""
        return DeadLetter(received_at=now, topic=topic, user=user, msg_id=ident, error=error, detail=detail,
                          payload=payload[:self.config.limits.max_payload])

    def _order(self, order_id: str, work: Work) -> OrderRow | None:
        """The batch's working copy of the order, made on first use: the rules update it in place,
        so it always holds the batch's latest state, and the cache is untouched until COMMIT."""
        draft = work.drafts.get(order_id)
        if draft is not None:
            return draft
        if order_id not in self._orders:
            bounded(self._orders)
            self._orders[order_id] = self.store.get_order(order_id)
        cached = self._orders[order_id]
        if cached is None:
            return None
        draft = work.drafts[order_id] = orders.working_copy(cached)
        return draft

    def _write(self, work: Work) -> None:
        """The batch's rows, a few multi-row INSERTs per table: events, touched orders, retained, receipts."""
        store = self.store
        store.insert_events(work.events)
        store.put_orders(work.orders.values())
        store.put_retained_rows((topic, payload, 1, seq) for topic, (_ident, seq, payload) in work.retained.items())
        store.put_receipts((order_id, member, value) for (order_id, member), value in work.receipts.items())
        for letter in work.deadletters:
            store.add_deadletter(letter)

    def _quarantine(self, m: Inbound) -> Work:
        """A message the writer itself cannot process: dead-letter it so traffic goes on."""
        ident, sender = peek_identity(m.payload)
        user = m.user or (sender if sender and is_name(sender) else None)
        work = Work(now=now_ms(), next_seq=self._next_seq)
        work.deadletters.append(self.dead_letter(work.now, m.topic, m.payload, user, ident, INTERNAL_ERROR,
                                                 "fishim failed on this message; see its log"))
        with self.store.transaction():
            self.store.add_deadletter(work.deadletters[0])
        work.results.append(Result(Kind.REFUSED, None, ident))
        return work


def set_synchronous(store: Store, setting: str) -> None:
    """Apply ``store.synchronous`` to the writer's connection (see the README for what each survives)."""
    store.conn.execute(f"PRAGMA synchronous={setting}")
