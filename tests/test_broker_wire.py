"""The wire guard: malformed packets, limits, keepalive and MQTT 5, crafted on raw sockets.

Malformed input closes the connection (MQTT 3.1.1 §4.8); an oversize payload closes it too (and is
reported through on_refused). None of it may leave a traceback in the log or disturb other clients.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import pytest

from fishim.auth import Principal

A1 = "fishim/orders/A1"


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert "Traceback" not in caplog.text


def assert_broker_still_serves(port: int, paho) -> None:
    """Other clients are not disturbed: a fresh subscriber still gets a fresh publish."""
    sub = paho(port, "witness")
    sub.subscribe(f"{A1}/status")
    paho(port, "witness-pub").publish(f"{A1}/status", b"still here")
    assert sub.get().payload == b"still here"


# -- 5. bad topics, bad CONNECT flags, oversize payloads ------------------------------------------


@pytest.mark.parametrize("topic", [
    pytest.param(b"fishim/orders/\xff\xfe/status", id="invalid-utf8"),
    pytest.param(b"fishim/orders/\xed\xa0\x80/status", id="utf16-surrogate"),
    pytest.param(b"fishim/\x00/status", id="nul"),
    pytest.param(b"fishim/orders/" + b"x" * 40, id="over-max_topic_length"),
    pytest.param(b"fishim/orders/+/status", id="wildcard"),
    pytest.param(b"", id="empty"),
])
def test_publish_with_a_bad_topic_closes_the_connection(embedded_broker_factory, paho, raw_mqtt, wire,
                                                        caplog, topic):
    caplog.set_level(logging.INFO)
    broker = embedded_broker_factory(limits={"max_topic_length": 32})
    sub = paho(broker.port, "sub")
    sub.subscribe("#")
    client = raw_mqtt(broker.port)
    assert client.connect("bad-topic") == (False, 0)
    client.send(wire.publish(topic, b"payload", qos=1))
    assert client.closed_by_broker()
    paho(broker.port, "staff").publish(f"{A1}/status", b"marker")
    assert [m.payload for m in sub.until(f"{A1}/status")] == [b"marker"]
    assert "protocol_violation" in caplog.text
    assert_no_traceback(caplog)


@pytest.mark.parametrize("topic_filter", [
    pytest.param(b"fishim/\xc3\x28/#", id="invalid-utf8"),
    pytest.param(b"fishim/" + b"y" * 40, id="over-max_topic_length"),
])
def test_subscribe_with_a_bad_filter_closes_the_connection(embedded_broker_factory, raw_mqtt, wire, caplog,
                                                           topic_filter):
    caplog.set_level(logging.INFO)
    broker = embedded_broker_factory(limits={"max_topic_length": 32})
    client = raw_mqtt(broker.port)
    client.connect("bad-filter")
    client.send(wire.subscribe(topic_filter))
    assert client.closed_by_broker()
    assert_no_traceback(caplog)


def test_misplaced_wildcard_filter_is_refused_in_suback(embedded_broker, raw_mqtt):
    client = raw_mqtt(embedded_broker.port)
    client.connect("wild")
    assert client.subscribe("fishim/orders/A1#", packet_id=1) == 0x80
    assert client.subscribe("fishim/#/status", packet_id=2) == 0x80
    assert client.subscribe("fishim/orders/+/status", packet_id=3) == 1


@pytest.mark.parametrize("connect", [
    pytest.param(lambda w: w.packet(0x10, w.string("MQTT") + bytes([4, 0x06, 0, 0]) + w.string("c1")),
                 id="will-flag-without-will-topic-and-message"),
    pytest.param(lambda w: w.packet(0x10, w.string("MQTT") + bytes([4, 0x06, 0, 0]) + w.string("c1")
                                    + w.string("fishim/will")), id="will-flag-without-will-message"),
    pytest.param(lambda w: w.connect("c1", will=(b"fishim/\xff", b"x")), id="will-topic-invalid-utf8"),
    pytest.param(lambda w: w.connect("c1", will=("fishim/+/x", b"x")), id="will-topic-wildcard"),
    pytest.param(lambda w: w.connect("c1", flags_extra=0x01), id="reserved-flag"),
    pytest.param(lambda w: w.connect("c1", flags_extra=0x20), id="will-retain-without-will"),
    pytest.param(lambda w: w.packet(0x10, w.string("MQTT") + bytes([4, 0x42, 0, 0]) + w.string("c1")
                                    + w.string("pw")), id="password-without-username"),
])
def test_malformed_connect_is_closed_without_connack(embedded_broker, raw_mqtt, wire, caplog, connect):
    caplog.set_level(logging.INFO)
    client = raw_mqtt(embedded_broker.port)
    client.send(connect(wire))
    assert client.read() is None  # closed, no CONNACK
    assert "connect_refused" in caplog.text
    assert_no_traceback(caplog)


def test_oversize_payload_closes_the_connection_and_is_reported(embedded_broker_factory, paho, raw_mqtt, wire,
                                                                caplog):
    caplog.set_level(logging.INFO)
    reported: list[tuple[Principal, str, str]] = []
    seen = threading.Event()

    def on_refused(principal: Principal, topic: str, reason: str) -> None:
        reported.append((principal, topic, reason))
        seen.set()

    broker = embedded_broker_factory(limits={"max_payload": 1024}, on_refused=on_refused)
    sub = paho(broker.port, "sub")
    sub.subscribe("#")
    client = raw_mqtt(broker.port)
    client.connect("big-sender")
    client.send(wire.publish(f"{A1}/picks", b"x" * 1025, qos=1))
    assert client.closed_by_broker()
    assert seen.wait(5) and reported == [(Principal(), f"{A1}/picks", "too_large")]
    # far over the limit: refused from the header alone, the payload is never read
    client = raw_mqtt(broker.port)
    client.connect("huge-sender")
    client.send(wire.publish(f"{A1}/picks", b"x" * 300_000, qos=1)[:2000])
    assert client.closed_by_broker()
    paho(broker.port, "staff").publish(f"{A1}/picks", b"x" * 1024)  # exactly the limit is fine
    assert [len(m.payload) for m in sub.until(f"{A1}/picks")] == [1024]
    assert "reason=too_large" in caplog.text
    assert_no_traceback(caplog)


@pytest.mark.parametrize("packet", [
    pytest.param(lambda w: w.packet(0x20, b"\x00\x00"), id="connack-from-client"),
    pytest.param(lambda w: w.packet(0x40, b"\x00"), id="short-puback"),
    pytest.param(lambda w: w.packet(0x80, b"\x00\x01" + w.string("a") + b"\x01"), id="subscribe-bad-flags"),
    pytest.param(lambda w: w.packet(0x82, b"\x00\x01"), id="subscribe-without-filters"),
    pytest.param(lambda w: w.packet(0x82, b"\x00\x01" + w.string("a") + b"\x05"), id="subscribe-bad-qos"),
    pytest.param(lambda w: w.publish("a/b", b"x", qos=0)[:0] + bytes([0x36]) + b"\x05" + w.string("a/b")
                 + b"\x00", id="publish-qos3"),
    pytest.param(lambda w: w.connect("again"), id="second-connect"),
    pytest.param(lambda w: b"\x30\xff\xff\xff\xff\x01", id="remaining-length-over-4-bytes"),
])
def test_protocol_violations_after_connect_close_the_connection(embedded_broker, paho, raw_mqtt, wire, caplog,
                                                                packet):
    caplog.set_level(logging.INFO)
    client = raw_mqtt(embedded_broker.port)
    client.connect("violator")
    client.send(packet(wire))
    assert client.closed_by_broker()
    assert_no_traceback(caplog)
    assert_broker_still_serves(embedded_broker.port, paho)


# -- 6. keepalive ---------------------------------------------------------------------------------


def test_silent_client_dropped_after_grace_times_keepalive_and_will_published(embedded_broker, paho,
                                                                              raw_mqtt, caplog):
    caplog.set_level(logging.INFO, logger="fishim.broker")
    watcher = paho(embedded_broker.port, "watcher")
    watcher.subscribe(f"{A1}/location")
    phone = raw_mqtt(embedded_broker.port)
    started = time.monotonic()
    assert phone.connect("rider-phone", keepalive=1, will=(f"{A1}/location", b'{"lost":true}')) == (False, 0)
    will = watcher.get(timeout=5)  # the phone says nothing more
    elapsed = time.monotonic() - started
    assert will.payload == b'{"lost":true}'
    assert elapsed >= 1.4, elapsed  # not before keepalive x grace (1 s x 1.5, less a poll's slack)
    assert phone.closed_by_broker(timeout=1)
    assert "keepalive_timeout client_id=rider-phone" in caplog.text


def test_will_not_published_after_a_clean_disconnect(embedded_broker, paho, raw_mqtt, wire):
    watcher = paho(embedded_broker.port, "watcher")
    watcher.subscribe(f"{A1}/#")
    phone = raw_mqtt(embedded_broker.port)
    phone.connect("polite-phone", keepalive=1, will=(f"{A1}/location", b"lost"))
    phone.send(wire.packet(0xE0, b""))  # DISCONNECT
    assert phone.closed_by_broker()
    paho(embedded_broker.port, "staff").publish(f"{A1}/status", b"marker")
    assert [m.payload for m in watcher.until(f"{A1}/status")] == [b"marker"]


def test_client_that_pings_within_keepalive_stays_connected(embedded_broker, raw_mqtt, wire):
    phone = raw_mqtt(embedded_broker.port)
    phone.connect("pinger", keepalive=1)
    for _ in range(4):  # 2 s of pings every 0.5 s: longer than 1.5 x keepalive
        time.sleep(0.5)  # pacing the client, not synchronising with the broker
        phone.send(wire.packet(0xC0, b""))
        pong = phone.read(timeout=2)
        assert pong is not None and pong.type == 13
    assert embedded_broker.run(embedded_broker.broker.sessions_connected) == 1


def test_connection_that_never_sends_connect_is_dropped(embedded_broker_factory, raw_mqtt, monkeypatch):
    monkeypatch.setattr("fishim.broker.wire.CONNECT_TIMEOUT", 0.3)
    broker = embedded_broker_factory()
    idle = raw_mqtt(broker.port)
    assert idle.closed_by_broker(timeout=3)


# -- 7. MQTT 5 and malformed CONNECT: refused cleanly -------------------------------------------


def test_mqtt5_connect_gets_connack_unacceptable_protocol_and_no_traceback(embedded_broker, paho, raw_mqtt,
                                                                          wire, caplog):
    caplog.set_level(logging.DEBUG)
    client = raw_mqtt(embedded_broker.port)
    properties = bytes([5, 0x11, 0, 0, 0, 60])  # session expiry interval 60
    client.send(wire.packet(0x10, wire.string("MQTT") + bytes([5, 0x02, 0, 60]) + properties
                            + wire.string("mqtt5-phone")))
    connack = client.read()
    assert connack is not None and (connack.type, connack.body) == (2, b"\x00\x01")
    assert client.read() is None
    assert "connect_refused" in caplog.text and "protocol level 5" in caplog.text
    assert_no_traceback(caplog)
    assert_broker_still_serves(embedded_broker.port, paho)


def test_paho_mqtt5_client_is_refused_cleanly(embedded_broker, caplog):
    """A refusal, not a broken connection: paho gets a CONNACK whose code says "unsupported protocol
    version" (the MQTT 3.1.1 return code 1, which paho's MQTT 5 parser reads as reason code 0x84)."""
    import paho.mqtt.client as mqtt

    caplog.set_level(logging.INFO)
    connacks: queue.Queue[Any] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="v5", protocol=mqtt.MQTTv5)
    client.on_connect = lambda _c, _u, _f, rc, _p: connacks.put(rc)
    client.connect("127.0.0.1", embedded_broker.port)
    client.loop_start()
    try:
        reason = connacks.get(timeout=5)  # a dropped connection calls on_disconnect only: this times out
    finally:
        client.loop_stop()
    assert reason.is_failure and reason.value == 0x84, reason
    assert_no_traceback(caplog)


