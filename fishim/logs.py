"""Logging setup: one grep-able line per event, private data masked.

Phone numbers and street addresses can ride in payloads (chat text, status notes); anything that
reaches a log line goes through :class:`MaskingFilter` first.
"""

from __future__ import annotations

import logging
import re
import sys

from fishim.config import LoggingConfig

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# International "+" numbers, mainland-China mobiles (the article's shop: 11 digits from 1[3-9]) and
# numbers written in groups ("0571-8888-1234"). Bare counters and epoch timestamps are left alone.
_PHONE = re.compile(
    r"(?<![\w.+])(\+\d[\d \-]{6,}\d|1[3-9]\d{9}|\d{3,4}[ \-]\d{3,4}[ \-]\d{3,4})(?![\w.])"
)
# "<number> <words> Road/Street/路/号…": enough to catch an address written into a note or chat.
_ADDRESS = re.compile(
    r"(\d{1,5}\s*(?:[A-Za-z][\w'.-]*\s+){0,4}(?:street|st|road|rd|avenue|ave|lane|ln|drive|dr|way|blvd)\b\.?)"
    r"|([\u4e00-\u9fff]{1,12}(?:路|街|道|巷|弄)\s*\d{1,5}\s*号?)",
    re.IGNORECASE,
)


def mask(text: str) -> str:
    """Keep the last 2 digits of phone numbers; replace street addresses entirely."""
    text = _ADDRESS.sub("[address]", text)
    return _PHONE.sub(lambda m: "*" * max(len(re.sub(r"\D", "", m.group(1))) - 2, 0) + m.group(1)[-2:], text)


class MaskingFilter(logging.Filter):
    """Masks the rendered message of every record that passes through a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        rendered = record.getMessage()
        masked = mask(rendered)
        if masked != rendered:
            record.msg, record.args = masked, None
        return True


def setup_logging(config: LoggingConfig) -> None:
    """Root handler for a fishim process; amqtt's chatty loggers are kept at WARNING."""
    handler: logging.Handler = (
        logging.FileHandler(config.file, encoding="utf-8") if config.file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(MaskingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    for noisy in ("amqtt", "transitions", "websockets"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
