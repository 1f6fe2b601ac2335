"""A rider's app in about 60 lines: fishim's client library does the hard parts.

It shows every event of the rider's orders once, each order's events in order (``order #``), keeps
each order's state from ``orders()``, tells the shop what the rider has read, and confirms pickup
when an order is assigned to the rider. Signal loss is handled by the library: on reconnect it
syncs from its saved cursor. One JSON line per thing shown, so a person or a test can read it::

    python examples/rider_app.py --port 1883 --user rider7 --cursor rider7.cursor   # Ctrl-D stops
    FISHIM_PASSWORD=... python examples/rider_app.py --user rider7
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

from fishim.client import ClientEvent, FishimClient, OrderView

_out = threading.Lock()


def show(kind: str, **fields: object) -> None:
    with _out:  # callbacks run on the client's threads
        sys.stdout.write(json.dumps({"show": kind, **fields}, ensure_ascii=False) + "\n")
        sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    parser.add_argument("--user", required=True)
    parser.add_argument("--cursor", type=Path, help="where to keep the sync cursor (default: memory)")
    args = parser.parse_args()
    client: FishimClient

    def on_event(event: ClientEvent) -> None:
        p = event.payload
        show("event", id=event.id, order=event.order, order_seq=event.order_seq, seq=event.seq,
             channel=event.channel, sender=p.get("sender"), text=p.get("text") or p.get("state"),
             source=event.source)
        if event.channel in ("status", "chat") and p.get("sender") != args.user:
            client.mark_read(event, wait=False)  # the shop's unread count for this rider drops
        if event.channel == "status" and p.get("state") == "assigned" and p.get("rider") == args.user:
            client.publish_status(event.order, "picked_up", note="on my way", wait=False)

    def on_order_changed(view: OrderView) -> None:
        show("order", order=view.order, state=view.state, pending=view.pending_state, unread=view.unread,
             order_seq=view.order_seq)

    client = FishimClient(args.host, args.port, args.user, os.environ.get("FISHIM_PASSWORD"),
                          cursor_path=args.cursor, on_event=on_event, on_order_changed=on_order_changed,
                          on_error=lambda e: show("error", id=e.id, error=e.error, detail=e.detail),
                          reconnect_delay=(1, 2))
    with client:
        client.subscribe_orders()
        show("ready", cursor=client.cursor)
        sys.stdin.read()  # until Ctrl-D (or the test closes our stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
