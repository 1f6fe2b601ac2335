"""The ``fishim`` command: run the broker and bridge, manage users, look inside orders.

Every error a person can act on is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from fishim.config import Config, ConfigError, load_config
from fishim.logs import setup_logging


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
            data["store"]["path"] = changes["db"]
        if changes.get("bind"):
            data["listeners"][0]["bind"] = changes["bind"]
        try:
            self._config = Config.model_validate(data)
        except ValueError as exc:
            fail(f"bad option: {str(exc).splitlines()[-1].strip()}")
        return self._config


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "-c", "config_path", type=click.Path(path_type=Path), envvar="FISHIM_CONFIG",
              default=None, help="broker.yaml to use (default ./broker.yaml, env FISHIM_CONFIG).")
@click.version_option(package_name="fishim")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None) -> None:
    """fishim: real-time order messaging for a tackle shop.

    \b
    Example:
      fishim up                      # embedded broker + bridge on broker.yaml
      fishim orders list --state delivering
    """
    ctx.obj = Ctx(config_path)


@main.command()
@click.option("--bind", help="HOST:PORT for the MQTT listener (env FISHIM_BIND).")
@click.option("--db", type=click.Path(path_type=Path), help="SQLite store path (env FISHIM_DB).")
@pass_ctx
def up(ctx: Ctx, bind: str | None, db: Path | None) -> None:
    """Run the embedded broker and the bridge together.

    \b
    Example:
      fishim up --bind 127.0.0.1:1883 --db shop.db
    """
    from fishim.service import run_up

    config = ctx.override(bind=bind, db=db)
    setup_logging(config.logging)
    sys.exit(run_up(config))


@main.command()
@click.option("--bind", help="HOST:PORT for the MQTT listener (env FISHIM_BIND).")
@click.option("--db", type=click.Path(path_type=Path), help="SQLite store path (env FISHIM_DB).")
@pass_ctx
def broker(ctx: Ctx, bind: str | None, db: Path | None) -> None:
    """Run only the embedded broker.

    \b
    Example:
      fishim broker --bind 127.0.0.1:1883
    """
    from fishim.service import run_broker_only

    config = ctx.override(bind=bind, db=db)
    setup_logging(config.logging)
    sys.exit(run_broker_only(config))


@main.command()
@click.option("--broker", "broker_url", help="mqtt://[user:pass@]HOST:PORT (default: the embedded broker).")
@click.option("--db", type=click.Path(path_type=Path), help="SQLite store path (env FISHIM_DB).")
@pass_ctx
def bridge(ctx: Ctx, broker_url: str | None, db: Path | None) -> None:
    """Run only the bridge: persist, validate, serve sync.

    \b
    Example:
      fishim bridge --broker mqtt://127.0.0.1:1883
    """
    from fishim.bridge import run_bridge

    config = ctx.override(db=db)
    setup_logging(config.logging)
    sys.exit(run_bridge(config, broker_url))


@main.group()
def users() -> None:
    """Manage accounts (owner, staff, rider, customer, scanner)."""


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
    from fishim.store import Store

    password = sys.stdin.readline().rstrip("\r\n") if password_stdin else click.prompt(
        "Password", hide_input=True, confirmation_prompt=True)
    try:
        with Store(ctx.config.store.path) as store:
            add_user(store, name, role, password)
    except UserError as exc:
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

    from fishim.store import Store, StoreError

    try:
        with Store(ctx.config.store.path, readonly=True) as store:
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
    from fishim.store import Store

    with Store(ctx.config.store.path) as store:
        if not store.remove_user(name):
            fail(f"no user {name!r}")
    click.echo(f"user {name} removed")


if __name__ == "__main__":
    main()