@pytest.mark.parametrize("data", [
    pytest.param(b"\xff\xff\xff\xff\xff", id="garbage"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http"),
    pytest.param(b"\x10\x0a\x00\x04MQTT\x04", id="truncated-connect"),
    pytest.param(b"\x10\x0c\x00\x04MQTX\x04\x02\x00\x00\x00\x00", id="wrong-protocol-name"),
    pytest.param(b"\x30\x05\x00\x01a\x00\x00", id="publish-before-connect"),
    pytest.param(b"\x10\x10\x00\x04MQTT\x04\x02\x00\x00\x00\x02c1\xff\xff", id="trailing-bytes"),
])
def test_malformed_first_packet_is_closed_without_traceback(embedded_broker, paho, raw_mqtt, caplog, data):
    caplog.set_level(logging.DEBUG)
    client = raw_mqtt(embedded_broker.port)
    client.send(data)
    if data.startswith(b"\x10\x0a"):
        client.sock.shutdown(1)  # truncated: the client stops sending
    assert client.read() is None
    assert_no_traceback(caplog)
    assert_broker_still_serves(embedded_broker.port, paho)


def test_client_id_with_spaces_is_accepted_control_characters_and_long_ids_are_not(embedded_broker, raw_mqtt,
                                                                                   paho, caplog):
    """MQTT 3.1.1 allows any UTF-8 id (Mosquitto takes "rider 7 phone"); only what cannot be logged
    safely or is over 128 characters is refused with 0x02, and the log line says which rule."""
    caplog.set_level(logging.INFO, logger="fishim.broker")
    phone = paho(embedded_broker.port, "rider 7 phone", clean_session=False)
    phone.subscribe("t/spaces")
    phone.publish("t/spaces", b"marker")
    assert [m.payload for m in phone.until("t/spaces")] == [b"marker"]
    for client_id, reason in (("rider\x07bell", "control character U+0007"), ("a\u2028b", "control character U+2028"),
                              ("x" * 129, "client id of 129 characters, over 128")):
        client = raw_mqtt(embedded_broker.port)
        assert client.connect(client_id) == (False, 2)
        assert client.read() is None
        assert reason in caplog.text
    assert raw_mqtt(embedded_broker.port).connect("x" * 128) == (False, 0)


def test_empty_client_id_needs_a_clean_session(embedded_broker, raw_mqtt):
    assert raw_mqtt(embedded_broker.port).connect("", clean=True) == (False, 0)
    client = raw_mqtt(embedded_broker.port)
    assert client.connect("", clean=False) == (False, 2)
    assert client.read() is None
