"""Listeners from Config.listeners: TCP, WebSocket and TLS, each bound only to its configured host."""

from __future__ import annotations

import logging

import pytest

from fishim.broker import EmbeddedBroker, ListenerError
from fishim.config import Config, ListenerConfig, TlsConfig
from fishim.testing.tls import self_signed

A1 = "fishim/orders/A1"


def test_tcp_websocket_and_tls_listeners_share_one_broker(embedded_broker_factory, paho, tmp_path):
    tls = self_signed(tmp_path)
    broker = embedded_broker_factory(listeners=[
        ListenerConfig(name="tcp", bind="127.0.0.1:0"),
        ListenerConfig(name="web", type="ws", bind="127.0.0.1:0"),
        ListenerConfig(name="secure", bind="127.0.0.1:0", tls=tls),
    ])
    ports = broker.broker.core.ports
    over_tcp = paho(ports["tcp"], "tcp-client")
    over_ws = paho(ports["web"], "ws-client", transport="websockets")
    over_tls = paho(ports["secure"], "tls-client", tls_ca=str(tls.cert))
    for client in (over_tcp, over_ws, over_tls):
        assert not client.refused
        client.subscribe(f"{A1}/#")
    over_ws.publish(f"{A1}/status", b"from the browser")
    over_tls.publish(f"{A1}/chat/tls", b"over tls")
    for client in (over_tcp, over_ws, over_tls):
        assert [m.payload for m in (client.get(), client.get())] == [b"from the browser", b"over tls"]
    bound = broker.run(lambda: sorted({s.getsockname()[0] for server in broker.broker.core._bound.values()
                                       for s in server.sockets}))
    assert bound == ["127.0.0.1"]
    assert broker.run(broker.broker.sessions_connected) == 3


def test_websocket_listener_enforces_the_same_wire_rules(embedded_broker_factory, paho, caplog):
    caplog.set_level(logging.INFO, logger="fishim.broker")
    broker = embedded_broker_factory(listeners=[ListenerConfig(name="web", type="ws", bind="127.0.0.1:0")],
                                     limits={"max_payload": 100})
    client = paho(broker.port, "ws-big", transport="websockets")
    client.client.publish(f"{A1}/picks", b"x" * 101, qos=1)
    assert client.disconnected.wait(5)
    assert "reason=too_large" in caplog.text


def test_listener_that_cannot_bind_raises_a_one_line_error(embedded_broker_factory, tmp_path):
    taken = embedded_broker_factory()
    config = Config(listeners=[ListenerConfig(name="dup", bind=f"127.0.0.1:{taken.port}")])
    with pytest.raises(ListenerError, match=r"listener dup: cannot listen on 127\.0\.0\.1:\d+"):
        taken.call(EmbeddedBroker(config).start())
    bad_tls = Config(listeners=[ListenerConfig(
        name="tls", bind="127.0.0.1:0", tls=TlsConfig(cert=tmp_path / "no.pem", key=tmp_path / "no.key"))])
    with pytest.raises(ListenerError, match="listener tls: cannot load TLS files"):
        taken.call(EmbeddedBroker(bad_tls).start())
