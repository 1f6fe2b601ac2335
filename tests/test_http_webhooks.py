"""Webhooks from the durable outbox, against a real ``fishim up`` and a real HTTP receiver.

Contract (docs/http.md): each subscribed event is POSTed as JSON with ``X-Fishim-Signature:
sha256=HEX``, the HMAC-SHA256 of the body with the receiver's secret; a receiver that is down gets
it once it is back, even across a restart of ``fishim up``; deliveries are listed by ``fishim
webhooks``. Also here (this stack has a low request limit): the per-address rate limit, 429.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from fishim.testing import free_port
from tests._http_shop import HttpShop

SECRET = "receiver-secret-0123456789"


class Receiver:
    """A tiny HTTP server that records every POST (headers and body) and answers 204."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.cond = threading.Condition()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.cond:
                    outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                    outer.cond.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, predicate: Any, timeout: float = 20.0) -> tuple[dict[str, str], bytes]:
        with self.cond:
            assert self.cond.wait_for(lambda: any(predicate(json.loads(b)) for _, b in self.requests), timeout), \
                f"no matching webhook within {timeout}s: {[b[:200] for _, b in self.requests]}"
            return next((h, b) for h, b in self.requests if predicate(json.loads(b)))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def wait_rows(shop: HttpShop, predicate: Any, timeout: float = 20.0) -> list[dict[str, Any]]:
    """``fishim webhooks --json`` until ``predicate(rows)`` holds (the dispatcher records each answer)."""
    deadline = time.monotonic() + timeout
    while True:
        result = shop.cli("webhooks", "--json")
        assert result.exit_code == 0, result.output
        rows = json.loads(result.stdout)
        if predicate(rows):
            return rows
        assert time.monotonic() < deadline, rows
        time.sleep(0.1)


def _config(url: str) -> dict[str, Any]:
    return {"webhooks": [{"url": url, "events": ["status", "chat"], "secret": SECRET, "backoff_s": 0.2,
                          "backoff_max_s": 1.0, "max_attempts": 50}],
            "http": {"requests_per_minute": 5}}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver(free_port())
    yield rec
    rec.close()


def test_webhook_reaches_receiver_signed(tmp_path: Path, receiver: Receiver) -> None:
    config = _config(f"http://127.0.0.1:{receiver.port}/hook")
    dead = f"http://127.0.0.1:{free_port()}/nobody"  # a second receiver that never answers: given up
    config["webhooks"].append({"url": dead, "events": ["status"], "secret": SECRET, "backoff_s": 0.1,
                               "max_attempts": 2})
    shop = HttpShop(tmp_path / "shop.db", config).start()
    try:
        shop.place("o-w1", "zhang")
        chat = shop.send("zhang", "o-w1", "chat", text="before 6pm?")
        headers, body = receiver.wait_for(lambda b: b["event"] == "status" and b["order"] == "o-w1")
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-fishim-signature"], expected)
        event = json.loads(body)
        assert event["payload"]["state"] == "placed" and event["topic"] == "fishim/orders/o-w1/status"
        receiver.wait_for(lambda b: b["event"] == "chat" and b["payload"]["id"] == chat)
        rows = wait_rows(shop, lambda rows: {r["event"] for r in rows if r["state"] == "delivered"} >= {"status",
                                                                                                        "chat"})
        rows = wait_rows(shop, lambda rows: any(r["url"] == dead and r["state"] == "failed" for r in rows))
        given_up = next(r for r in rows if r["url"] == dead)
        assert given_up["attempts"] == 2 and given_up["last_error"]
        assert SECRET not in json.dumps(rows) and SECRET not in shop.stack.log_text()

        # the per-address request limit (5 a minute here): the 6th request is refused
        with httpx.Client(base_url=shop.base) as client:
            answers = [client.get("/api/openapi.json").status_code for _ in range(6)]
            limited = client.get("/api/openapi.json")
        assert answers[:5] == [200] * 5
        assert (limited.status_code, limited.json()["error"]) == (429, "rate_limited")
        assert limited.headers["retry-after"] == "60"
    finally:
        shop.close()


def test_receiver_down_gets_webhook_after_restart(tmp_path: Path) -> None:
    port = free_port()
    db = tmp_path / "shop.db"
    config = _config(f"http://127.0.0.1:{port}/hook")
    shop = HttpShop(db, config).start()
    try:
        shop.place("o-w2", "li")
        # the dispatcher has tried and failed at least once; the delivery is still pending
        rows = wait_rows(shop, lambda rows: any(r["attempts"] >= 1 and r["state"] == "pending" for r in rows))
        assert rows[0]["last_error"]
    finally:
        shop.close()
    receiver = Receiver(port)
    try:
        again = HttpShop(db, config).start()  # a new `fishim up` on the same store
        try:
            headers, body = receiver.wait_for(lambda b: b["order"] == "o-w2" and b["payload"]["state"] == "placed")
            assert headers["x-fishim-signature"] == "sha256=" + hmac.new(SECRET.encode(), body,
                                                                          hashlib.sha256).hexdigest()
            wait_rows(again, lambda rows: [r["state"] for r in rows if r["event"] == "status"] == ["delivered"])
        finally:
            again.close()
    finally:
        receiver.close()
