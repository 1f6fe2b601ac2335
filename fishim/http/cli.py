"""The owner's commands for the HTTP side: ``keys``, ``media gc``, ``orders link``, ``webhooks``.

Registered on the main ``fishim`` group by fishim.cli; same conventions (one line and exit 2 on a
problem a person can fix, ``--json`` for machines, shapes in docs/cli.md and docs/http.md).
"""

from __future__ import annotations

from datetime import datetime

import click

from fishim.cli import Ctx, emit_json, fail, json_option, pass_ctx, reading

DEFAULT_TTL = "24h"


@click.group()
def keys() -> None:
    """API keys for the shop's other systems (docs/http.md).

    \b
    Example:
      fishim keys add webshop        # prints the key once; store it in the web shop's settings
      fishim keys list
    """


@keys.command("add")
@click.argument("name")
@json_option
@pass_ctx
def keys_add(ctx: Ctx, name: str, as_json: bool) -> None:
    """Make (or replace) the key NAME and print it; only its SHA-256 is kept.

    \b
    Example:
      fishim keys add webshop
    """
    from fishim.http.keys import ApiKeyError, add_key
    from fishim.store import Store

    try:
        with Store(ctx.config.store.path) as store:
            key = add_key(store, name)
    except ApiKeyError as exc:
        fail(str(exc))
    if as_json:
        emit_json({"name": name, "key": key, "principal": f"key-{name}"})
        return
    click.echo(key)
    click.echo(f"key {name} saved; it is shown only now. Use it as 'Authorization: Bearer KEY'.", err=True)


@keys.command("list")
@json_option
@pass_ctx
def keys_list(ctx: Ctx, as_json: bool) -> None:
    """List API keys (names and dates, never the keys).

    \b
    Example:
      fishim keys list --json
    """
    from fishim.http.keys import list_keys

    with reading(ctx) as store:
        rows = [k.model_dump() for k in list_keys(store)]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no API keys (fishim keys add NAME)")
    for row in rows:
        used = _when(row["last_used_at"]) if row["last_used_at"] else "never"
        click.echo(f"{row['name']:<24} created {_when(row['created_at'])}  last used {used}")


@keys.command("remove")
@click.argument("name")
@pass_ctx
def keys_remove(ctx: Ctx, name: str) -> None:
    """Remove the key NAME; requests with it are refused at once.

    \b
    Example:
      fishim keys remove webshop
    """
    from fishim.http.keys import remove_key
    from fishim.store import Store

    with Store(ctx.config.store.path) as store:
        if not remove_key(store, name):
            fail(f"no key {name!r}")
    click.echo(f"key {name} removed")


@click.group()
def media() -> None:
    """Uploaded photos, voice notes and videos (kept under <db>.media/).

    \b
    Example:
      fishim media gc --min-age 2h
    """


@media.command("gc")
@click.option("--min-age", default="1h", show_default=True, metavar="DURATION",
              help="Keep unreferenced uploads younger than this (a chat usually follows its upload).")
@json_option
@pass_ctx
def media_gc(ctx: Ctx, min_age: str, as_json: bool) -> None:
    """Remove blobs that no stored chat message references.

    \b
    Example:
      fishim media gc
      fishim media gc --min-age 0s --json
    """
    from fishim.http.context import media_dir
    from fishim.http.media import collect_garbage
    from fishim.store import Store
    from fishim.views import parse_duration

    try:
        age = parse_duration(min_age)
    except ValueError as exc:
        fail(f"--min-age: {exc}")
    with reading(ctx):  # one-line errors for a missing or foreign store
        pass
    with Store(ctx.config.store.path) as store:
        report = collect_garbage(store, media_dir(ctx.config.store.path), age)
    if as_json:
        emit_json(report.model_dump())
        return
    click.echo(f"removed {report.removed} blobs ({report.removed_bytes} bytes), kept {report.kept}")


@click.command("link")
@click.argument("order_id", metavar="ID")
@click.option("--ttl", default=DEFAULT_TTL, show_default=True, metavar="DURATION",
              help="How long the link works (it also stops when the order is delivered or cancelled).")
@json_option
@pass_ctx
def orders_link(ctx: Ctx, order_id: str, ttl: str, as_json: bool) -> None:
    """Print the customer's tracking link for order ID.

    The token in it is also the MQTT-over-WebSocket password of user t-ID (the customer's rights on
    that order only).

    \b
    Example:
      fishim orders link o-1001 --ttl 2d
    """
    from fishim.http.tokens import FINISHED_STATES, load_secret, make_token
    from fishim.topics import tracking_user
    from fishim.views import parse_duration

    try:
        ttl_ms = parse_duration(ttl)
    except ValueError as exc:
        fail(f"--ttl: {exc}")
    if ttl_ms < 1000:
        fail("--ttl: at least 1s")
    base = _public_url(ctx)
    with reading(ctx) as store:
        order = store.get_order(order_id)
    if order is None:
        fail(f"no order {order_id!r}")
    if order.state in FINISHED_STATES:
        fail(f"order {order_id} is {order.state}: its tracking links no longer work")
    token = make_token(load_secret(ctx.config.store.path), order_id, ttl_ms // 1000)
    url = f"{base}/t/{token}"
    expires = int(token.split(".")[1])
    if as_json:
        emit_json({"order": order_id, "url": url, "token": token, "expires_at": expires * 1000,
                   "mqtt_user": tracking_user(order_id)})
        return
    click.echo(url)
    click.echo(f"expires {_when(expires * 1000)}; MQTT over WebSocket: user {tracking_user(order_id)}, "
               f"password = the token after /t/", err=True)


def _public_url(ctx: Ctx) -> str:
    config = ctx.config
    if config.http.public_url:
        return config.http.public_url.rstrip("/")
    listener = next((lst for lst in config.listeners if lst.type == "http"), None)
    if listener is None:
        fail("no http listener in broker.yaml (listeners: - {type: http, bind: ...}) and no http.public_url")
    host = f"[{listener.host}]" if ":" in listener.host else listener.host
    return f"{'https' if listener.tls else 'http'}://{host}:{listener.port}"


@click.command("webhooks")
@click.option("--state", type=click.Choice(["pending", "delivered", "failed"]), help="Only deliveries in this state.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1), help="The newest N.")
@json_option
@pass_ctx
def webhooks(ctx: Ctx, state: str | None, limit: int, as_json: bool) -> None:
    """Webhook deliveries: pending (with retries left), delivered, failed (given up).

    \b
    Example:
      fishim webhooks --state failed
    """
    from fishim.http.webhooks import list_rows

    with reading(ctx) as store:
        rows = [r.model_dump(exclude={"body"}) for r in list_rows(store, state, limit)]
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no webhook deliveries")
    for r in rows:
        tail = f"  next {_when(r['next_at'])}" if r["state"] == "pending" and r["attempts"] else ""
        err = f"  last error: {r['last_error']}" if r["last_error"] else ""
        click.echo(f"#{r['id']:<6} {r['state']:<9} {r['event']:<6} seq {r['seq']}  attempts {r['attempts']}  "
                   f"{r['url']}{tail}{err}")


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def register(main: click.Group, orders: click.Group) -> None:
    """Add these commands to the ``fishim`` command."""
    main.add_command(keys)
    main.add_command(media)
    main.add_command(webhooks)
    orders.add_command(orders_link)


__all__ = ["register"]
