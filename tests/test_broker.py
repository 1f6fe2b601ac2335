"""EmbeddedBroker: retained privacy, persistent sessions, redelivery, QoS, ACL hooks, API, amqtt pin.

Every test runs the real broker on a kernel-chosen 127.0.0.1 port and talks to it with real
paho-mqtt clients or raw sockets. "Nothing else arrived" is shown with a marker: one session's
messages arrive in order, so a leak would show up before the marker.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

import amqtt
import pytest
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.protocol.handler import ProtocolHandler

from fishim.auth import Principal
from fishim.broker import AllowAll, EmbeddedBroker, LoopbackAnonymous
from fishim.broker import core as broker_amqtt
from fishim.broker.core import FishimBroker, FishimHandler, state_of
from fishim.config import ListenerConfig
from fishim.testing.proxy import Proxy

A1, B2, C3 = "fishim/orders/A1", "fishim/orders/B2", "fishim/orders/C3"


class Users:
    """Authenticator: name -> (password, role)."""

    def __init__(self, **accounts: tuple[str, str]) -> None:
        self.accounts = accounts

    def authenticate(self, username: str | None, password: str | None, peer: str,
                     listener: ListenerConfig) -> Principal | None:
        account = self.accounts.get(username or "")
        if account is None or account[0] != password:
            return None
        return Principal(username=username, role=account[1])


class OrderAcl:
    """Authorizer: staff everything; others only orders listed for them, or a '+' filter over orders."""

    def __init__(self, orders: dict[str, set[str]]) -> None:
        self.orders = orders

    def _order_allowed(self, principal: Principal, topic: str) -> bool:
        if principal.role == "staff":
            return True
        parts = topic.split("/")
        return len(parts) > 2 and parts[2] in self.orders.get(principal.username or "", set())

    def may_publish(self, principal: Principal, topic: str) -> bool:
        return self._order_allowed(principal, topic)

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        return topic_filter.startswith("fishim/orders/+/") or self._order_allowed(principal, topic_filter)

    def may_receive(self, principal: Principal, topic: str) -> bool:
        return self._order_allowed(principal, topic)


USERS = Users(staff=("staff-pw", "staff"), rider=("rider-pw", "rider"), bob=("bob-pw", "rider"))


def acl_broker(factory: Callable[..., object], orders: dict[str, set[str]], **kwargs: object):
    return factory(authenticator=USERS, authorizer=OrderAcl(orders), **kwargs)


def login(paho: Callable[..., object], port: int, name: str, client_id: str | None = None, **kwargs: object):
    return paho(port, client_id or f"{name}-1", username=name, password=f"{name}-pw", **kwargs)


# -- 1. retained messages only to subscribers that may read them ----------------------------------


def test_no_retained_messages_on_connect_for_filters_other_clients_subscribed(embedded_broker, paho):
    port = embedded_broker.port
    staff = paho(port, "staff")
    assert staff.subscribe("fishim/orders/#") == 1  # amqtt replays retained for every filter anyone has
    staff.publish(f"{A1}/status", b'{"state":"placed"}', retain=True)
    phone = paho(port, "phone-b", clean_session=False)
    assert phone.subscribe(f"{B2}/#") == 1
    phone.close()
    phone = paho(port, "phone-b", clean_session=False)  # a persistent reconnect: still nothing replayed
    assert phone.session_present
    staff.publish(f"{B2}/status", b"marker")
    assert [m.topic for m in phone.until(f"{B2}/status")] == [f"{B2}/status"]


def test_retained_sent_on_subscribe_only_if_receive_allowed(embedded_broker_factory, paho):
    broker = acl_broker(embedded_broker_factory, {"rider": {"B2"}})
    staff = login(paho, broker.port, "staff")
    staff.publish(f"{A1}/status", b"a1", retain=True)
    staff.publish(f"{B2}/status", b"b2", retain=True)
    rider = login(paho, broker.port, "rider")
    assert rider.subscribe("fishim/orders/+/status") == 1
    retained = rider.get()
    assert (retained.topic, retained.payload, retained.retain) == (f"{B2}/status", b"b2", True)
    staff.publish(f"{A1}/status", b"live-a1")  # live deliveries are receive-checked too
    staff.publish(f"{B2}/status", b"marker")
    got = rider.until(f"{B2}/status")
    assert [(m.payload, m.retain) for m in got] == [(b"marker", False)]


# -- 2. persistent sessions, anonymous ones included --------------------------------------------


def test_persistent_anonymous_session_keeps_its_queue_with_session_present(embedded_broker, paho):
    port = embedded_broker.port
    phone = paho(port, "phone-1", clean_session=False)
    assert not phone.session_present
    assert phone.subscribe(f"{A1}/#") == 1
    phone.close()
    embedded_broker.wait_until(lambda: embedded_broker.broker.sessions_connected() == 0)
    assert embedded_broker.broker.core._session_monitor_task.done()  # amqtt's anonymous-session reaper
    staff = paho(port, "staff")
    for n in range(3):
        staff.publish(f"{A1}/chat/staff", f"m{n}".encode())
    phone = paho(port, "phone-1", clean_session=False)
    assert phone.session_present
    staff.publish(f"{A1}/status", b"marker")
    assert [m.payload for m in phone.until(f"{A1}/status")] == [b"m0", b"m1", b"m2", b"marker"]


def test_clean_session_connect_replaces_the_persistent_session(embedded_broker, paho):
    port = embedded_broker.port
    phone = paho(port, "phone-3", clean_session=False)
    phone.subscribe(f"{A1}/#")
    phone.close()
    embedded_broker.wait_until(lambda: embedded_broker.broker.sessions_connected() == 0)
    staff = paho(port, "staff")
    staff.publish(f"{A1}/chat/staff", b"queued for the old session")
    phone = paho(port, "phone-3", clean_session=True)
    assert not phone.session_present
    phone.subscribe(f"{B2}/#")
    staff.publish(f"{A1}/chat/staff", b"old subscription is gone")
    staff.publish(f"{B2}/status", b"marker")
    assert [m.payload for m in phone.until(f"{B2}/status")] == [b"marker"]
    phone.close()
    embedded_broker.wait_until(lambda: embedded_broker.broker.sessions_connected() == 1)
    phone = paho(port, "phone-3", clean_session=False)
    assert not phone.session_present  # the clean session ended with its connection


def test_offline_queue_is_bounded_and_the_drop_is_logged(embedded_broker_factory, paho, caplog):
    caplog.set_level(logging.INFO, logger="fishim.broker")
    broker = embedded_broker_factory(limits={"max_queued": 3})
    phone = paho(broker.port, "phone-2", clean_session=False)
    phone.subscribe(f"{A1}/#")
    phone.close()
    broker.wait_until(lambda: broker.broker.sessions_connected() == 0)
    staff = paho(broker.port, "staff")
    for n in range(5):
        staff.publish(f"{A1}/chat/staff", f"m{n}".encode())
    phone = paho(broker.port, "phone-2", clean_session=False)
    staff.publish(f"{A1}/status", b"marker")
    assert [m.payload for m in phone.until(f"{A1}/status")] == [b"m0", b"m1", b"m2", b"marker"]
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "client_id=phone-2" in r.getMessage()]
    assert any("dropped=2" in line for line in warnings), warnings


def test_same_client_id_takes_over_and_resumes_the_session(embedded_broker, paho, raw_mqtt):
    old = raw_mqtt(embedded_broker.port)
    assert old.connect("phone-4", clean=False) == (False, 0)
    old.subscribe(f"{A1}/#")
    new = paho(embedded_broker.port, "phone-4", clean_session=False)  # [MQTT-3.1.4-2]
    assert new.session_present
    assert old.closed_by_broker()
    paho(embedded_broker.port, "staff").publish(f"{A1}/status", b"to the new connection")
    assert new.get().payload == b"to the new connection"


@pytest.mark.parametrize("half_open", [False, True], ids=["stalled", "half-open"])
def test_takeover_of_a_silent_connection_resumes_delivery(embedded_broker, paho, raw_mqtt, half_open):
    """The old link still looks open to the broker (a proxy stopped forwarding; with half_open the
    phone's side is gone too): the same client id connecting again takes the session over."""
    port = embedded_broker.port
    with Proxy("127.0.0.1", port) as proxy:
        old = raw_mqtt(proxy.port)
        assert old.connect("phone-6", clean=False) == (False, 0)
        assert old.subscribe(f"{A1}/#") == 1
        proxy.stall()
        if half_open:
            old.abort()  # the stalled proxy never passes the RST on
        new = paho(port, "phone-6", clean_session=False)
        assert new.session_present
        paho(port, "staff").publish(f"{A1}/status", b"after takeover", qos=1)
        received = new.get()
        assert (received.payload, received.qos) == (b"after takeover", 1)


def test_takeover_with_a_qos1_delivery_in_flight_resends_it_to_the_new_connection(embedded_broker, paho, raw_mqtt):
    port = embedded_broker.port
    staff = paho(port, "staff")
    with Proxy("127.0.0.1", port) as proxy:
        old = raw_mqtt(proxy.port)
        assert old.connect("scanner-9", clean=False) == (False, 0)
        assert old.subscribe(f"{C3}/#") == 1
        staff.publish(f"{C3}/picks", b"in flight")
        first = old.read()
        assert first is not None and first.publish[2] == b"in flight"  # never PUBACKed
        proxy.stall()
        new = raw_mqtt(port)
        assert new.connect("scanner-9", clean=False) == (True, 0)
        again = new.read()
        assert again is not None and again.dup and again.publish == first.publish
        new.puback(again.publish[1])
        staff.publish(f"{C3}/picks", b"next")
        following = new.read()
        assert following is not None and following.publish[2] == b"next" and not following.dup


def test_connection_lost_right_after_connect_is_noticed(embedded_broker, paho, raw_mqtt, wire, caplog, monkeypatch):
    """A link that dies while the broker is still answering CONNECT (a phone reconnecting through a
    dying network) ends like any other: will published, session free for the next connection.

    The broker is held after CONNACK, before its reader starts, until the phone's RST is on the wire,
    so every attempt takes that path (no race to win)."""
    caplog.set_level(logging.INFO, logger="fishim.broker")
    port = embedded_broker.port
    reached, held = threading.Event(), []  # held: the asyncio.Event releasing the one held handler
    original_start = FishimHandler.start

    async def start(self: FishimHandler) -> None:
        if self.session is not None and self.session.client_id == "phone-7" and not held:
            release = asyncio.Event()
            held.append(release)
            reached.set()
            await release.wait()  # the test has reset the connection by now
        await original_start(self)

    monkeypatch.setattr(FishimHandler, "start", start)
    witness = paho(port, "witness")
    witness.subscribe(f"{B2}/status")
    for attempt in range(3):
        reached.clear()
        held.clear()
        doomed = raw_mqtt(port)
        doomed.send(wire.connect("phone-7", clean=False, will=(f"{B2}/status", f"gone {attempt}".encode()))
                    + wire.subscribe(f"{A1}/#"))
        assert reached.wait(5), "the broker never got to the point between CONNACK and its reader"
        doomed.abort()  # RST while the broker is between CONNACK and reading
        embedded_broker.loop.call_soon_threadsafe(held[0].set)
        assert witness.get().payload == f"gone {attempt}".encode()
    held.append(asyncio.Event())  # no more holding: the next phone-7 connects normally
    new = paho(port, "phone-7", clean_session=False)
    assert new.session_present
    new.subscribe(f"{A1}/#")
    paho(port, "staff").publish(f"{A1}/status", b"delivered")
    assert new.get().payload == b"delivered"
    assert "takeover_timeout" not in caplog.text


def test_takeover_timeout_still_hands_the_session_over_cleanly(embedded_broker, paho, raw_mqtt, monkeypatch,
                                                               caplog):
    """An old connection whose teardown hangs is given up on after the takeover timeout; when it
    finally finishes, it must not detach, disconnect or otherwise touch the new connection's session."""
    caplog.set_level(logging.INFO, logger="fishim.broker")
    monkeypatch.setattr(broker_amqtt, "_TEARDOWN_TIMEOUT", 0.2)
    port, core = embedded_broker.port, embedded_broker.broker.core
    staff = paho(port, "staff")
    old = raw_mqtt(port)
    assert old.connect("phone-8", clean=False) == (False, 0)
    assert old.subscribe(f"{A1}/#") == 1
    hung = embedded_broker.run(lambda: core.sessions["phone-8"][1])
    release = asyncio.Event()
    original_stop = FishimHandler.stop

    async def stop(self: FishimHandler) -> None:
        if self is hung:
            await release.wait()
        await original_stop(self)

    monkeypatch.setattr(FishimHandler, "stop", stop)
    new = paho(port, "phone-8", clean_session=False)
    assert new.session_present and "takeover_timeout" in caplog.text
    staff.publish(f"{A1}/status", b"one")
    assert new.get().payload == b"one"
    embedded_broker.run(release.set)
    embedded_broker.wait_until(lambda: len(core._connections) == 2)  # the old connection has finished
    staff.publish(f"{A1}/status", b"two")
    assert new.get().payload == b"two"
    assert embedded_broker.run(lambda: core.sessions["phone-8"][0].transitions.is_connected())
    assert embedded_broker.run(embedded_broker.broker.sessions_connected) == 2


def test_refused_connect_does_not_touch_the_session_it_names(embedded_broker_factory, paho):
    broker = acl_broker(embedded_broker_factory, {"rider": {"A1"}})
    rider = login(paho, broker.port, "rider", "rider-phone", clean_session=False)
    rider.subscribe(f"{A1}/#")
    # amqtt deleted (clean) or took over the session before checking credentials
    intruder = paho(broker.port, "rider-phone", clean_session=True, username="rider", password="guess")
    assert intruder.refused
    login(paho, broker.port, "staff").publish(f"{A1}/status", b"still delivered")
    assert rider.get().payload == b"still delivered"
    assert not rider.disconnected.is_set()


# -- 3. QoS-1 redelivery with DUP=1 --------------------------------------------------------------


def test_unacknowledged_qos1_resent_with_dup_when_session_reconnects(embedded_broker, paho, raw_mqtt):
    port = embedded_broker.port
    scanner = raw_mqtt(port)
    assert scanner.connect("scanner-7", clean=False) == (False, 0)
    assert scanner.subscribe(f"{C3}/#", qos=1) == 1
    staff = paho(port, "staff")
    staff.publish(f"{C3}/picks", b"one")
    staff.publish(f"{C3}/picks", b"two")
    first = [scanner.read(), scanner.read()]
    assert all(p is not None and p.type == 3 and not p.dup for p in first)
    scanner.abort()  # never PUBACKed, no DISCONNECT

    scanner = raw_mqtt(port)
    assert scanner.connect("scanner-7", clean=False) == (True, 0)
    again = [scanner.read(), scanner.read()]
    assert [p.publish for p in again] == [p.publish for p in first]  # same packet ids, same payloads
    assert all(p.dup for p in again)
    for packet in again:
        scanner.puback(packet.publish[1])
    staff.publish(f"{C3}/picks", b"three")
    third = scanner.read()
    assert third is not None and third.publish[2] == b"three" and not third.dup


def test_unacknowledged_qos1_resent_after_retry_interval(embedded_broker_factory, paho, raw_mqtt):
    broker = embedded_broker_factory(broker={"retry_interval": 0.2})
    scanner = raw_mqtt(broker.port)
    scanner.connect("scanner-8", clean=False)
    scanner.subscribe(f"{C3}/#")
    paho(broker.port, "staff").publish(f"{C3}/picks", b"one")
    first, again = scanner.read(), scanner.read()
    assert first is not None and again is not None
    assert again.publish == first.publish and again.dup and not first.dup


# -- 4. delivery QoS = min(publish, subscription) ------------------------------------------------


def test_delivery_qos_is_the_minimum_of_publish_and_subscription(embedded_broker, paho):
    port = embedded_broker.port
    low, high = paho(port, "sub-qos0"), paho(port, "sub-qos1")
    assert low.subscribe(f"{A1}/#", qos=0) == 0
    assert high.subscribe(f"{A1}/#", qos=2) == 1  # fishim grants at most QoS 1
    staff = paho(port, "staff")
    staff.publish(f"{A1}/location", b"q0", qos=0)
    staff.publish(f"{A1}/location", b"q1", qos=1)
    assert [(m.payload, m.qos) for m in (low.get(), low.get())] == [(b"q0", 0), (b"q1", 0)]
    assert [(m.payload, m.qos) for m in (high.get(), high.get())] == [(b"q0", 0), (b"q1", 1)]


# -- 4b. one client's packets take effect in the order they were sent ------------------------------


def test_unsubscribe_then_subscribe_back_to_back_stays_subscribed(embedded_broker, paho):
    port = embedded_broker.port
    phone = paho(port, "phone-9")
    assert phone.subscribe(f"{A1}/#") == 1
    staff = paho(port, "staff")
    for n in range(20):
        phone.client.unsubscribe(f"{A1}/#")  # no wait for UNSUBACK, as an app re-subscribing does
        assert phone.subscribe(f"{A1}/#") == 1
        staff.publish(f"{A1}/status", f"m{n}".encode())
        assert phone.get().payload == f"m{n}".encode(), f"round {n}"


def test_subscribe_unsubscribe_and_publish_apply_in_arrival_order(embedded_broker, raw_mqtt, wire):
    """Packets sent in one burst (one TCP segment) are applied one after another [MQTT-4.6.0]."""
    topic, marker = f"{A1}/chat/x", f"{B2}/status"

    def unsubscribe(packet_id: int) -> bytes:
        return wire.packet(0xA2, packet_id.to_bytes(2, "big") + wire.string(topic))

    client = raw_mqtt(embedded_broker.port)
    assert client.connect("ordered") == (False, 0)
    client.send(wire.subscribe(topic, 1, 1) + wire.publish(topic, b"one", qos=1, packet_id=2)
                + unsubscribe(3) + wire.subscribe(topic, 1, 4) + wire.publish(topic, b"two", qos=1, packet_id=5)
                + unsubscribe(6) + wire.publish(topic, b"three", qos=1, packet_id=7)
                + wire.subscribe(marker, 1, 8) + wire.publish(marker, b"marker", qos=1, packet_id=9))
    acks, received = [], []
    while len(acks) < 9 or not received or received[-1] != b"marker":
        packet = client.read()
        assert packet is not None, (acks, received)
        if packet.type == 3:
            received.append(packet.publish[2])
            client.puback(packet.publish[1])
        else:
            acks.append((packet.type, int.from_bytes(packet.body[:2], "big")))
    assert received == [b"one", b"two", b"marker"]
    # PUBACKs are written by the reader, SUBACK/UNSUBACK by the session's outbox: each in order
    assert [ack for ack in acks if ack[0] == 4] == [(4, 2), (4, 5), (4, 7), (4, 9)]
    assert [ack for ack in acks if ack[0] != 4] == [(9, 1), (11, 3), (9, 4), (11, 6), (9, 8)]


def test_retained_messages_of_a_subscribe_come_before_anything_published_after_it(embedded_broker, paho,
                                                                                  raw_mqtt, wire):
    """SUBACK, then the retained state, then newer messages: never a stale status after a fresh one."""
    paho(embedded_broker.port, "staff").publish(f"{A1}/status", b"old", retain=True)
    client = raw_mqtt(embedded_broker.port)
    assert client.connect("fresh") == (False, 0)
    client.send(wire.subscribe(f"{A1}/status", 1, 1) + wire.publish(f"{A1}/status", b"new", qos=0))
    packets = [client.read() for _ in range(3)]
    assert all(p is not None for p in packets)
    assert [(p.type, p.flags & 1) for p in packets] == [(9, 0), (3, 1), (3, 0)]
    assert [p.publish[2] for p in packets[1:]] == [b"old", b"new"]


def test_suback_is_not_held_behind_a_full_in_flight_window(embedded_broker_factory, paho, raw_mqtt):
    broker = embedded_broker_factory(broker={"max_inflight": 1})
    client = raw_mqtt(broker.port)
    assert client.connect("slow-acker") == (False, 0)
    assert client.subscribe(f"{A1}/#") == 1
    staff = paho(broker.port, "staff")
    staff.publish(f"{A1}/chat/staff", b"one")
    staff.publish(f"{A1}/chat/staff", b"two")
    first = client.read()
    assert first is not None and first.publish[2] == b"one"  # not acknowledged: "two" has to wait
    assert client.subscribe(f"{B2}/#", packet_id=2) == 1  # the next packet is the SUBACK
    client.puback(first.publish[1])
    second = client.read()
    assert second is not None and second.publish[2] == b"two"


def test_retain_flag_honoured_only_on_retained_channels(embedded_broker, paho):
    """docs/protocol.md: status, location and receipts are retained; a client setting retain on chat or
    picks gets them delivered live but not kept for later subscribers."""
    port = embedded_broker.port
    live = paho(port, "live")
    live.subscribe(f"{A1}/#")
    staff = paho(port, "staff")
    for leaf in ("chat/staff", "picks", "status", "location", "receipts/staff"):
        staff.publish(f"{A1}/{leaf}", leaf.encode(), retain=True)
    assert [m.payload for m in live.until(f"{A1}/receipts/staff")] == [
        b"chat/staff", b"picks", b"status", b"location", b"receipts/staff"]
    late = paho(port, "late")
    late.subscribe(f"{A1}/#")
    late.subscribe(f"{B2}/chat/+")
    staff.publish(f"{B2}/chat/staff", b"marker")
    retained = {m.payload for m in late.until(f"{B2}/chat/staff")}
    assert retained == {b"status", b"location", b"receipts/staff", b"marker"}


# -- 9. authentication and authorisation hooks ---------------------------------------------------


def test_authenticator_decides_and_passwords_are_never_logged(embedded_broker_factory, paho, caplog):
    caplog.set_level(logging.DEBUG, logger="fishim.broker")
    broker = acl_broker(embedded_broker_factory, {})
    refused = paho(broker.port, "intruder", username="staff", password="guess-pw")
    assert refused.refused
    anonymous = paho(broker.port, "nobody")
    assert anonymous.refused
    staff = login(paho, broker.port, "staff", "staff-phone")
    assert not staff.refused
    principal = broker.run(lambda: state_of(broker.broker.core.sessions["staff-phone"][0]).principal)
    assert principal == Principal(username="staff", role="staff")
    assert "guess-pw" not in caplog.text and "staff-pw" not in caplog.text
    assert "connect_refused" in caplog.text and "reason=not_authorized" in caplog.text


def test_loopback_anonymous_accepts_only_loopback_listeners():
    auth = LoopbackAnonymous()
    assert auth.authenticate(None, None, "127.0.0.1:5000", ListenerConfig(bind="127.0.0.1:1883")) == Principal()
    assert auth.authenticate("x", "y", "10.0.0.9:5000", ListenerConfig(bind="0.0.0.0:1883")) is None
    assert auth.authenticate(None, None, "10.0.0.9:5000", ListenerConfig(bind="192.168.1.5:1883")) is None
    allow = AllowAll()
    assert allow.may_publish(Principal(), "t") and allow.may_subscribe(Principal(), "#")
    assert allow.may_receive(Principal(), "t")


def test_refused_publish_is_acked_not_delivered_and_reported(embedded_broker_factory, paho, caplog):
    caplog.set_level(logging.INFO, logger="fishim.broker")
    reported: list[tuple[Principal, str, str]] = []
    seen = threading.Event()

    def on_refused(principal: Principal, topic: str, reason: str) -> None:
        reported.append((principal, topic, reason))
        seen.set()

    broker = acl_broker(embedded_broker_factory, {"rider": {"B2"}}, on_refused=on_refused)
    staff = login(paho, broker.port, "staff")
    staff.subscribe("fishim/orders/#")
    rider = login(paho, broker.port, "rider")
    rider.publish(f"{A1}/chat/rider", b"not my order", qos=1)  # returns only once PUBACKed
    assert seen.wait(5)
    assert reported == [(Principal(username="rider", role="rider"), f"{A1}/chat/rider", "forbidden")]
    rider.publish(f"{B2}/chat/rider", b"marker")
    assert [m.payload for m in staff.until(f"{B2}/chat/rider")] == [b"marker"]
    assert any("publish_refused" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)


def test_receive_check_applies_to_offline_queued_messages(embedded_broker_factory, paho):
    orders = {"rider": {"B2", "C3"}}
    broker = acl_broker(embedded_broker_factory, orders)
    rider = login(paho, broker.port, "rider", clean_session=False)
    rider.subscribe("fishim/orders/+/status")
    rider.close()
    broker.wait_until(lambda: broker.broker.sessions_connected() == 0)
    staff = login(paho, broker.port, "staff")
    staff.publish(f"{A1}/status", b"never allowed")
    staff.publish(f"{B2}/status", b"allowed when queued")
    broker.run(lambda: orders["rider"].discard("B2"))  # rider unassigned from B2 while offline
    rider = login(paho, broker.port, "rider", clean_session=False)
    assert rider.session_present
    staff.publish(f"{C3}/status", b"marker")
    assert [m.payload for m in rider.until(f"{C3}/status")] == [b"marker"]


def test_will_on_a_forbidden_topic_refuses_the_connection(embedded_broker_factory, paho):
    broker = acl_broker(embedded_broker_factory, {"rider": {"B2"}})
    assert login(paho, broker.port, "rider", will=(f"{A1}/status", b"gone")).refused
    assert not login(paho, broker.port, "rider", "rider-2", will=(f"{B2}/status", b"gone")).refused


def test_another_user_cannot_resume_someone_elses_session(embedded_broker_factory, paho):
    """The client id belongs to the rider's session: bob gets CONNACK 0x02 and the rider's queue
    is untouched (see tests/test_security_sessions.py for takeover and clean-session attempts)."""
    broker = acl_broker(embedded_broker_factory, {"rider": {"B2"}, "bob": {"B2"}})
    rider = login(paho, broker.port, "rider", "shared-id", clean_session=False)
    rider.subscribe(f"{B2}/#")
    rider.close()
    broker.wait_until(lambda: broker.broker.sessions_connected() == 0)
    staff = login(paho, broker.port, "staff")
    staff.publish(f"{B2}/chat/staff", b"for rider only")
    bob = login(paho, broker.port, "bob", "shared-id", clean_session=False)
    assert bob.refused and "identifier" in bob.reason.lower()
    rider = login(paho, broker.port, "rider", "shared-id", clean_session=False)
    assert rider.session_present
    assert rider.get().payload == b"for rider only"


# -- 8. no default plugins, no per-delivery tasks -------------------------------------------------


def test_only_fishim_code_runs_no_amqtt_default_plugins(embedded_broker, paho):
    core = embedded_broker.broker.core
    assert core.plugins_manager.plugins == []
    for name in ("EventLoggerPlugin", "PacketLoggerPlugin", "BrokerSysPlugin", "AnonymousAuthPlugin"):
        assert core.plugins_manager.get_plugin(name) is None
    sub = paho(embedded_broker.port, "sub")
    sub.subscribe(f"{A1}/#")
    staff = paho(embedded_broker.port, "staff")
    for n in range(50):
        staff.publish(f"{A1}/chat/staff", str(n).encode())
    assert [m.payload for m in sub.until(f"{A1}/chat/staff")] == [b"0"]
    assert [sub.get().payload for _ in range(49)][-1] == b"49"
    # amqtt's delivery path queues a broadcast and a task per delivery; fishim's routes directly
    assert embedded_broker.run(lambda: (core._broadcast_queue.qsize(), len(core._tasks_queue))) == (0, 0)


# -- 11. public API -------------------------------------------------------------------------------


def test_internal_publish_and_sessions_connected(embedded_broker, paho):
    broker = embedded_broker.broker
    sub = paho(embedded_broker.port, "sub")
    sub.subscribe("fishim/errors/+")
    other = paho(embedded_broker.port, "other")
    assert embedded_broker.run(broker.sessions_connected) == 2
    assert embedded_broker.call(broker.publish("fishim/errors/alice", b'{"error":"forbidden"}')) == 1
    message = sub.get()
    assert (message.topic, message.payload, message.qos) == ("fishim/errors/alice", b'{"error":"forbidden"}', 1)
    embedded_broker.call(broker.publish("fishim/orders/A1/status", b"r", qos=0, retain=True))
    sub.subscribe("fishim/orders/+/status")
    assert sub.get().retain
    other.close()
    embedded_broker.wait_until(lambda: broker.sessions_connected() == 1)
    with pytest.raises(ValueError):
        embedded_broker.call(broker.publish("fishim/orders/#", b"x"))


def test_stop_closes_sessions_and_listener(embedded_broker_factory, paho, raw_mqtt):
    broker = embedded_broker_factory()
    port = broker.port
    client = paho(port, "phone", clean_session=False)
    broker.run(broker.broker.stop_accepting)
    with pytest.raises(ConnectionRefusedError):
        raw_mqtt(port)
    client.publish("fishim/orders/A1/status", b"still connected")
    broker.call(broker.broker.stop(), timeout=15)
    assert client.disconnected.wait(5)
    assert broker.run(broker.broker.sessions_connected) == 0


def test_fishim_broker_stops_cleanly_on_sigterm(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "fishim", "broker", "--bind", "127.0.0.1:0", "--db",
                             str(tmp_path / "b.db")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # blocks until the broker logs that it is up
            if "broker_started" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "broker_stopped" in err and "Traceback" not in err


# -- 12. amqtt pin guard --------------------------------------------------------------------------

# The amqtt internals fishim overrides or calls, with the signatures it was written against.
AMQTT_INTERNALS = {
    (Broker, "_start_listeners"): "(self) -> None",
    (Broker, "_client_connected"): "(self, listener_name: str, reader: amqtt.adapters.ReaderAdapter, "
                                   "writer: amqtt.adapters.WriterAdapter) -> None",
    (Broker, "_session_monitor"): "(self) -> None",
    (Broker, "_client_message_loop"): "(self, client_session: amqtt.session.Session, "
                                      "handler: amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler) -> None",
    (Broker, "_handle_disconnect"): "(self, client_session: amqtt.session.Session, handler: "
                                    "amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler, "
                                    "disconnect_waiter: _asyncio.Future[typing.Any]) -> None",
    (Broker, "_handle_message_delivery"): "(self, client_session: amqtt.session.Session, handler: "
                                          "amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler, "
                                          "wait_deliver: _asyncio.Future[typing.Any]) -> bool",
    (Broker, "_broadcast_message"): "(self, session: amqtt.session.Session | None, topic: str | None, "
                                    "data: bytes | bytearray | None, force_qos: int | None = None) -> None",
    (Broker, "retain_message"): "(self, source_session: amqtt.session.Session | None, topic_name: str | None, "
                                "data: bytes | bytearray | None, qos: int | None = None) -> None",
    (Broker, "_topic_filtering"): "(self, session: amqtt.session.Session, topic: str, "
                                  "action: amqtt.contexts.Action) -> bool",
    (Broker, "add_subscription"): "(self, subscription: tuple[str, int], session: amqtt.session.Session) -> int",
    (Broker, "_del_all_subscriptions"): "(self, session: amqtt.session.Session) -> None",
    (Broker, "_stop_handler"): "(self, handler: amqtt.mqtt.protocol.broker_handler.BrokerProtocolHandler) -> None",
    (Broker, "shutdown"): "(self) -> None",
    (ProtocolHandler, "handle_publish"): "(self, publish_packet: amqtt.mqtt.publish.PublishPacket) -> None",
    (ProtocolHandler, "handle_puback"): "(self, puback: amqtt.mqtt.puback.PubackPacket) -> None",
    (ProtocolHandler, "attach"): "(self, session: amqtt.session.Session, reader: amqtt.adapters.ReaderAdapter, "
                                 "writer: amqtt.adapters.WriterAdapter) -> None",
    (BrokerProtocolHandler, "handle_connection_closed"): "(self) -> None",
    (BrokerProtocolHandler, "__init__"): "(self, plugins_manager: amqtt.plugins.manager.PluginManager"
                                         "[ForwardRef('BrokerContext')], session: amqtt.session.Session | None = "
                                         "None, loop: asyncio.events.AbstractEventLoop | None = None) -> None",
    (BrokerProtocolHandler, "handle_subscribe"): "(self, subscribe: amqtt.mqtt.subscribe.SubscribePacket) -> None",
    (BrokerProtocolHandler, "handle_unsubscribe"): "(self, unsubscribe: amqtt.mqtt.unsubscribe.UnsubscribePacket)"
                                                   " -> None",
    (BrokerProtocolHandler, "handle_disconnect"): "(self, disconnect: amqtt.mqtt.disconnect.DisconnectPacket | None)"
                                                  " -> None",
    (BrokerProtocolHandler, "wait_disconnect"): "(self) -> amqtt.mqtt.disconnect.DisconnectPacket | None",
    (BrokerProtocolHandler, "stop"): "(self) -> None",
    (BrokerProtocolHandler, "mqtt_acknowledge_subscription"): "(self, packet_id: int, return_codes: list[int]) -> None",
}


def test_amqtt_is_the_pinned_version_with_the_internals_fishim_patches():
    assert amqtt.__version__ == "0.12.1", "fishim.broker.core patches amqtt internals: re-check docs/broker.md"
    for (cls, name), expected in AMQTT_INTERNALS.items():
        assert str(inspect.signature(getattr(cls, name))) == expected, f"{cls.__name__}.{name} changed"
    # state fishim reads or writes directly
    broker_init = inspect.getsource(Broker.__init__)
    for attribute in ("self._sessions", "self._subscriptions", "self._retained_messages", "self._servers"):
        assert attribute in broker_init
    assert "self._write_lock" in inspect.getsource(ProtocolHandler.__init__)
    reader_loop = inspect.getsource(ProtocolHandler._reader_loop)
    assert "self.session.keep_alive" in reader_loop
    # FishimHandler's packet order relies on one task per packet, created in the order read
    for method in ("handle_publish", "handle_subscribe", "handle_unsubscribe", "handle_puback"):
        assert f"asyncio.create_task(self.{method}(packet))" in reader_loop
    assert issubclass(FishimBroker, Broker) and EmbeddedBroker.__init__ is not None


# -- the bridge's in-flight window ---------------------------------------------------------------


def test_bridge_session_gets_a_window_of_two_batches_phones_keep_max_inflight(
    embedded_broker_factory, paho, raw_mqtt
):
    """The bridge PUBACKs only after COMMIT: with a phone-sized window it would idle between batches."""
    broker = embedded_broker_factory(broker={"max_inflight": 5})
    phone, bridge = raw_mqtt(broker.port), raw_mqtt(broker.port)
    phone.connect("phone-1", clean=False)
    bridge.connect("fishim-bridge", clean=False)  # the configured bridge.client_id (anonymous loopback)
    phone.subscribe(f"{C3}/#")
    bridge.subscribe(f"{C3}/#")
    staff = paho(broker.port, "staff")
    for n in range(20):
        staff.publish(f"{C3}/picks", str(n).encode())

    to_bridge = [bridge.read() for _ in range(20)]  # none acked yet: all 20 in flight at once
    assert [p.publish[2] for p in to_bridge] == [str(n).encode() for n in range(20)]
    to_phone = [phone.read() for _ in range(5)]
    assert [p.publish[2] for p in to_phone] == [str(n).encode() for n in range(5)]
    with pytest.raises(TimeoutError):  # the window of 5 is full: nothing more until a PUBACK
        phone.read(timeout=0.5)
    phone.puback(to_phone[0].publish[1])
    sixth = phone.read()
    assert sixth is not None and sixth.publish[2] == b"5"
