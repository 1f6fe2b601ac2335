"""Authorization: who may publish, subscribe and receive which topic (the broker's ``Authorizer``).

One policy table per role, written out as topic templates; order membership (customer, rider) from
the store, kept current by the ingest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from fishim.auth.accounts import Principal, Role, StoreReader
from fishim.config import Config
from fishim.logs import kv
from fishim.topics import is_name

log = logging.getLogger("fishim.auth")


# -- authorization ---------------------------------------------------------------------------------
# Topic templates, relative to the prefix, one tuple of levels each. Placeholders: "<any>" is any
# valid name, "<self>" the principal's username, "<member>" an order the principal is a member of
# (its customer or rider), "#" everything below. A topic is allowed if some template matches it; a
# subscription filter is allowed if some template could match a topic the filter matches.

Template = tuple[str, ...]

_ORDER_LEAVES = ("status", "location", "picks")
_READ_OWN: tuple[Template, ...] = (("sync", "<self>", "<any>", "events"), ("errors", "<self>"),
                                   ("notify", "<self>"))
# Presence of the other side of an open order (a customer's rider, a rider's customers): "<contact>".
_CONTACTS: tuple[Template, ...] = (("presence", "<contact>"),)
_WRITE_OWN: tuple[Template, ...] = (("sync", "<self>", "<any>", "request"),)
_EVERYTHING: tuple[Template, ...] = (("#",),)


def _order_read(order: str) -> tuple[Template, ...]:
    return (*(("orders", order, ch) for ch in _ORDER_LEAVES),
            ("orders", order, "chat", "<any>"), ("orders", order, "receipts", "<any>"))


def _order_write(order: str, *channels: str) -> tuple[Template, ...]:
    return tuple(("orders", order, ch, "<self>") if ch in ("chat", "receipts") else ("orders", order, ch)
                 for ch in channels)


_STAFF_WRITE = _order_write("<any>", "status", "location", "picks", "chat", "receipts") + _WRITE_OWN
# Only fishim itself (the service account, or the broker on its own behalf) writes what people read
# as fishim's word, whatever an account's role templates say. The anonymous loopback principal
# (no accounts yet) is exempt: a bridge run beside `fishim broker` without credentials is anonymous
# too, and every local client is equally trusted until the first account exists.
_FISHIM_ONLY = frozenset(("errors", "presence", "notify", "system"))  # first levels; and sync replies

# role -> (read templates, write templates). Role None is the anonymous loopback principal.
POLICY: dict[str | None, tuple[tuple[Template, ...], tuple[Template, ...]]] = {
    None: (_EVERYTHING, _EVERYTHING),
    Role.SERVICE: (_EVERYTHING, _EVERYTHING),
    Role.OWNER: (_EVERYTHING, _STAFF_WRITE),
    Role.STAFF: (_order_read("<any>") + _READ_OWN + (("presence", "<any>"),), _STAFF_WRITE),
    Role.RIDER: (_order_read("<member>") + _READ_OWN + _CONTACTS,
                 _order_write("<member>", "status", "location", "chat", "receipts") + _WRITE_OWN),
    Role.CUSTOMER: (_order_read("<member>") + _READ_OWN + _CONTACTS,
                    _order_write("<member>", "chat", "receipts") + _WRITE_OWN),
    # Scanners are warehouse devices, not order members: picks on any order (the bridge gates picks
    # on the order's state and items), nothing to read but their own sync replies and errors.
    Role.SCANNER: (_READ_OWN, _order_write("<any>", "picks") + _WRITE_OWN),
}


TemplateIndex = dict[tuple[str, int] | None, tuple[Template, ...]]


def _index(templates: tuple[Template, ...]) -> TemplateIndex:
    """Templates by (first level, depth); ``None`` holds the ``#`` ones, which match any depth."""
    index: dict[tuple[str, int] | None, list[Template]] = {}
    for t in templates:
        index.setdefault(None if "#" in t else (t[0], len(t)), []).append(t)
    return {key: tuple(group) for key, group in index.items()}


_INDEX = {role: (_index(read), _index(write)) for role, (read, write) in POLICY.items()}
_NO_INDEX: tuple[TemplateIndex, TemplateIndex] = ({}, {})


