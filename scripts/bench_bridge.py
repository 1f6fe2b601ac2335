"""Bridge ingest throughput: how fast a backlog of QoS-1 messages is stored and acknowledged.

A backlog is the bridge's hardest case and its cleanest measurement: the bridge subscribes once (so
Mosquitto keeps its session), stops, ``--messages`` chat messages over ``--orders`` orders are queued
for it, then a fresh in-process :class:`fishim.bridge.Bridge` is timed from ``start()`` until all of
them are committed and acked. Two more figures put it in context:

- ``writer_msgs_per_s``: the writer alone (parse, validate, dedup, rules, one transaction per batch of
  ``bridge.batch_max``), fed in-memory messages with no network;
- ``avg_batch``: messages per transaction during the drain (group commit at work).

Prints one JSON line (best of ``--runs``). Usage::

    .venv/bin/python scripts/bench_bridge.py --messages 20000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fishim.bridge import Bridge, _Inbound
from fishim.config import Config
from fishim.testing.mosquitto import Mosquitto
from fishim.testing.mqtt import connect_client, publish_and_wait

TS = 1_764_000_000_000


def _placed(order: str) -> bytes:
    return json.dumps({"id": f"placed-{order}", "ts": TS, "sender": "shop", "state": "placed",
                       "customer": "cust1", "items": [{"sku": "hook-6", "qty": 2}]}).encode()


def _chat(i: int) -> bytes:
    return json.dumps({"id": f"c{i}", "ts": TS, "sender": "cust1", "text": "x" * 120}).encode()


def drain(messages: int, orders: int) -> dict[str, float]:
    """Queue ``messages`` for a stopped bridge on Mosquitto, then time a new bridge storing them."""
    with tempfile.TemporaryDirectory() as tmp, Mosquitto() as broker:
        config = Config.model_validate({"store": {"path": str(Path(tmp) / "bench.db")}})
        url = f"mqtt://127.0.0.1:{broker.port}"
        with Bridge(config, url) as bridge, connect_client(broker.port) as shop:
            bridge.wait_ready()
            for o in range(orders):
                publish_and_wait(shop, f"fishim/orders/O{o}/status", _placed(f"O{o}"), retain=True)
            bridge.wait_for(lambda s: s.stored >= orders)
        with connect_client(broker.port) as shop:
            infos = [shop.publish(f"fishim/orders/O{i % orders}/chat/cust1", _chat(i), qos=1)
                     for i in range(messages)]
            for info in infos:
                info.wait_for_publish(60)
        started = time.perf_counter()
        with Bridge(config, url) as bridge:
            stats = bridge.wait_for(lambda s: s.stored >= messages, timeout=300)
            elapsed = time.perf_counter() - started
        return {"msgs_per_s": messages / elapsed, "avg_batch": stats.processed / stats.batches}


class _NoBroker:
    """Stands in for the paho client when only the writer is measured."""

    def ack(self, *_args: Any) -> None: ...

    def publish(self, *_args: Any, **_kwargs: Any) -> None: ...


def writer_only(messages: int, orders: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        config = Config.model_validate({"store": {"path": str(Path(tmp) / "bench.db")}})
        bridge = Bridge(config, "mqtt://127.0.0.1:1")
        bridge._client = _NoBroker()  # type: ignore[assignment]
        bridge._flush([_Inbound(f"fishim/orders/O{o}/status", _placed(f"O{o}"), 1, o + 1, 0) for o in range(orders)])
        batch = config.bridge.batch_max
        inbound = [_Inbound(f"fishim/orders/O{i % orders}/chat/cust1", _chat(i), 1, i % 65535 + 1, 0)
                   for i in range(messages)]
        started = time.perf_counter()
        for start in range(0, messages, batch):
            bridge._flush(inbound[start:start + batch])
        elapsed = time.perf_counter() - started
        bridge.store.close()
        return messages / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--orders", type=int, default=50)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    drains = [drain(args.messages, args.orders) for _ in range(args.runs)]
    best = max(drains, key=lambda r: r["msgs_per_s"])
    writer = max(writer_only(args.messages, args.orders) for _ in range(args.runs))
    result = {"messages": args.messages, "orders": args.orders, "broker": "mosquitto",
              "msgs_per_s": round(best["msgs_per_s"]), "avg_batch": round(best["avg_batch"]),
              "writer_msgs_per_s": round(writer)}
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
