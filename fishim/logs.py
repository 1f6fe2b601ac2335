"""Logging setup: one grep-able line per event, private data masked.

Phone numbers and street addresses can ride in payloads (chat text, status notes); anything that
reaches a log line goes through :class:`MaskingFilter` first.
"""

from __future__ import annotations

import json
import logging
import re
import sys

from fishim.config import LoggingConfig

FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

# Digits and ASCII letters bound a number; CJK text and dashes around it do not ("电话13812345678谢谢",
# a client-made id "m-13812345678").
_B = r"(?<![0-9A-Za-z_.+])"
_E = r"(?![0-9A-Za-z_]|\.\d)"
_PHONE = re.compile(
    _B + r"(?:"
    r"\+\d{1,3}[ \-.]?(?:\(\d{1,5}\)[ \-.]?)?\d[\d \-.]{5,}\d"  # +86 138 1234 5678, +1 (555) 123-4567
    r"|1[3-9]\d{9}"  # mainland-China mobile
    r"|1[3-9]\d[ \-]\d{4}[ \-]\d{4}"  # 138-1234-5678
    r"|0\d{2,3}[ \-]?\d{7,8}"  # Chinese landline 0571-88881234, 010 12345678
    r"|\(\d{2,5}\)[ \-.]?\d{3,4}[ \-.]?\d{3,4}"  # (555) 123-4567, (0571) 8888 1234
    r"|\d{3,4}[ \-.]\d{3,4}[ \-.]\d{3,4}"  # 555-123-4567, 020 7946 0958
    r"|0\d{4}[ \-]?\d{6}"  # UK mobile 07700 900123
    r")" + _E
    # a mainland mobile glued to letters or a country code: tel13812345678, cust_13812345678, 8613812345678
    + r"|(?<!\d)(?:86)?1[3-9]\d{9}(?!\d)"
)
_EN_STREET = (r"street|st|road|rd|avenue|ave|lane|ln|drive|dr|way|boulevard|blvd|court|ct|place|pl|"
              r"terrace|crescent|close|square|sq|highway|hwy|parkway|pkwy")
_CN_UNIT = r"(?:\d{1,5}|[一二三四五六七八九十百]{1,4})\s*(?:号楼|号院|号|栋|幢|座|单元|层|楼|室|户)"
_ADDRESS = re.compile(
    # 221B Baker Street, 12 High St. Apt 4
    rf"(?<![0-9A-Za-z])\d{{1,5}}[A-Za-z]?\s*(?:[A-Za-z][\w'.-]*\s+){{0,4}}(?:{_EN_STREET})\b\.?"
    r"(?:,?\s*(?:apt|apartment|suite|unit|flat|fl|floor)\.?\s*#?\w+)?"
    # Hauptstraße 5, Lindenweg 12a
    r"|\b[A-ZÄÖÜ][a-zäöüß]+(?:straße|strasse|str\.|weg|gasse|platz|allee)\s*\d{1,5}[a-z]?\b"
    # 杭州市西湖区文三路90号东软大厦2号楼301室, 幸福小区3栋2单元501室
    rf"|[\u4e00-\u9fff]{{1,20}}(?:路|街|大道|道|巷|弄|胡同|里|村|小区|花园|苑|公寓|大厦)\s*"
    rf"(?:{_CN_UNIT}[\u4e00-\u9fff]{{0,8}}?\s*)*{_CN_UNIT}",
    re.IGNORECASE,
)
# "password=…", "'password': '…'", "secret: …": never let a credential reach a log line.
_SECRET = re.compile(r"""((?:password|passwd|pwd|secret|token)['"]?\s*[=:]\s*['"]?)[^\s'",;)}\]]+""",
                     re.IGNORECASE)
# Payloads often reach a log as JSON with \uXXXX escapes or as bytes reprs with \xNN escapes; decode
# them first or the CJK text around a number would hide it.
_U_ESCAPES = re.compile(r"(?:\\u[0-9a-fA-F]{4})+")
_X_ESCAPES = re.compile(r"(?:\\x[0-9a-fA-F]{2})+")


def _unescape(text: str) -> str:
    """Decode ``\\uXXXX`` / ``\\xNN`` runs so masking sees the text, but never into a control
    character: a literal ``\\u000a`` in a client's text must not become a real line break."""
    if "\\" not in text:
        return text
    text = _U_ESCAPES.sub(lambda m: _printable(_utf16(json.loads(f'"{m.group(0)}"'))), text)
    return _X_ESCAPES.sub(
        lambda m: _printable(bytes.fromhex(m.group(0).replace("\\x", "")).decode("utf-8", "backslashreplace")),
        text)


def _printable(text: str) -> str:
    """``text`` with every non-printable character (line breaks, U+2028, ESC...) as a ``\\u`` escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


# -- client-supplied values in log lines ----------------------------------------------------------

LOG_VALUE_MAX = 200
"""Characters of one client-supplied value (user name, client id, topic...) that reach a log line."""
LOG_MESSAGE_MAX = 8192
"""Characters of one rendered log message (tracebacks aside); the rest is cut and counted."""
_SAFE_LOG_VALUE = re.compile(r"^[A-Za-z0-9_.,|:@/+#$\[\]-]+$")


def clip(value: object, limit: int = LOG_VALUE_MAX) -> str:
    """One value, safe inside a log line: plain if it is short and harmless, else JSON-quoted
    (escaping quotes, backslashes and every control character) and cut to ``limit`` characters,
    with the full length noted. The one helper every log line with client text goes through."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit and _SAFE_LOG_VALUE.match(text):
        return text
    if len(text) <= limit:
        return json.dumps(text)
    return f"{json.dumps(text[:limit])}...({len(text)} chars)"


def kv(**fields: object) -> str:
    """``key=value`` pairs for one grep-able log line, each value through :func:`clip`."""
    return " ".join(f"{key}={clip(value)}" for key, value in fields.items())


def one_line(text: str, limit: int = LOG_MESSAGE_MAX) -> str:
    """A rendered log message as exactly one line of at most ``limit`` characters (+ a note)."""
    text = _printable(text)
    if len(text) > limit:
        text = f"{text[:limit]}...({len(text)} chars)"
    return text


def _utf16(text: str) -> str:
    """Lone surrogates (half an escaped emoji) would make the log handler fail to encode the line."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _mask_phone(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group(0))
    return "*" * max(len(digits) - 2, 0) + digits[-2:]


def mask(text: str) -> str:
    """Keep the last 2 digits of phone numbers; replace street addresses and credentials entirely."""
    text = _SECRET.sub(r"\1***", _unescape(text))
    text = _ADDRESS.sub("[address]", text)
    return _PHONE.sub(_mask_phone, text)


class MaskingFilter(logging.Filter):
    """Masks the rendered message, and any traceback, of every record that passes through a handler.

    The message is also made one line and bounded (:func:`one_line`): whatever a library or a
    careless call puts in it, a client's text can neither start a forged log line nor flood the log.

    Tracebacks matter: a pydantic ValidationError quotes the offending input, payload and all.
    """

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        rendered = record.getMessage()
        masked = one_line(mask(rendered))
        if masked != rendered:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text)
        if record.stack_info:
            record.stack_info = mask(record.stack_info)
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
