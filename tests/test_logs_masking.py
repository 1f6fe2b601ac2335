"""Private data never reaches a log line: phone numbers, street addresses, credentials.

Payloads carry chat text and delivery notes written by customers and riders, in Chinese and in
western formats, so :func:`fishim.logs.mask` is checked on both, and on the shapes a payload takes
when a log line quotes it (JSON with \\u escapes, a bytes repr with \\x escapes, a traceback).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _security_shop import make_shop

from fishim.bridge import Bridge
from fishim.config import Config, ListenerConfig, LoggingConfig, StoreConfig
from fishim.logs import mask, one_line, setup_logging
from fishim.testing.mqtt import Collector, connect_client, publish_and_wait


@pytest.mark.parametrize(("text", "masked"), [
    # Chinese mobiles and landlines, bare and grouped, inside CJK text (no word boundary there)
    ("电话13812345678谢谢", "电话*********78谢谢"),
    ("id=m-13812345678", "id=m-*********78"),
    ("联系:138-1234-5678", "联系:*********78"),
    ("+86 138 1234 5678", "***********78"),
    ("+8613812345678", "***********78"),
    ("店里电话0571-88881234", "店里电话**********34"),
    ("(0571) 8888 1234", "**********34"),
    ("010 12345678", "*********78"),
    # western formats
    ("call +1 (555) 123-4567 pls", "call *********67 pls"),
    ("(555) 123-4567", "********67"),
    ("555-123-4567", "********67"),
    ("555.123.4567", "********67"),
    ("020 7946 0958", "*********58"),
    ("07700 900123", "*********23"),
    ("+44 20 7946 0958", "**********58"),
    # glued to a country code, letters or an underscore (issue 17.8)
    ("8613812345678", "***********78"),
    ("tel13812345678", "tel*********78"),
    ("user=cust_13812345678", "user=cust_*********78"),
])
def test_phone_numbers_keep_only_last_two_digits(text: str, masked: str) -> None:
    assert mask(text) == masked


@pytest.mark.parametrize(("text", "masked"), [
    ("送到杭州市西湖区文三路90号东软大厦2号楼301室,谢谢", "[address],谢谢"),
    ("地址:幸福小区3栋2单元501室", "地址:[address]"),
    ("南京东路100号", "[address]"),
    ("放在建国门外大街1号门口", "[address]门口"),
    ("221B Baker Street, London", "[address], London"),
    ("leave it at 12 High St. Apt 4B please", "leave it at [address] please"),
    ("1600 Pennsylvania Avenue NW", "[address] NW"),
    ("Hauptstraße 5, 10115 Berlin", "[address], 10115 Berlin"),
])
def test_street_addresses_are_replaced(text: str, masked: str) -> None:
    assert mask(text) == masked


@pytest.mark.parametrize("text", [
    "order A1042 state=delivering seq=1732530000000 qty 3",
    "peer=192.168.100.200:51234 listener=default",
    "2024-11-25T10:00:00.123Z batch messages=500 stored=498",
    "topic=fishim/orders/A1/chat/rider7 id=msg-20241125-0001",
    "id=auto-A1-picking-1732530000000 uuid=550e8400-e29b-41d4-a716-446655440000",
])
def test_operational_lines_are_left_alone(text: str) -> None:
    assert mask(text) == text


@pytest.mark.parametrize(("text", "masked"), [
    ("ConnectPayload(client_id=x, username=u, password=hunter2)",
     "ConnectPayload(client_id=x, username=u, password=***)"),
    ('{"username": "u", "password": "hunter2"}', '{"username": "u", "password": "***"}'),
    ("secret: 0123abcd", "secret: ***"),
])
def test_credentials_are_redacted(text: str, masked: str) -> None:
    assert mask(text) == masked


def test_escaped_payloads_are_decoded_then_masked() -> None:
    body = {"text": "电话13812345678 送到文三路90号 😀"}
    assert mask(json.dumps(body)) == '{"text": "电话*********78 [address] 😀"}'  # \\u escapes, emoji pair
    assert mask(repr(json.dumps(body, ensure_ascii=False).encode())) == \
        "b'{\"text\": \"电话*********78 [address] 😀\"}'"  # a bytes repr, \\x escapes
    assert mask("half an emoji \\ud83d 13812345678") == "half an emoji \ufffd *********78"


@pytest.fixture
def log_file(tmp_path: Path) -> Iterator[Path]:
    """fishim's real logging setup writing to a file; the root logger is restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("amqtt", "transitions", "websockets")}
    path = tmp_path / "fishim.log"
    setup_logging(LoggingConfig(level="INFO", file=path))
    try:
        yield path
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved[0], saved[1]
        for name, level in noisy.items():
            logging.getLogger(name).setLevel(level)


