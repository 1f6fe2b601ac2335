"""What the owner's CLI shows, as plain JSON-able dicts built from the store.

Each ``--json`` output is exactly one of these dicts (shapes documented in ``docs/cli.md``); the human
output of ``fishim.cli`` is rendered from the same dicts, so the two never disagree. Times are epoch
milliseconds, like the store. Nothing here writes.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any

from fishim.store import DeadLetter, OrderOverview, Store, StoredEvent

OPEN_EXCLUDED = ("delivered", "cancelled")
LATE_AFTER_DEFAULT = "60m"  # an open order placed longer ago than this is "late" (orders list --late)

_DURATION = re.compile(r"(\d+)\s*([smhdw])", re.IGNORECASE)
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_duration(text: str) -> int:
    """``90s``, ``15m``, ``2h``, ``1h30m``, ``3d``, ``1w`` → milliseconds; ValueError otherwise."""
    cleaned = text.strip().lower()
    parts = _DURATION.findall(cleaned)
    if not parts or _DURATION.sub("", cleaned).strip():
        raise ValueError(f"not a duration: {text!r} (try 90s, 15m, 2h, 1h30m, 3d)")
    return sum(int(n) * _UNIT_MS[unit.lower()] for n, unit in parts)


def parse_since(text: str, now: int) -> int:
    """A duration back from ``now`` (``2h``) or a local date/time (``2024-05-01``, ``2024-05-01T09:30``)."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a duration or date: {text!r} (try 2h, 30m, 2024-05-01T09:30)") from None
    return int(parsed.timestamp() * 1000)


def fmt_age(ms: int) -> str:
    """Compact age for a table column: ``45s``, ``12m``, ``2h05m``, ``3d04h``."""
    s = max(ms, 0) // 1000
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_time(ms: int | None, date: bool = True) -> str:
    if ms is None:
        return "-"
    moment = datetime.fromtimestamp(ms / 1000)
    return moment.strftime("%Y-%m-%d %H:%M:%S" if date else "%H:%M:%S")


def event_dict(event: StoredEvent) -> dict[str, Any]:
    """One stored event: the ``timeline`` entries of ``orders show`` and the lines of ``orders watch``."""
    return {"seq": event.seq, "order_id": event.order_id, "order_seq": event.order_seq,
            "channel": event.channel, "topic": event.topic, "sender": event.sender, "ts": event.ts,
            "received_at": event.received_at, "payload": _payload(event.payload)}