class OrderAcl:
    """Who may publish, subscribe and receive what (the broker's ``Authorizer``); see :data:`POLICY`.

    Riders and customers read only orders they are members of. Membership lives in an in-memory
    cache (order -> customer, rider), filled from the store on a miss and replaced at once by
    :meth:`set_members` when the ingest commits a change, so a reassigned rider stops receiving
    from the very batch that reassigned it.
    ``may_receive`` runs on every delivery: it is string compares and a dict lookup once warm.
    """

    MAX_CACHED = 50_000
    UNKNOWN_TTL_S = 2.0  # an order not in the store yet is looked up again after this long
    STALE_AFTER_S = 1.0  # without an ingest feeding changes, a cached membership is re-read after this

    def __init__(self, store_path: Path | str, config: Config,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._prefix = tuple(config.prefix.split("/"))
        self._head = config.prefix + "/"
        self._reader = StoreReader(store_path)
        self._members: dict[str, tuple[str | None, str | None]] = {}
        self._unknown: dict[str, float] = {}
        self._loaded: dict[str, float] = {}  # order -> re-read after (only while not fed)
        self.fed = False  # True once the ingest announces changes: the cache is then authoritative

    def close(self) -> None:
        self._reader.close()

    # -- the Authorizer protocol ---------------------------------------------------------------

    def may_publish(self, principal: Principal, topic: str) -> bool:
        if not topic or "+" in topic or "#" in topic:
            return False
        if principal.role not in (Role.SERVICE, None) and self._fishim_only(topic):
            return False
        return self._topic_allowed(principal, topic, write=True)

    def _fishim_only(self, topic: str) -> bool:
        """``errors/…``, ``presence/…``, ``notify/…``, ``system/…`` and sync replies: fishim's voice.

        No account but the service account may publish there, so no one can make a message on
        ``errors/{user}`` reach another user as if fishim had said it."""
        if not topic.startswith(self._head):
            return False
        levels = topic[len(self._head):].split("/")
        return levels[0] in _FISHIM_ONLY or (levels[0] == "sync" and levels[-1] == "events")

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        """Allowed if the principal could read SOME topic the filter matches; what is delivered is
        then filtered topic by topic through :meth:`may_receive`."""
        levels = topic_filter.split("/")
        if not _valid_filter(levels):
            return False
        return self._allowed(principal, levels, _policy(principal)[0], subscribing=True)

    def may_receive(self, principal: Principal, topic: str) -> bool:
        return self._topic_allowed(principal, topic, write=False)

    # -- membership ----------------------------------------------------------------------------

    def set_members(self, order: str, customer: str | None, rider: str | None) -> None:
        """A membership change the ingest just committed; takes effect for the very next delivery.

        In ``fishim up`` every change arrives here, before the batch that made it is routed, so the
        cache is never stale. Without an ingest (``fishim broker`` with a separate bridge) nothing
        calls this and entries are re-read from the store after :data:`STALE_AFTER_S`.
        """
        with self._reader.lock:
            self.fed = True
            self._remember(order, (customer, rider))
        log.debug("membership %s", kv(order=order, customer=customer, rider=rider))

    def members(self, order: str) -> tuple[str | None, str | None] | None:
        """(customer, rider) of ``order``, or None if the order is unknown."""
        hit = self._members.get(order)
        if hit is not None and (self.fed or self._loaded.get(order, 0.0) > self.clock()):
            return hit
        with self._reader.lock:
            return self._load(order)

    def contacts(self, principal: Principal, other: str) -> bool:
        """Do ``principal`` and ``other`` share an open order as its customer and its rider?

        Asked only for presence deliveries (rare next to order traffic), straight from the store so
        that an order that closed a moment ago already hides its rider from its customer.
        """
        customer: str | None
        rider: str | None
        if principal.order is not None:  # a tracking link: its own order's rider, while that order is open
            with self._reader.lock:
                store = self._reader.store()
                row = store.get_order(principal.order) if store is not None else None
            return row is not None and row.rider == other and row.state not in ("delivered", "cancelled")
        if principal.role == Role.CUSTOMER:
            customer, rider = principal.username, other
        elif principal.role == Role.RIDER:
            customer, rider = other, principal.username
        else:
            return False
        with self._reader.lock:
            store = self._reader.store()
            return store is not None and store.open_order_between(customer or "", rider or "")

    def _load(self, order: str) -> tuple[str | None, str | None] | None:
        """Read the store on a cache miss (lock held); unknown orders are remembered briefly."""
        now = self.clock()
        if self._unknown.get(order, 0.0) > now:
            return None
        store = self._reader.store()
        row = store.get_order(order) if store is not None else None
        if row is None:
            if len(self._unknown) >= self.MAX_CACHED:
                self._unknown.clear()
            self._unknown[order] = now + self.UNKNOWN_TTL_S
            return None
        entry = (row.customer, row.rider)
        self._remember(order, entry)
        if not self.fed:
            self._loaded[order] = now + self.STALE_AFTER_S
        return entry

    def _remember(self, order: str, entry: tuple[str | None, str | None]) -> None:
        self._unknown.pop(order, None)
        self._loaded.pop(order, None)
        self._members.pop(order, None)
        if len(self._members) >= self.MAX_CACHED:  # oldest entry out; it reloads from the store
            del self._members[next(iter(self._members))]
        self._members[order] = entry

    # -- matching ------------------------------------------------------------------------------

    def _topic_allowed(self, principal: Principal, topic: str, *, write: bool) -> bool:
        """A concrete topic: only templates with its first level and depth are tried (the hot path)."""
        if not topic.startswith(self._head):
            return False
        levels = topic[len(self._head):].split("/")
        index = _INDEX.get(principal.role, _NO_INDEX)[write]
        candidates = index.get((levels[0], len(levels)), ())
        return any(self._match(principal, levels, t) for t in (*index.get(None, ()), *candidates))

    def _allowed(self, principal: Principal, levels: list[str], templates: tuple[Template, ...], *,
                 subscribing: bool = False) -> bool:
        n = len(self._prefix)
        if tuple(levels[:n]) != self._prefix:
            # only a wildcard filter can still reach the prefix ("#", "+/orders/#")
            if not all(lv in ("+", "#") or lv == p for lv, p in zip(levels, self._prefix, strict=False)):
                return False
            if len(levels) < n and levels[-1] != "#":
                return False
        rest = levels[n:] if len(levels) > n or levels[-1] != "#" else ["#"]
        return any(self._match(principal, rest, t, subscribing) for t in templates)

    def _match(self, principal: Principal, levels: list[str], template: Template, subscribing: bool = False) -> bool:
        """Does ``template`` match ``levels`` (a topic, or a filter with ``+``/``#``)? Literal levels
        are compared first so that a membership lookup only happens for the one plausible template."""
        for i, tok in enumerate(template):
            if tok == "#":
                return i < len(levels) and self._placeholders(principal, levels, template[:i], subscribing)
            if i >= len(levels):
                return False
            level = levels[i]
            if level == "#":
                return self._placeholders(principal, levels, template[:i], subscribing)
            if tok[0] != "<" and level != "+" and level != tok:
                return False
        if len(levels) > len(template) and levels[len(template):] != ["#"]:
            return False
        return self._placeholders(principal, levels, template, subscribing)

    def _placeholders(self, principal: Principal, levels: list[str], template: Template,
                      subscribing: bool = False) -> bool:
        for tok, level in zip(template, levels, strict=False):
            if tok[0] != "<" or level == "+":
                continue
            if tok == "<self>":
                ok = level == principal.username
            elif tok == "<member>" and principal.order is not None:  # a tracking link: its order only
                ok = level == principal.order
            elif tok == "<contact>":  # subscribing: allowed, each delivery is checked when it happens
                ok = is_name(level) and (subscribing or self.contacts(principal, level))
            elif tok == "<member>":
                ok = (principal.username is not None and is_name(level)
                      and principal.username in (self.members(level) or ()))
            else:
                ok = is_name(level)
            if not ok:
                return False
        return True


def _policy(principal: Principal) -> tuple[tuple[Template, ...], tuple[Template, ...]]:
    """An account whose role this version doesn't know gets nothing."""
    return POLICY.get(principal.role, ((), ()))


def _valid_filter(levels: list[str]) -> bool:
    """MQTT filter syntax: ``+`` and ``#`` fill a whole level, ``#`` only last; no ``$`` topics."""
    if not levels or levels[0].startswith("$"):
        return False
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
            return False
    return True