def test_broker_and_bridge_log_lines_with_payloads_are_masked(log_file: Path) -> None:
    payload = json.dumps({"id": "m1", "sender": "cust1", "text": "我的电话13812345678,送到文三路90号2单元"},
                         ensure_ascii=False).encode()
    logging.getLogger("fishim.bridge").warning("rejected topic=%s payload=%r", "fishim/orders/A1/chat/cust1",
                                               payload)
    logging.getLogger("fishim.broker").info("publish topic=%s payload=%s", "fishim/orders/A1/status",
                                            payload.decode())
    logging.getLogger("amqtt.broker").warning("ConnectPayload(client_id=c1, username=cust1, password=%s)",
                                              "hunter2")
    try:
        raise ValueError("bad note: call +1 (555) 123-4567")  # as a ValidationError quotes its input
    except ValueError:
        logging.getLogger("fishim.bridge").exception("bad payload %s", "at 221B Baker Street")
    text = log_file.read_text(encoding="utf-8")
    assert "13812345678" not in text and "文三路90号" not in text and "hunter2" not in text
    assert "555) 123-4567" not in text and "221B Baker" not in text
    assert text.count("*********78") == 2 and text.count("[address]") == 3
    assert "password=***" in text and "rejected topic=fishim/orders/A1/chat/cust1" in text


def test_real_bridge_rejection_line_is_masked(log_file: Path, tmp_path: Path,
                                              secure_broker_factory: Callable[..., object]) -> None:
    """A customer mentions a phone number in chat; the bridge refuses the mention and logs why. The
    log line (and everything else the broker and bridge logged meanwhile) carries no phone number."""
    db = tmp_path / "shop.db"
    passwords = make_shop(db)
    port: int = secure_broker_factory(db).port  # type: ignore[attr-defined]
    bridge = Bridge(Config(store=StoreConfig(path=db), listeners=[ListenerConfig(bind=f"127.0.0.1:{port}")]))
    try:
        bridge.start()
        bridge.wait_ready(30)
        with connect_client(port, "c1-masking", username="c1", password=passwords["c1"]) as c1, \
                Collector(c1, "fishim/errors/c1") as errors:
            publish_and_wait(c1, "fishim/orders/A1/chat/c1", {
                "id": "m-13812345678", "ts": 1, "sender": "c1", "mentions": ["13812345678"],
                "text": "打我电话13812345678, 送到文三路90号2单元"})
            error = errors.get(timeout=30).json()  # sent after the bridge logged the refusal
    finally:
        bridge.stop()
    assert error["error"] == "bad_mention" and "13812345678" in error["detail"]  # the sender sees it
    text = log_file.read_text(encoding="utf-8")
    assert "rejected topic=fishim/orders/A1/chat/c1" in text and "error=bad_mention" in text
    assert "13812345678" not in text and "文三路90号" not in text


# -- log forging and flooding (issue 17.4) ---------------------------------------------------------

FORGED = "1999-01-01 00:00:00,000 INFO fishim.broker connected client_id=boss-pc user=boss role=owner"
_LINE_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ ")


@pytest.mark.parametrize(("text", "line"), [
    ('id "a\\u000aFAKE"', 'id "a\\u000aFAKE"'),  # a JSON-escaped literal \u000a stays escaped
    ("id a\\x0aFAKE", "id a\\u000aFAKE"),  # a bytes-repr \x0a is never decoded into a line break
    ("two\nlines\r\u2028here", "two\\u000alines\\u000d\\u2028here"),
])
def test_masking_never_makes_a_line_break(text: str, line: str) -> None:
    assert one_line(mask(text)) == line


def test_client_text_cannot_forge_or_flood_log_lines(log_file: Path, tmp_path: Path, raw_mqtt: Any,
                                                     secure_broker_factory: Callable[..., Any]) -> None:
    """Without logging in: a username with a newline, a 65 KB username, client ids with literal
    ``\\u000a`` / ``\\x0a`` (escapes the masking used to decode) and phone numbers glued to
    letters. Every line of the real log file is one real record, bounded, with no phone number."""
    db = tmp_path / "shop.db"
    passwords = make_shop(db)
    port = secure_broker_factory(db).port
    attempts = [
        ("probe-1", f"eve\n{FORGED}", "x"),  # refused: it is not a user
        ("probe-2", "e" * 65_000, "x"),
        ("a\\u000aFAKE-1", "c1", passwords["c1"]),  # accepted: the id is printable text
        ("a\\x0aFAKE-2", "c1", passwords["c1"]),
        ("cust_13812345678", "c1", passwords["c1"]),
        ("tel13812345678", "8613812345678", "x"),
    ]
    for client_id, username, password in attempts:
        raw_mqtt(port).connect(client_id, username=username, password=password)
    # the marker: a refusal is logged before its CONNACK is sent, so once it is answered it is in
    assert raw_mqtt(port).connect("log-marker", username="c1", password="wrong")[1] == 5
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert any("connect_refused client_id=log-marker" in line for line in lines)
    for line in lines:
        assert _LINE_START.match(line) and not line.startswith("1999-"), f"forged or broken line: {line!r}"
        assert len(line) < 1500, f"unbounded line of {len(line)} chars"
        assert "FAKE" not in line or "\\u000aFAKE" in line
    text = "\n".join(lines)
    assert "13812345678" not in text
    assert "(65000 chars)" in text  # the long name was cut, and says so