def _payload(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except ValueError:
        return {"_raw": text}
    return data if isinstance(data, dict) else {"_raw": data}


def summarize(channel: str, sender: str, payload: dict[str, Any]) -> str:
    """One readable line for an event; the exact wording is for people, not for parsing."""
    if channel == "status":
        text = str(payload.get("state", "?"))
        if payload.get("items"):
            text += " items " + ", ".join(f"{i.get('sku')}x{i.get('qty', 1)}" for i in payload["items"])
        for key in ("customer", "rider", "eta"):
            if payload.get(key):
                text += f" {key} {payload[key]}"
        if payload.get("note"):
            text += f" ({payload['note']})"
        return f"{text} by {sender}"
    if channel == "chat":
        text = f'{sender}: "{payload.get("text", "")}"'
        if payload.get("mentions"):
            text += " mentions " + ", ".join(f"@{m}" for m in payload["mentions"])
        for media in payload.get("media") or []:
            text += " " + media_ref(media)
        if payload.get("reply_to"):
            text += f" (reply to {payload['reply_to']})"
        return text
    if channel == "location":
        text = f"{sender} at {payload.get('lat')},{payload.get('lon')}"
        return text + (f" +/-{payload['accuracy_m']}m" if payload.get("accuracy_m") is not None else "")
    if channel == "picks":
        text = f"{payload.get('sku')} x{payload.get('qty')} by {payload.get('scanner') or sender}"
        return text + (f" bin {payload['bin']}" if payload.get("bin") else "")
    if channel == "receipts":
        return f"{sender} read up to order #{payload.get('read_up_to')}"
    if channel == "notify":
        return f"[{payload.get('priority')}] {payload.get('reason')}: {payload.get('text', '')}"
    return json.dumps(payload)[:80]


def media_ref(media: dict[str, Any]) -> str:
    """``[image image/jpeg 47 KB sha256:abab12345678]``: a reference, never the bytes."""
    parts = [str(media.get("kind", "media"))]
    if media.get("mime"):
        parts.append(str(media["mime"]))
    if isinstance(media.get("size"), int):
        parts.append(f"{media['size'] / 1024:.0f} KB")
    if media.get("sha256"):
        parts.append(f"sha256:{str(media['sha256'])[:12]}")
    elif media.get("url"):
        parts.append(str(media["url"]))
    return "[" + " ".join(parts) + "]"


def orders_list(store: Store, *, now: int, state: str | None = None, rider: str | None = None,
                since: int | None = None, late_after: int | None = None, limit: int | None = 50) -> dict[str, Any]:
    """``fishim orders list``: newest activity first, or with ``late_after`` the late ones, oldest first."""
    rows = store.order_overview(state=state, rider=rider, updated_since=since,
                                open_created_before=None if late_after is None else now - late_after,
                                limit=None if limit is None else limit + 1)
    truncated = limit is not None and len(rows) > limit
    open_alerts = store.open_alert_counts() if has_alerts(store) else {}
    return {"now": now, "count": min(len(rows), limit) if limit is not None else len(rows),
            "truncated": truncated,
            "orders": [_overview(row, now, open_alerts) for row in rows[:limit]]}


def _overview(row: OrderOverview, now: int, alerts: dict[str, int] | None = None) -> dict[str, Any]:
    order = row.order
    return {"alerts": (alerts or {}).get(order.id, 0),
            "id": order.id, "state": order.state, "customer": order.customer, "rider": order.rider,
            "created_at": order.created_at, "updated_at": order.updated_at,
            "age_s": max(now - order.created_at, 0) // 1000, "open": order.state not in OPEN_EXCLUDED,
            "order_seq": order.order_seq, "unread": row.unread,
            "last_event": event_dict(row.last_event) if row.last_event else None}


def order_show(store: Store, order_id: str) -> dict[str, Any] | None:
    """``fishim orders show``: the order, its items against picks, every event, location and receipts."""
    order = store.get_order(order_id)
    if order is None:
        return None
    events = store.order_events(order_id)
    fixes = [e for e in events if e.channel == "location"]
    items = [{"sku": i.get("sku"), "name": i.get("name"), "wanted": int(i.get("qty", 1)),
              "picked": order.picked.get(str(i.get("sku")), 0)} for i in order.items]
    receipts = [{"member": r.member, "read_up_to": r.read_up_to, "updated_at": r.updated_at,
                 "unread": sum(1 for e in events if e.order_seq > r.read_up_to and e.channel in ("status", "chat")
                               and e.sender != r.member)}
                for r in store.receipt_rows(order_id)]
    return {
        "order": {"id": order.id, "state": order.state, "customer": order.customer, "rider": order.rider,
                  "created_at": order.created_at, "updated_at": order.updated_at, "order_seq": order.order_seq,
                  "last_seq": order.last_seq, "open": order.state not in OPEN_EXCLUDED},
        "items": items,
        "timeline": [event_dict(e) for e in events],
        "location": {"count": len(fixes), "first": _fix(fixes[0]) if fixes else None,
                     "last": _fix(fixes[-1]) if fixes else None},
        "receipts": receipts,
    }


def _fix(event: StoredEvent) -> dict[str, Any]:
    data = _payload(event.payload)
    return {"lat": data.get("lat"), "lon": data.get("lon"), "sender": event.sender, "ts": event.ts,
            "received_at": event.received_at, "order_seq": event.order_seq}


def deadletter_dict(letter: DeadLetter) -> dict[str, Any]:
    """A refused message. ``payload`` is its text (undecodable bytes as U+FFFD), null if none was kept."""
    payload = letter.payload
    return {"id": letter.id, "received_at": letter.received_at, "topic": letter.topic, "user": letter.user,
            "msg_id": letter.msg_id, "error": letter.error, "detail": letter.detail,
            "payload": payload.decode("utf-8", "replace") if payload is not None else None,
            "payload_size": len(payload) if payload is not None else None}


def deadletters(store: Store, since: int | None, limit: int) -> dict[str, Any]:
    rows = store.recent_deadletters(since, limit + 1)
    truncated = len(rows) > limit
    rows = rows[1:] if truncated else rows
    return {"count": len(rows), "truncated": truncated, "deadletters": [deadletter_dict(d) for d in rows]}


def stats(store: Store, now: int, broker: dict[str, Any] | None) -> dict[str, Any]:
    """``fishim stats``. ``broker`` is the local ``fishim up``/``broker`` status (None: not running here)."""
    last_minute = store.count_events_received_since(now - 60_000)
    by_state = store.orders_by_state()
    return {
        "now": now,
        "events_per_s": round(last_minute / 60, 2),
        "events_last_minute": last_minute,
        "stored_events": store.count_events(),
        "max_seq": store.max_seq(),
        "orders": {"total": sum(by_state.values()), "by_state": dict(sorted(by_state.items()))},
        "deadletters": store.count_deadletters(),
        "alerts": alert_stats(store),
        "clients_connected": broker.get("clients_connected") if broker else None,
        "broker": broker,
        "db_path": store.label,
        "db_bytes": store.file_bytes(),
    }


def has_alerts(store: Store) -> bool:
    """A store the running service has not migrated yet has no alert tables: nothing to show."""
    return store.conn.execute("SELECT 1 FROM sqlite_master WHERE name='alerts'").fetchone() is not None


def alert_stats(store: Store) -> dict[str, int]:
    """Open alerts (someone must act), pending conditions (not yet due), pushes given up on."""
    if not has_alerts(store):
        return {"open": 0, "pending": 0, "push_failed": 0}
    counts = store.alert_counts()
    return {"open": counts.get("open", 0), "pending": counts.get("pending", 0),
            "push_failed": len(store.failed_pushes(limit=1_000_000))}


def alerts_list(store: Store, now: int, open_only: bool = False, limit: int = 200) -> dict[str, Any]:
    """``fishim alerts``: open alerts ranked by priority then age, then (without ``--open``) the ones
    that closed, newest first. Conditions still pending (not yet due) are counted, not listed."""
    from fishim.alerts import Alert, rank

    if not has_alerts(store):
        return {"now": now, "alerts": [], "pending": 0, "push_failures": []}
    alerts = [Alert.model_validate_json(raw) for raw in store.alerts(live_only=open_only, limit=100_000)]
    opened = rank(a for a in alerts if a.state == "open")
    closed = [] if open_only else sorted((a for a in alerts if a.state == "closed" and a.opened_at),
                                         key=lambda a: -(a.closed_at or 0))
    failures = [{"id": i, "user": u, "attempts": n, "error": e, "at": t} for i, u, n, e, t in store.failed_pushes()]
    return {"now": now, "pending": sum(1 for a in alerts if a.state == "pending"),
            "alerts": [_alert(a, now) for a in [*opened, *closed][:limit]], "push_failures": failures}


def _alert(alert: Any, now: int) -> dict[str, Any]:
    data = alert.model_dump(exclude={"due_at", "actor", "about_seq"})
    data["age_s"] = max(now - (alert.opened_at or alert.started_at), 0) // 1000
    data["escalated"] = alert.escalated_at is not None
    return data


def devices_view(store: Store, user: str | None) -> dict[str, Any]:
    """``fishim devices``: each device's last acknowledged cursor, and how far behind the store it is."""
    top = store.max_seq()
    return {"user": user, "max_seq": top,
            "devices": [{**d.model_dump(), "behind": max(top - d.cursor, 0)} for d in store.devices(user)]}
