"""A running ``fishim up`` with tcp, ws and http listeners, accounts and orders, for the HTTP tests.

Everything is real: ``python -m fishim up`` in a child process, the SQLite file, paho clients, httpx.
"""

from __future__ import annotations

import itertools
import json
import ssl
import time
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner

from fishim.auth import add_user
from fishim.cli import main as cli
from fishim.config import Config, TlsConfig
from fishim.store import Store
from fishim.testing import free_port
from fishim.testing.mqtt import MqttClient, connect_client, publish_and_wait
from fishim.testing.stack import Stack

PASSWORDS = {"boss": "pw-boss", "zhang": "pw-zhang", "li": "pw-li", "rider7": "pw-rider7", "scan1": "pw-scan1"}
ROLES = {"boss": "owner", "zhang": "customer", "li": "customer", "rider7": "rider", "scan1": "scanner"}
_ids = itertools.count(1)


class HttpShop:
    """``fishim up`` on ``db`` with an http and a ws listener; helpers to act as each account."""

    def __init__(self, db: Path, config: dict[str, Any] | None = None, tls: TlsConfig | None = None) -> None:
        self.db = db
        self.verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(tls.cert)) if tls else True
        if not db.exists():
            with Store(db) as store:
                for name, role in ROLES.items():
                    add_user(store, name, role, PASSWORDS[name])
        ports: set[int] = set()
        while len(ports) < 3:  # three distinct free ports: mqtt, http, ws
            ports.add(free_port())
        mqtt_port, self.http_port, self.ws_port = sorted(ports)
        self.config = Config.model_validate(config or {})
        self.stack = Stack(db, kind="embedded", config=self.config, probe=("boss", PASSWORDS["boss"]), port=mqtt_port,
                           extra_listeners=[{"name": "web", "type": "http", "bind": f"127.0.0.1:{self.http_port}",
                                             "tls": tls.model_dump(mode="json") if tls else None},
                                            {"name": "ws", "type": "ws", "bind": f"127.0.0.1:{self.ws_port}"}])
        self.config_file = self.stack.workdir / "broker.yaml"
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.http_port}"
        self._clients: dict[str, MqttClient] = {}

    def start(self) -> HttpShop:
        self.stack.start()
        return self

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        self.stack.close()

    # -- acting as someone ---------------------------------------------------------------------

    def mqtt(self, user: str) -> MqttClient:
        if user not in self._clients:
            self._clients[user] = connect_client(self.stack.port, username=user, password=PASSWORDS[user])
        return self._clients[user]

    def send(self, user: str, order: str, channel: str, retain: bool = False, **fields: Any) -> str:
        """Publish an envelope as ``user`` and wait until the store has it; returns its id."""
        ident = f"m{next(_ids)}-{time.monotonic_ns()}"
        topic = f"fishim/orders/{order}/{channel}" + (f"/{user}" if channel in ("chat", "receipts") else "")
        body = {"id": ident, "ts": int(time.time() * 1000), "sender": user, **fields}
        publish_and_wait(self.mqtt(user), topic, json.dumps(body), retain=retain)
        self.wait_stored(ident)
        return ident

    def place(self, order: str, customer: str) -> None:
        self.send("boss", order, "status", retain=True, state="placed", customer=customer,
                  items=[{"sku": "rod-3m", "qty": 1}])

    def wait_stored(self, event_id: str, timeout: float = 15.0) -> None:
        """Until the event is in the store (the store is the truth the HTTP side reads)."""
        deadline = time.monotonic() + timeout
        while True:
            with Store(self.db, readonly=True) as store:
                if store.has_event(event_id):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"event {event_id} not stored within {timeout}s\n{self.stack.log_tail()}")
            time.sleep(0.02)

    def http(self, user: str | None = None, token: str | None = None) -> httpx.Client:
        auth = httpx.BasicAuth(user, PASSWORDS[user]) if user else None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, auth=auth, headers=headers, timeout=15.0, verify=self.verify)

    def cli(self, *args: str) -> Any:
        result = CliRunner().invoke(cli, ["-c", str(self.config_file), *args], catch_exceptions=False)
        return result

    def link(self, order: str, ttl: str = "1h") -> dict[str, Any]:
        result = self.cli("orders", "link", order, "--ttl", ttl, "--json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)
