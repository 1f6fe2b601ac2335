"""Private data never reaches a log line: phone numbers, street addresses, credentials.

Payloads carry chat text and delivery notes written by customers and riders, in Chinese and in
western formats, so :func:`fishim.logs.mask` is checked on both, and on the shapes a payload takes
when a log line quotes it (JSON with \\u escapes, a bytes repr with \\x escapes, a traceback).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from fishim.config import LoggingConfig
from fishim.logs import mask, setup_logging


@pytest.mark.parametrize(("text", "masked"), [
    # Chinese mobiles and landlines, bare and grouped, inside CJK text (no word boundary there)
    ("电话13812345678谢谢", "电话*********78谢谢"),
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
    path = tmp_path / "fishim.log"
    setup_logging(LoggingConfig(level="INFO", file=path))
    try:
        yield path
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], root.level = saved[0], saved[1]


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
