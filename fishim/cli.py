"""The ``fishim`` command: run the broker and bridge, manage users, look inside orders.

Every error a person can act on is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from fishim.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from fishim.store import Store

LATE_AFTER_DEFAULT = "60m"  # fishim.views.LATE_AFTER_DEFAULT, repeated so --help needs no store import


def fail(message: str) -> NoReturn:
    """One line, exit 2: for bad config, missing store, unknown order and the like."""
    click.echo(f"fishim: {message}", err=True)
    sys.exit(2)


class Ctx:
    """What every command gets: the config path, loaded lazily so `--help` never needs a file."""

    def __init__(self, config_path: Path | None) -> None:
        self.config_path = config_path
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except ConfigError as exc:
                fail(str(exc))
        return self._config

    def override(self, **changes: Any) -> Config:
        """Apply --bind/--db style overrides on top of the file and the env."""
        data = self.config.model_dump()
        if changes.get("db"):
            from fishim.config import store_override

            data["store"] = store_override(data["store"], changes["db"])
        if changes.get("bind"):
            data["listeners"][0]["bind"] = changes["bind"]
        try:
            self._config = Config.model_validate(data)
        except ValueError as exc:
            fail(f"bad option: {str(exc).splitlines()[-1].strip()}")
        return self._config


pass_ctx = click.make_pass_decorator(Ctx)


def _setup_logging(config: Config) -> None:
    """Only the long-running commands log; read commands skip the import (start-up time matters)."""
    from fishim.logs import setup_logging

    setup_logging(config.logging)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "-c", "config_path", type=click.Path(path_type=Path), envvar="FISHIM_CONFIG",
              default=None, help="broker.yaml to use (default ./broker.yaml, env FISHIM_CONFIG).")
@click.version_option(package_name="fishim")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """fishim: real-time order messaging for a tackle shop.

    \b
    Example:
      fishim up                      # embedded broker with durable ingest, on broker.yaml
      fishim orders list --state delivering
    """
    ctx.obj = Ctx(config_path)


@main.command()
@click.option("--bind", help="HOST:PORT for the MQTT listener (env FISHIM_BIND).")
@click.option("--db", help="SQLite store path, or a postgresql:// URL (env FISHIM_DB).")
@pass_ctx
def up(ctx: Ctx, bind: str | None, db: str | None) -> None:
    """Run the embedded broker with its durable ingest: every message on the order tree is
    validated and committed to the store before it is routed or acknowledged, and sync
    requests are answered from the same process.

    \b
    Example:
      fishim up --bind 127.0.0.1:1883 --db shop.db
    """
    from fishim.service import run_up

    config = ctx.override(bind=bind, db=db)
    _embedded_store_only(config)
    _setup_logging(config)
    sys.exit(run_up(config))


@main.command()
@click.option("--bind", help="HOST:PORT for the MQTT listener (env FISHIM_BIND).")
@click.option("--db", help="SQLite store path, or a postgresql:// URL (env FISHIM_DB).")
@pass_ctx
def broker(ctx: Ctx, bind: str | None, db: str | None) -> None:
    """Run only the embedded broker, as a plain MQTT broker with fishim's accounts and ACL,
    for a `fishim bridge` run separately (then the bridge's guarantee holds, as behind Mosquitto).

    \b
    Example:
      fishim broker --bind 127.0.0.1:1883
    """
    from fishim.service import run_broker_only

    config = ctx.override(bind=bind, db=db)
    _embedded_store_only(config)
    _setup_logging(config)
    sys.exit(run_broker_only(config))


def _embedded_store_only(config: Config) -> None:
    """The embedded broker keeps accounts and its ingest in SQLite; PostgreSQL is for `fishim bridge`."""
    if config.store.url is not None:
        fail("store.url (PostgreSQL) is for `fishim bridge` behind Mosquitto/EMQX/RabbitMQ; the embedded "
             "broker uses store.path (SQLite): see docs/postgres.md")


@main.command()
@click.option("--broker", "broker_url", multiple=True,
              help="mqtt://[user:pass@]HOST:PORT (default: the embedded broker). Repeat it, or separate URLs "
                   "with commas, for the nodes of a clustered broker: the bridge fails over between them.")
@click.option("--db", help="SQLite store path, or a postgresql:// URL (env FISHIM_DB).")
@pass_ctx
def bridge(ctx: Ctx, broker_url: tuple[str, ...], db: str | None) -> None:
    """Run only the bridge: persist, validate, serve sync.

    \b
    Example:
      fishim bridge --broker mqtt://127.0.0.1:1883
      fishim bridge --broker mqtt://node1:1883 --broker mqtt://node2:1883
    """
    from fishim.bridge import run_bridge

    config = ctx.override(db=db)
    _setup_logging(config)
    sys.exit(run_bridge(config, list(broker_url) or None))


@main.group()
def users() -> None:
    """Manage accounts (owner, staff, rider, customer, scanner).

    \b
    Example:
      echo 's3cret' | fishim users add rider7 --role rider --password-stdin
      fishim users list
    """


@users.command("add")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["owner", "staff", "rider", "customer", "scanner"]))
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@pass_ctx
def users_add(ctx: Ctx, name: str, role: str, password_stdin: bool) -> None:
    """Create or update a user; the password is stored hashed (argon2id).

    \b
    Example:
      echo 's3cret' | fishim users add rider7 --role rider --password-stdin
    """
    from fishim.auth import UserError, add_user
    from fishim.store import StoreError, open_store

    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else click.prompt(
        "Password", hide_input=True, confirmation_prompt=True)
    try:
        with open_store(ctx.config.store.target) as store:
            add_user(store, name, role, password)
    except (UserError, StoreError) as exc:
        fail(str(exc))
    click.echo(f"user {name} saved (role {role})")


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def users_list(ctx: Ctx, as_json: bool) -> None:
    """List users and their roles (never their passwords).

    \b
    Example:
      fishim users list --json
    """
    import json

    from fishim.store import StoreError, open_store

    try:
        with open_store(ctx.config.store.target, readonly=True) as store:
            rows = [{"name": u.name, "role": u.role, "created_at": u.created_at} for u in store.users()]
    except StoreError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        click.echo(f"{row['name']:<24} {row['role']}")


@users.command("remove")
@click.argument("name")
@pass_ctx
def users_remove(ctx: Ctx, name: str) -> None:
    """Remove a user.

    \b
    Example:
      fishim users remove rider7
    """
    from fishim.store import StoreError, open_store

    try:
        store = open_store(ctx.config.store.target)
    except StoreError as exc:
        fail(str(exc))
    with store:
        if not store.remove_user(name):
            fail(f"no user {name!r}")
    click.echo(f"user {name} removed")



# -- the owner's read commands --------------------------------------------------------------------
# Each builds a dict with fishim.views (the --json shape, docs/cli.md) and renders it for people here.

STATES = ("placed", "confirmed", "picking", "packed", "assigned", "picked_up", "delivering", "delivered",
          "cancelled", "failed")
_STATE_COLOURS = {"delivered": "green", "cancelled": "red", "failed": "red", "delivering": "cyan",
                  "picked_up": "cyan", "assigned": "cyan", "placed": "yellow"}

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output (docs/cli.md).")


def now_ms() -> int:
    return int(time.time() * 1000)


@contextmanager
def reading(ctx: Ctx) -> Iterator[Store]:
    """The store, read-only, with every way it can be unusable turned into one line and exit 2."""
    from fishim.store import StoreError, open_store

    path = ctx.config.store.path
    if ctx.config.store.url is None and not path.exists():
        where = ctx.config_path or os.environ.get("FISHIM_CONFIG") or "broker.yaml"
        fail(f"no store at {path}: start `fishim up` first, or point FISHIM_DB or store.path in {where} at it")
    try:
        store = open_store(ctx.config.store.target, readonly=True)
    except (StoreError, sqlite3.Error) as exc:
        fail(str(exc) if ctx.config.store.url else f"cannot open store {path}: {exc}")
    try:
        yield store
    except store.errors as exc:
        fail(f"cannot read store {path}: {exc} (is it a fishim store?)")
    finally:
        store.close()


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, ensure_ascii=False))


def since_ms(text: str | None, now: int) -> int | None:
    from fishim.views import parse_since

    if text is None:
        return None
    try:
        return parse_since(text, now)
    except ValueError as exc:
        fail(f"--since: {exc}")


def _state(state: str, width: int = 0) -> str:
    return click.style(state.ljust(width), fg=_STATE_COLOURS.get(state))


def _table(headers: list[str], rows: list[list[str]], colours: list[dict[int, str | None]] | None = None) -> None:
    """Left-aligned columns sized to their content; the last column is cut to the terminal width.

    ``colours[i]`` maps column index to a click colour for row ``i`` (padding happens before styling,
    so escape codes never break the alignment; click drops them when stdout is not a terminal).
    """
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers[:-1])]
    room = max(shutil.get_terminal_size((120, 24)).columns - sum(w + 2 for w in widths), 20)
    click.echo(click.style("  ".join([*(h.ljust(w) for h, w in zip(headers, widths, strict=False)),
                                      headers[-1]]), bold=True))
    for i, row in enumerate(rows):
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        for index, fg in (colours[i] if colours else {}).items():
            cells[index] = click.style(cells[index], fg=fg)
        last = row[-1] if len(row[-1]) <= room else row[-1][: room - 3] + "..."
        click.echo("  ".join([*cells, last]).rstrip())


@main.group()
def orders() -> None:
    """Look inside orders: list, show one, watch live.

    \b
    Example:
      fishim orders list --late
      fishim orders show A1042
      fishim orders watch A1042
    """


@orders.command("list")
@click.option("--state", type=click.Choice(STATES), help="Only orders in this state.")
@click.option("--rider", help="Only orders assigned to this rider.")
@click.option("--since", "since", metavar="WHEN", help="Only orders with activity since WHEN: 2h, 30m, 1d or "
              "a date like 2024-05-01T09:30.")
@click.option("--late", is_flag=True, help="Only late orders: still open (not delivered or cancelled) and "
              "placed longer ago than --late-after; oldest first.")
@click.option("--late-after", default=LATE_AFTER_DEFAULT, show_default=True, metavar="DURATION",
              help="How old an open order must be to count as late.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=0),
              help="At most this many orders (0: all).")
@json_option
@pass_ctx
def orders_list(ctx: Ctx, state: str | None, rider: str | None, since: str | None, late: bool,
                late_after: str, limit: int, as_json: bool) -> None:
    """Orders, most recent activity first.

    Columns: ALERTS is how many open alerts the order has (`fishim alerts`); AGE is the time since the
    order was placed; UNREAD C/R counts the status changes and chat
    messages the customer / the rider has not marked read yet (from their read receipts; '-' when the
    order has no rider yet); LAST is the newest event. Customer names that look like phone numbers
    are masked here (all but the last two digits); --json shows them unmasked.

    \b
    Example:
      fishim orders list --state delivering
      fishim orders list --rider rider7 --since 2h
      fishim orders list --late --late-after 45m --json
    """
    from fishim.logs import mask
    from fishim.views import fmt_age, orders_list, parse_duration, summarize

    now = now_ms()
    after = None
    if late:
        try:
            after = parse_duration(late_after)
        except ValueError as exc:
            fail(f"--late-after: {exc}")
    since_at = since_ms(since, now)
    with reading(ctx) as store:
        data = orders_list(store, now=now, state=state, rider=rider, since=since_at, late_after=after,
                           limit=limit or None)
    if as_json:
        emit_json(data)
        return
    if not data["orders"]:
        click.echo("no orders match" if (state or rider or since or late) else "no orders yet")
        return
    late_ms = after if after is not None else _late_ms(late_after)
    rows, colours = [], []
    for o in data["orders"]:
        unread = o["unread"]
        ev = o["last_event"]
        last = "-"
        if ev:
            last = (f"{fmt_age(now - ev['received_at'])} ago {ev['channel']}: "
                    f"{summarize(ev['channel'], ev['sender'], ev['payload'])}")
        rows.append([o["id"], o["state"], f"!{o['alerts']}" if o["alerts"] else "-", mask(o["customer"] or "-"),
                     o["rider"] or "-", fmt_age(o["age_s"] * 1000),
                     f"{_dash(unread.get('customer'))}/{_dash(unread.get('rider'))}", last])
        is_late = late_ms is not None and o["open"] and o["age_s"] * 1000 > late_ms
        colours.append({1: _STATE_COLOURS.get(o["state"]), 2: "red" if o["alerts"] else None,
                        5: "red" if is_late else None})
    _table(["ID", "STATE", "ALERTS", "CUSTOMER", "RIDER", "AGE", "UNREAD C/R", "LAST"], rows, colours)
    if data["truncated"]:
        click.echo(f"(showing the first {data['count']}; --limit 0 shows all)")


def _late_ms(text: str) -> int | None:
    from fishim.views import parse_duration

    try:
        return parse_duration(text)
    except ValueError:
        return None


def _dash(value: int | None) -> str:
    return "-" if value is None else str(value)


@orders.command("show")
@click.argument("order_id", metavar="ID")
@json_option
@pass_ctx
def orders_show(ctx: Ctx, order_id: str, as_json: bool) -> None:
    """One order's whole story, in the order fishim received it.

    Status changes with who and when, picks against the items (picked/wanted), chat with mentions and
    media references, a summary of the rider's location trail, and who has read up to which event.

    \b
    Example:
      fishim orders show A1042
      fishim orders show A1042 --json | jq '.timeline[] | select(.channel == "chat")'
    """
    from fishim.views import order_show

    with reading(ctx) as store:
        data = order_show(store, order_id)
        path = store.label
    if data is None:
        fail(f"no order {order_id!r} in {path} (see `fishim orders list`)")
    if as_json:
        emit_json(data)
        return
    _render_order(data)


def _render_order(data: dict[str, Any]) -> None:
    from fishim.views import fmt_age, fmt_time, summarize

    o = data["order"]
    now = now_ms()
    click.echo(click.style(f"Order {o['id']}", bold=True) + "  " + _state(o["state"]))
    click.echo(f"  customer {o['customer'] or '-'}   rider {o['rider'] or '-'}   placed "
               f"{fmt_time(o['created_at'])} ({fmt_age(now - o['created_at'])} ago)   "
               f"updated {fmt_time(o['updated_at'])}   events {o['order_seq']}")
    click.echo(click.style("\nItems", bold=True))
    width = max([len(str(i["sku"])) for i in data["items"]] + [3])
    for item in data["items"]:
        done = item["picked"] >= item["wanted"]
        mark = click.style(f"{item['picked']}/{item['wanted']} picked", fg="green" if done else "yellow")
        click.echo(f"  {str(item['sku']).ljust(width)}  {mark}  {item['name'] or ''}".rstrip())
    click.echo(click.style("\nTimeline", bold=True))
    hidden = {"location": 0, "receipts": 0}
    wanted = {str(i["sku"]): i["wanted"] for i in data["items"]}
    picked: dict[str, int] = {}
    for ev in data["timeline"]:
        channel, payload = ev["channel"], ev["payload"]
        if channel in hidden:
            hidden[channel] += 1
            continue
        text = summarize(channel, ev["sender"], payload)
        if channel == "picks":
            sku = str(payload.get("sku"))
            picked[sku] = picked.get(sku, 0) + int(payload.get("qty") or 0)
            text += f" ({picked[sku]}/{wanted.get(sku, '?')})"
        label = click.style(channel.ljust(6), fg={"status": "cyan", "chat": "magenta"}.get(channel))
        click.echo(f"  {fmt_time(ev['received_at'])}  order #{str(ev['order_seq']).ljust(3)} "
                   f"seq {str(ev['seq']).ljust(6)} {label}  {text}")
    if any(hidden.values()):
        click.echo(f"  ({hidden['location']} location fixes and {hidden['receipts']} read receipts: "
                   "summarised below)")
    loc = data["location"]
    click.echo(click.style("\nLocation", bold=True))
    if loc["count"]:
        first, last = loc["first"], loc["last"]
        click.echo(f"  {loc['count']} fixes by {last['sender']}: first {fmt_time(first['received_at'])} at "
                   f"{first['lat']},{first['lon']}; last {fmt_time(last['received_at'])} at "
                   f"{last['lat']},{last['lon']}")
    else:
        click.echo("  no fixes yet")
    click.echo(click.style("\nRead", bold=True))
    if not data["receipts"]:
        click.echo("  nobody has sent a read receipt yet")
    for r in data["receipts"]:
        click.echo(f"  {r['member']} read up to order #{r['read_up_to']} of {o['order_seq']} at "
                   f"{fmt_time(r['updated_at'])} ({r['unread']} unread status/chat)")


@orders.command("watch")
@click.argument("order_id", metavar="[ID]", required=False)
@click.option("--since", "since_seq", type=click.IntRange(min=0), metavar="SEQ",
              help="Start after this store seq (default: only what arrives from now on; 0: everything, "
              "refused messages included).")
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many lines.")
@click.option("--timeout", type=click.FloatRange(min=0), metavar="SECONDS", help="Stop after this long.")
@click.option("--interval", default=0.25, show_default=True, type=click.FloatRange(min=0.01),
              metavar="SECONDS", help="How often to look for new events.")
@json_option
@pass_ctx
def orders_watch(ctx: Ctx, order_id: str | None, since_seq: int | None, count: int | None,
                 timeout: float | None, interval: float, as_json: bool) -> None:
    """Follow new events (and refused messages) live, on every order or just ID. Ctrl-C stops.

    It follows the store the bridge writes, so it needs no MQTT account and shows exactly what was
    accepted; refused messages appear as REFUSED lines (see `fishim deadletters`). With --json, one
    JSON object per line.

    \b
    Example:
      fishim orders watch
      fishim orders watch A1042 --since 0 --count 20 --json
    """
    from fishim.views import deadletter_dict, event_dict, fmt_time, summarize

    deadline = None if timeout is None else time.monotonic() + timeout
    shown = 0
    prefix = f"{ctx.config.prefix}/orders/{order_id}/" if order_id else None
    try:
        with reading(ctx) as store:
            cursor = store.max_seq() if since_seq is None else since_seq
            dead_cursor = 0 if since_seq == 0 else store.max_deadletter_id()  # they have no seq
            click.echo(f"watching {store.label}{' order ' + order_id if order_id else ''} after seq {cursor} "
                       "(Ctrl-C to stop)", err=True)
            while True:
                lines: list[tuple[dict[str, Any], str]] = []
                top = store.max_seq()
                events = store.events_since(cursor, [order_id] if order_id else None, limit=500)
                # One writer commits seqs in order, so once everything up to `top` was read the cursor
                # may jump there: a quiet order never makes later polls rescan other orders' events.
                cursor = events[-1].seq if len(events) == 500 else max([top, *(e.seq for e in events[-1:])])
                for event in events:
                    ev = event_dict(event)
                    lines.append(({"type": "event", **ev},
                                  f"{fmt_time(ev['received_at'], date=False)}  {ev['order_id']}  "
                                  f"order #{ev['order_seq']}  seq {ev['seq']}  {ev['channel']}: "
                                  f"{summarize(ev['channel'], ev['sender'], ev['payload'])}"))
                for letter in store.deadletters_after(dead_cursor):
                    dead_cursor = letter.id or dead_cursor
                    if prefix and not letter.topic.startswith(prefix):
                        continue
                    d = deadletter_dict(letter)
                    lines.append(({"type": "deadletter", **d},
                                  click.style(f"{fmt_time(d['received_at'], date=False)}  REFUSED {d['error']} "
                                              f"from {d['user'] or '?'} on {d['topic']}: {d['detail']}",
                                              fg="red")))
                for data, text in lines:
                    click.echo(json.dumps(data, ensure_ascii=False) if as_json else text)
                    shown += 1
                    if count is not None and shown >= count:
                        return
                if deadline is not None and time.monotonic() >= deadline:
                    return
                if not lines:
                    time.sleep(interval if deadline is None else min(interval, max(deadline - time.monotonic(), 0)))
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    except BrokenPipeError:  # `fishim orders watch | head`: the reader left; end quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@main.command()
@click.option("--since", "since", metavar="WHEN", help="Only those received since WHEN: 2h, 30m, 1d or a date.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1),
              help="At most this many, the newest.")
@json_option
@pass_ctx
def deadletters(ctx: Ctx, since: str | None, limit: int, as_json: bool) -> None:
    """Messages fishim refused, and why.

    Bad JSON, wrong schema, an illegal state change, a topic the sender may not use...; the newest
    --limit, oldest first.

    \b
    Example:
      fishim deadletters --since 2h
      fishim deadletters --json | jq -r '.deadletters[].error' | sort | uniq -c
    """
    from fishim.views import deadletters as build
    from fishim.views import fmt_time

    since_at = since_ms(since, now_ms())
    with reading(ctx) as store:
        data = build(store, since_at, limit)
    if as_json:
        emit_json(data)
        return
    if not data["deadletters"]:
        click.echo("no refused messages" + (f" since {fmt_time(since_at)}" if since_at else ""))
        return
    for d in data["deadletters"]:
        click.echo(f"{fmt_time(d['received_at'])}  {click.style(d['error'], fg='red')}  from {d['user'] or '?'}"
                   f"  on {d['topic']}" + (f"  id {d['msg_id']}" if d["msg_id"] else ""))
        click.echo(f"    {d['detail']}")
    if data["truncated"]:
        click.echo(f"(the newest {data['count']}; --limit raises it)")


@main.command()
@json_option
@pass_ctx
def stats(ctx: Ctx, as_json: bool) -> None:
    """Health at a glance.

    Events/s over the last minute, stored events, orders by state, refused messages, connected
    clients (when `fishim up`/`fishim broker` runs on this machine on this store; '-' otherwise) and
    the database size.

    \b
    Example:
      fishim stats
      fishim stats --json | jq .events_per_s
    """
    from fishim.service import read_status
    from fishim.views import fmt_time
    from fishim.views import stats as build

    now = now_ms()
    with reading(ctx) as store:
        data = build(store, now, read_status(store.path, now))
    if as_json:
        emit_json(data)
        return
    by_state = ", ".join(f"{k} {v:,}" for k, v in data["orders"]["by_state"].items()) or "none yet"
    broker = data["broker"]
    clients = "-  (no fishim broker running here on this store)"
    if broker:
        clients = f"{broker['clients_connected']}  (`fishim {broker['mode']}` pid " \
                  f"{broker['pid']}, since {fmt_time(broker['started_at'])})"
    for label, value in (
        ("events/s (last minute)", f"{data['events_per_s']:.2f}  ({data['events_last_minute']:,} events)"),
        ("stored events", f"{data['stored_events']:,}  (last seq {data['max_seq']:,})"),
        ("orders", f"{data['orders']['total']:,}: {by_state}"),
        ("refused messages", f"{data['deadletters']:,}  (fishim deadletters)"),
        ("open alerts", f"{data['alerts']['open']:,}  ({data['alerts']['pending']:,} pending, "
                        f"{data['alerts']['push_failed']:,} failed pushes; fishim alerts)"),
        ("connected clients", clients),
        ("database", f"{data['db_path']}, {data['db_bytes'] / 1e6:.1f} MB"),
    ):
        click.echo(f"{label:<24} {value}")


_PRIORITY_COLOURS = {"urgent": "red", "high": "yellow", "normal": None, "low": None}


@main.group(invoke_without_command=True)
@click.option("--open", "open_only", is_flag=True, help="Only open alerts.")
@json_option
@click.pass_context
def alerts(click_ctx: click.Context, open_only: bool, as_json: bool) -> None:
    """Alerts: conditions on orders someone must act on, most urgent first, then the oldest.

    Open alerts come first, ranked by priority (urgent, high, normal, low) and then age; without
    --open the ones that closed follow (why they closed: answered, rider_back, acknowledged, ...).
    ESC is 'yes' once the alert went to the owner. Failed off-app pushes are listed at the end.
    Customer names that look like phone numbers are masked here; --json shows them unmasked.

    \b
    Example:
      fishim alerts --open
      fishim alerts ack al-3f2a9c1b7d4e
    """
    if click_ctx.invoked_subcommand is not None:
        return
    from fishim.logs import mask
    from fishim.views import alerts_list, fmt_age

    ctx = click_ctx.find_object(Ctx)
    assert ctx is not None  # main() always sets it
    now = now_ms()
    with reading(ctx) as store:
        data = alerts_list(store, now, open_only=open_only)
    if as_json:
        emit_json(data)
        return
    if not data["alerts"]:
        click.echo("no open alerts" if open_only else "no alerts yet")
    else:
        rows, colours = [], []
        for a in data["alerts"]:
            state = a["state"] if a["state"] == "open" else f"closed ({a['close_reason']})"
            rows.append([a["id"], a["priority"], a["reason"], a["order"] or "-", fmt_age(a["age_s"] * 1000),
                         "yes" if a["escalated"] else "-", state,
                         mask(a["text"]) + (f"  [push failed: {a['push_error']}]" if a["push_error"] else "")])
            colours.append({1: _PRIORITY_COLOURS.get(a["priority"]), 6: "red" if a["state"] == "open" else None})
        _table(["ID", "PRIORITY", "REASON", "ORDER", "AGE", "ESC", "STATE", "WHAT"], rows, colours)
    if data["pending"]:
        click.echo(f"({data['pending']} more conditions are being watched and not due yet)")
    for f in data["push_failures"]:
        click.echo(click.style(f"push failed: {f['id']} to {f['user']} after {f['attempts']} attempts: "
                               f"{f['error']}", fg="red"))


@alerts.command("ack")
@click.argument("alert_id", metavar="ID")
@click.option("--by", "by_user", default=None, help="Who acknowledges (shown in the alert; default $USER).")
@pass_ctx
def alerts_ack(ctx: Ctx, alert_id: str, by_user: str | None) -> None:
    """Acknowledge an alert: it closes and is not escalated; the running service applies it within a tick.

    \b
    Example:
      fishim alerts ack al-3f2a9c1b7d4e --by boss
    """
    from fishim.alerts import Alert
    from fishim.store import Store, StoreError

    path = ctx.config.store.path
    if not path.exists():
        fail(f"no store at {path}")
    try:
        store = Store(path)
    except (StoreError, sqlite3.Error) as exc:
        fail(f"cannot open store {path}: {exc}")
    try:
        raw = store.get_alert(alert_id)
        if raw is None:
            fail(f"no alert {alert_id!r} (fishim alerts lists them)")
        alert = Alert.model_validate_json(raw)
        if alert.state == "closed":
            fail(f"alert {alert_id} is already closed ({alert.close_reason})")
        by = by_user or os.environ.get("USER") or None
        store.add_ack(alert_id, by)
        now = now_ms()
        closed = alert.model_copy(update={"state": "closed", "closed_at": now, "close_reason": "acknowledged",
                                          "acked_by": by})
        store.put_alerts([closed.record(now)])
    finally:
        store.close()
    click.echo(f"acknowledged {alert_id}")


@main.command()
@click.argument("user")
@click.option("--since", "since", default=None, type=click.IntRange(min=0), metavar="N",
              help="The client's sync cursor: replay events with seq > N (0: everything). Default: the "
              "last cursor the device --client-id acknowledged (see `fishim devices`), else 0.")
@click.option("--client-id", default=None, metavar="ID",
              help="The device (MQTT client id) to replay for; its last acknowledged cursor is the default "
              "--since.")
@click.option("--order", "order_ids", multiple=True, metavar="ID", help="Only these orders (repeatable).")
@click.option("--full", is_flag=True, help="Every location fix (a client gets only the latest per order).")
@json_option
@pass_ctx
def replay(ctx: Ctx, user: str, since: int | None, client_id: str | None, order_ids: tuple[str, ...], full: bool,
           as_json: bool) -> None:
    """What USER's app would get if it synced now.

    The events after cursor N on the orders USER may read, exactly as fishim would answer. The
    argument is the user (MQTT username): what a client may replay is decided by its user's role and
    orders, never by its client id. Each event is labelled with its store-wide `seq` (the cursor) and
    its `order #` (its place in its order, what read receipts count).

    \b
    Example:
      fishim replay rider7 --client-id rider7-phone   # from where that phone stands
      fishim replay rider7 --since 1200
      fishim replay cust1 --order A1042 --json
    """
    from fishim.sync import SyncServer
    from fishim.topics import Channel, TopicRef, is_name
    from fishim.views import summarize

    for name, value in (("USER", user), ("--client-id", client_id or "fishim-cli"),
                        *(("--order", o) for o in order_ids)):
        if not is_name(value):
            fail(f"{name}: bad name {value!r} (1-64 of A-Z a-z 0-9 _ -)")
    with reading(ctx) as store:
        device = store.device(user, client_id) if client_id else None
    if since is not None:
        since_from = "--since"
    elif device is not None:
        since, since_from = device.cursor, "device"
    else:
        if client_id:
            click.echo(f"no sync from {user}/{client_id} recorded yet (see `fishim devices {user}`): "
                       "replaying from 0", err=True)
        since, since_from = 0, "default"
    client_id = client_id or "fishim-cli"
    request: dict[str, Any] = {"since": since, "collapse": not full}
    if order_ids:
        request["orders"] = list(order_ids)
    with reading(ctx) as store:
        known = store.get_user(user)
        server = SyncServer(store.target, ctx.config, on_device=lambda _device: None)  # a look, not a device
        try:
            replies = server.handle(TopicRef(channel=Channel.SYNC_REQUEST, user=user, client_id=client_id),
                                    json.dumps(request).encode())
        finally:
            server.close()
    pages = [json.loads(body) for _topic, body in replies]
    if pages and "error" in pages[0]:
        fail(f"sync refused: {pages[0]['error']}: {pages[0].get('detail', '')}")
    events = [e for p in pages for e in p.get("events", [])]
    last = pages[-1] if pages else {}
    data = {"user": user, "role": known.role if known else None, "client_id": client_id, "since": since,
            "since_from": since_from,
            "pages": len(pages), "next_since": last.get("next_since", since), "more": bool(last.get("more")),
            "collapsed": last.get("collapsed", []), "events": events}
    if as_json:
        emit_json(data)
        return
    role = data["role"] or "no account: anonymous loopback rules"
    origin = f" (the last cursor {client_id} acknowledged)" if since_from == "device" else ""
    click.echo(f"{user} ({role}) syncing from seq {since}{origin} would get {len(events)} events in {len(pages)} "
               f"message(s); new cursor {data['next_since']}"
               + (" (more: it asks again)" if data["more"] else "")
               + (f"; only the latest {', '.join(data['collapsed'])} per order" if data["collapsed"] else ""))
    for e in events:
        channel = e["topic"].split("/")[3] if e["topic"].count("/") >= 3 else "?"
        order = e["topic"].split("/")[2] if e["topic"].count("/") >= 2 else "?"
        click.echo(f"  seq {e['seq']:<7} {order:<10} order #{e.get('order_seq', '?')!s:<4} {channel:<8} "
                   f"{summarize(channel, e['payload'].get('sender', '?'), e['payload'])}")


@main.command()
@click.argument("user", required=False)
@json_option
@pass_ctx
def devices(ctx: Ctx, user: str | None, as_json: bool) -> None:
    """USER's devices (everyone's without USER): each one's last sync cursor and when it was last seen.

    fishim learns a device from its sync requests: the `since` it asks from is the seq up to which its
    app has taken everything (its last acknowledged cursor). A phone whose cursor lags far behind the
    store's last seq, or that has not been seen for long, has not caught up.

    \b
    Example:
      fishim devices rider7
      fishim replay rider7 --client-id rider7-phone   # what that phone would get now
    """
    from fishim.views import devices_view, fmt_age, fmt_time

    with reading(ctx) as store:
        data = devices_view(store, user)
    if as_json:
        emit_json(data)
        return
    if not data["devices"]:
        click.echo(f"no device of {user or 'anyone'} has synced yet")
        return
    now = now_ms()
    click.echo(f"{'user':<12} {'client id':<28} {'cursor':>10} {'behind':>8}  last seen")
    for d in data["devices"]:
        click.echo(f"{d['user']:<12} {d['client_id']:<28} {'seq ' + str(d['cursor']):>10} {d['behind']:>8}  "
                   f"{fmt_time(d['last_seen'])} ({fmt_age(now - d['last_seen'])} ago)")
    click.echo(f"store's last seq: {data['max_seq']}")


@main.command("mosquitto-acl")
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Directory for the `acl` and `passwd` files (created if missing).")
@click.option("--passwords-stdin", is_flag=True,
              help="Read NAME:PASSWORD lines from standard input for the password file.")
@pass_ctx
def mosquitto_acl(ctx: Ctx, out: Path, passwords_stdin: bool) -> None:
    """Write a Mosquitto 2 ACL and password file from the store's users and orders.

    The store keeps only argon2 hashes, so clear passwords come from stdin (each is checked against
    the store); the bridge's own account is read from its secret file. Users without a password are
    left out of `passwd`. Riders and customers get lines for their current orders only: rerun and
    send mosquitto SIGHUP after orders are placed or riders assigned (docs/security.md).

    \b
    Example:
      printf 'rider7:s3cret\\n' | fishim mosquitto-acl --out /etc/mosquitto/fishim --passwords-stdin
      # mosquitto.conf: acl_file /etc/mosquitto/fishim/acl
      #                 password_file /etc/mosquitto/fishim/passwd
    """
    from fishim.auth import service_secret_file
    from fishim.mosquitto_acl import PasswordMismatch, write_mosquitto_files

    passwords: dict[str, str] = {}
    if passwords_stdin:
        for number, line in enumerate(sys.stdin.read().splitlines(), 1):
            name, sep, password = line.partition(":")
            if line.strip() and (not sep or not name or not password):
                fail(f"stdin line {number}: expected NAME:PASSWORD")
            if sep:
                passwords[name] = password
    secret_file = service_secret_file(ctx.config.store.path)
    if secret_file.exists() and ctx.config.bridge.username not in passwords:
        passwords[ctx.config.bridge.username] = secret_file.read_text(encoding="utf-8").strip()
    with reading(ctx) as store:
        try:
            files = write_mosquitto_files(store, ctx.config.prefix, out, passwords)
        except PasswordMismatch as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"cannot write to {out}: {exc.strerror or exc}")
    click.echo(f"wrote {files.acl} and {files.passwd}")
    if files.without_password:
        click.echo(f"not in passwd (no password given, Mosquitto will refuse them): "
                   f"{', '.join(files.without_password)}", err=True)


@main.command("mosquitto-merge")
@click.option("--out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Directory for the merged `acl` and `passwd` files (created if missing).")
@click.argument("shops", nargs=-1, required=True, type=click.Path(path_type=Path, file_okay=False, exists=True))
def mosquitto_merge(out: Path, shops: tuple[Path, ...]) -> None:
    """Merge several shops' `fishim mosquitto-acl` directories into one, for one Mosquitto that
    carries them all (docs/tenants.md). Refuses account names used by two shops and prefixes that
    overlap; each shop keeps its own prefix, store and bridge.

    \b
    Example:
      fishim -c shop1.yaml mosquitto-acl --out /etc/fishim/shop1 --passwords-stdin < shop1.pw
      fishim -c shop2.yaml mosquitto-acl --out /etc/fishim/shop2 --passwords-stdin < shop2.pw
      fishim mosquitto-merge --out /etc/mosquitto/fishim /etc/fishim/shop1 /etc/fishim/shop2
    """
    from fishim.mosquitto_acl import MergeError, merge_mosquitto_files

    try:
        files = merge_mosquitto_files(list(shops), out)
    except MergeError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot merge into {out}: {exc.strerror or exc}")
    click.echo(f"wrote {files.acl} and {files.passwd} for {len(shops)} shops")


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench(args: tuple[str, ...]) -> None:
    """Benchmarks against stock amqtt and Mosquitto (the fishim.bench package; see `fishim bench --help`).

    \b
    Example:
      fishim bench --quick           # under a minute, rough figures
      fishim bench                   # full mode, for BENCHMARKS.md, on a quiet machine
    """
    from fishim.bench.cli import main as bench_main

    sys.exit(bench_main(list(args), prog="fishim bench"))


# the HTTP side's commands (keys, media gc, orders link, webhooks) live with it
from fishim.http.cli import register  # noqa: E402

register(main, orders)

if __name__ == "__main__":
    main()
