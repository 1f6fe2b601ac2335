"""TLS listener from the config: a paho client that trusts the shop's certificate round-trips a
message; a plain MQTT client and a client that doesn't trust the certificate get nowhere."""

from __future__ import annotations

import socket
import ssl
import uuid
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from _security_shop import make_shop

from fishim.config import ListenerConfig, TlsConfig
from fishim.testing.mqtt import Collector, MqttClient, publish_and_wait
from fishim.testing.tls import self_signed


@pytest.fixture(scope="module")
def tls_shop(tmp_path_factory: pytest.TempPathFactory,
             secure_broker_factory: Callable[..., object]) -> tuple[int, dict[str, str], Path]:
    root = tmp_path_factory.mktemp("tls")
    passwords = make_shop(root / "shop.db")
    tls = self_signed(root)
    cert, key = tls.cert, tls.key
    listener = ListenerConfig(name="tls", bind="127.0.0.1:0", tls=TlsConfig(cert=cert, key=key))
    broker = secure_broker_factory(root / "shop.db", listeners=[listener])
    return broker.port, passwords, cert  # type: ignore[attr-defined]


def tls_client(port: int, user: str, password: str, ca: Path | None) -> MqttClient:
    client = MqttClient(f"{user}-tls-{uuid.uuid4().hex[:6]}")
    client.tls_set(ca_certs=str(ca) if ca else None)
    client.username_pw_set(user, password)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.wait_connected()
    except BaseException:
        client.loop_stop()
        raise
    return client


def test_tls_round_trip(tls_shop: tuple[int, dict[str, str], Path]) -> None:
    port, passwords, cert = tls_shop
    with tls_client(port, "c1", passwords["c1"], cert) as c1, tls_client(port, "r1", passwords["r1"], cert) as r1, \
            Collector(c1, "fishim/orders/A1/chat/+") as inbox:
        publish_and_wait(r1, "fishim/orders/A1/chat/r1", {"id": "t1", "ts": 1, "sender": "r1", "text": "5 min"})
        message = inbox.get(timeout=10)
    assert (message.topic, message.json()["text"]) == ("fishim/orders/A1/chat/r1", "5 min")


def test_plain_mqtt_on_the_tls_port_gets_no_connack(tls_shop: tuple[int, dict[str, str], Path]) -> None:
    port, passwords, _ = tls_shop
    user, pw = b"c1", passwords["c1"].encode()
    payload = b"\x00\x05plain" + len(user).to_bytes(2, "big") + user + len(pw).to_bytes(2, "big") + pw
    variable = b"\x00\x04MQTT\x04\xc2\x00\x3c"  # MQTT 3.1.1, clean session, username + password
    body = variable + payload
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(bytes([0x10, len(body)]) + body)
        received = b""
        while chunk := sock.recv(4096):  # until the server closes the connection
            received += chunk
    assert not received.startswith(b"\x20")  # no CONNACK: at most a TLS alert, then EOF


def test_client_that_does_not_trust_the_certificate_fails(tls_shop: tuple[int, dict[str, str], Path]) -> None:
    port, passwords, _ = tls_shop
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="untrusting", protocol=mqtt.MQTTv311)
    client.tls_set()  # the system's CAs only
    client.username_pw_set("c1", passwords["c1"])
    with pytest.raises(ssl.SSLCertVerificationError):
        client.connect("127.0.0.1", port)
