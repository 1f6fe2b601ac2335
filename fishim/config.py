"""broker.yaml: one validated model for every process (broker, bridge, CLI).

A bad file or value raises :class:`ConfigError` whose message is one line naming the file and the key,
so the CLI can print it and exit 2 instead of showing a traceback; a misspelt key gets a "did you
mean" with the closest known one.

Sizes and durations: every byte count is a :data:`ByteSize` (``65536``, ``64k``, ``10M``, ``1GiB``)
and every time span a :data:`Duration` (seconds: ``20``, ``90s``, ``5m``, ``1h30m``, ``250ms``) or
:data:`DurationMs` (the same text, held in milliseconds). Use them for any new key.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG = Path("broker.yaml")
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class ConfigError(Exception):
    """A config problem a person can fix; ``str()`` is a single line."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_FACTOR = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SPAN = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)", re.IGNORECASE)
_SPAN_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(value: Any) -> Any:
    """``64k``, ``10M``, ``1GiB``, ``512B`` → bytes (binary multiples: k = 1024); numbers pass as they are."""
    if not isinstance(value, str):
        return value
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"not a size: {value!r} (try 65536, 64k, 10M)")
    number, unit, _ = match.groups()
    return int(float(number) * _SIZE_FACTOR[unit.lower()])


def parse_duration(value: Any) -> Any:
    """``90s``, ``5m``, ``1h30m``, ``250ms``, ``2d`` → seconds (a float); numbers pass as they are."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _SPAN.findall(text)
    if not parts or _SPAN.sub("", text).strip():
        raise ValueError(f"not a duration: {value!r} (try 90s, 5m, 1h30m, 250ms)")
    return sum(float(n) * _SPAN_SECONDS[unit.lower()] for n, unit in parts)


def _duration_ms(value: Any) -> Any:
    """Text in any unit → milliseconds; a bare number is already milliseconds (the key says so)."""
    return parse_duration(value) * 1000 if isinstance(value, str) and not _is_number(value) else value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""A number of bytes; YAML may say ``65536``, ``64k``, ``10M`` or ``1GiB``."""
Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; YAML may say ``20``, ``90s``, ``5m``, ``1h30m`` or ``250ms``."""
DurationMs = Annotated[float, BeforeValidator(_duration_ms)]
"""Milliseconds (for keys named ``*_ms``); YAML may say ``2`` (ms) or ``2ms``, ``1s``."""


def _span_ms(value: Any) -> Any:
    """Text in any unit (``90s``, ``5m``, ``250ms``) or a number of seconds → whole milliseconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 90s or 5m")
    seconds = parse_duration(value)
    return round(seconds * 1000) if isinstance(seconds, int | float) else value


SpanMs = Annotated[int, BeforeValidator(_span_ms), Field(ge=0),
                   PlainSerializer(lambda ms: f"{ms}ms", return_type=str)]
"""A duration whose key does not say ``_ms`` (``alerts:``): YAML says ``90s``, ``5m``, ``250ms`` or
seconds; held as whole milliseconds and dumped as ``"<n>ms"``, so a dumped config reads back the same."""



class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Strict):
    """Certificate and key for a TLS listener (PEM files)."""

    cert: Path
    key: Path
    ca: Path | None = None


class ListenerConfig(_Strict):
    """One socket the broker listens on."""

    name: str = Field(default="default", pattern=NAME_PATTERN)
    type: Literal["tcp", "ws", "http"] = "tcp"
    bind: str = "127.0.0.1:1883"
    tls: TlsConfig | None = None

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, value: str) -> str:
        host, port = split_bind(value)
        if host != "localhost":
            try:
                ipaddress.ip_address(host)
            except ValueError as exc:
                raise ValueError(f"not an IP address: {host!r}") from exc
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")
        return value

    @property
    def host(self) -> str:
        return split_bind(self.bind)[0]

    @property
    def port(self) -> int:
        return split_bind(self.bind)[1]

    @property
    def is_loopback(self) -> bool:
        """Anonymous access is only ever allowed on a loopback listener."""
        return self.host == "localhost" or ipaddress.ip_address(self.host).is_loopback


class StoreConfig(_Strict):
    path: Path = Path("fishim.db")
    # PostgreSQL instead of the SQLite file (postgresql://USER[:PASS]@HOST:PORT/DB): for bridges on
    # several machines sharing one store, one active and the others standing by (docs/postgres.md).
    url: str | None = Field(default=None, pattern=r"^postgres(ql)?://")
    # How long a dead writer's PostgreSQL session may keep the writer lock (server-side keepalives).
    lock_timeout: Duration = Field(default=10.0, ge=2, le=600)
    # SQLite's PRAGMA synchronous for the writer (WAL mode). FULL (default): a PUBACKed message
    # survives kill -9 AND power loss (one fsync per group commit). NORMAL: survives kill -9 of
    # fishim (the OS has the WAL), may lose the last commits on power loss. OFF: neither, for tests.
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = "FULL"

    @property
    def target(self) -> Path | str:
        """What :func:`fishim.store.open_store` opens: the URL if set, else the SQLite path."""
        return self.url or self.path


class Limits(_Strict):
    """Bounds that keep one bad or slow client from hurting everyone else."""

    max_payload: ByteSize = Field(default=64 * 1024, gt=0, le=1024 * 1024)
    max_queued: int = Field(default=10_000, gt=0)
    max_topic_length: int = Field(default=256, gt=0, le=65535)
    max_inline_media: ByteSize = Field(default=16 * 1024, ge=0)
    sync_page_events: int = Field(default=200, gt=0, le=10_000)
    sync_page_bytes: ByteSize = Field(default=256 * 1024, gt=1024)
    login_failures_per_minute: int = Field(default=10, gt=0)
    login_failures_per_address: int = Field(default=100, gt=0)
    max_concurrent_logins: int = Field(default=8, gt=0)
    max_connections_per_address: int = Field(default=256, ge=0)
    max_filters_per_subscribe: int = Field(default=64, gt=0, le=10_000)
    max_subscriptions: int = Field(default=256, gt=0)
    max_queued_bytes: ByteSize = Field(default=16 * 1024 * 1024, gt=0)
    publish_rate: float = Field(default=50.0, ge=0)
    publish_burst: int = Field(default=200, gt=0)


class BrokerSettings(_Strict):
    keepalive_grace: float = Field(default=1.5, ge=1.0, le=10.0)
    max_inflight: int = Field(default=100, gt=0)
    retry_interval: Duration = Field(default=20.0, gt=0)
    session_expiry: Duration = Field(default=7 * 86_400.0, ge=0)
    account_check_interval: Duration = Field(default=5.0, gt=0)


class BridgeConfig(_Strict):
    client_id: str = Field(default="fishim-bridge", pattern=NAME_PATTERN)
    username: str = Field(default="fishim-bridge", pattern=NAME_PATTERN)
    batch_max: int = Field(default=500, gt=0, le=10_000)
    batch_wait_ms: DurationMs = Field(default=2.0, ge=0, le=100)


class MediaKind(_Strict):
    """Upload bounds for one media kind: the largest file and the MIME types accepted."""

    max_bytes: ByteSize = Field(gt=0, le=100 * 1024 * 1024)  # fishim.orders.MAX_MEDIA_BYTES
    mimes: list[str] = Field(min_length=1)


class MediaConfig(_Strict):
    """Per-kind limits for ``POST /media``; a MIME type decides the kind, so each may appear once."""

    image: MediaKind = MediaKind(max_bytes=10 * 1024 * 1024,
                                 mimes=["image/jpeg", "image/png", "image/webp", "image/heic", "image/gif"])
    voice: MediaKind = MediaKind(max_bytes=10 * 1024 * 1024,
                                 mimes=["audio/ogg", "audio/mpeg", "audio/mp4", "audio/aac", "audio/webm",
                                        "audio/wav"])
    video: MediaKind = MediaKind(max_bytes=50 * 1024 * 1024, mimes=["video/mp4", "video/webm", "video/quicktime"])
    file: MediaKind = MediaKind(max_bytes=10 * 1024 * 1024, mimes=["application/pdf"])

    @model_validator(mode="after")
    def _one_kind_per_mime(self) -> MediaConfig:
        mimes = [m for kind in self.kinds().values() for m in kind.mimes]
        if len(set(mimes)) < len(mimes):
            raise ValueError("a MIME type may belong to one kind only")
        return self

    def kinds(self) -> dict[str, MediaKind]:
        return {"image": self.image, "voice": self.voice, "video": self.video, "file": self.file}


class HttpSettings(_Strict):
    """The ``http`` listener's behaviour (the listener itself is in ``listeners``)."""

    public_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    requests_per_minute: int = Field(default=600, gt=0)
    # Where the web pages (tracking page, shop console) open MQTT over WebSocket. Default: the first
    # ``ws`` listener's port on the host the page was loaded from (fishim.http.pages).
    ws_url: str | None = Field(default=None, pattern=r"^wss?://[^\s/]+(/[^\s]*)?$")


class WebhookConfig(_Strict):
    """One receiver of events: POSTed JSON signed with ``secret`` (HMAC-SHA256)."""

    url: str = Field(pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    events: list[Literal["status", "alert", "chat"]] = Field(min_length=1)
    secret: str = Field(min_length=16, repr=False)
    max_attempts: int = Field(default=10, gt=0, le=100)
    backoff_s: Duration = Field(default=2.0, gt=0, le=3600)
    backoff_max_s: Duration = Field(default=600.0, gt=0, le=86400)
    timeout_s: Duration = Field(default=10.0, gt=0, le=120)


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: Path | None = None


Priority = Literal["urgent", "high", "normal", "low"]
_QUIET = r"^([01]\d|2[0-3]):[0-5]\d-([01]\d|2[0-3]):[0-5]\d$"


class AlertsConfig(_Strict):
    """``alerts:``: how long each condition may last before someone is told (fishim.alerts)."""

    enabled: bool = True
    mention_after: SpanMs = 10_000  # a mention read within this long needs no notification
    status_after: SpanMs = 5_000  # status notices to customers wait this long (and coalesce)
    unanswered_customer_after: SpanMs = 300_000
    escalate_after: SpanMs = 600_000  # an alert open this long goes to the owner, once
    unassigned_packed_after: SpanMs = 600_000
    pickup_overdue_after: SpanMs = 900_000
    rider_offline_after: SpanMs = 300_000
    order_late_after: SpanMs = 0  # grace after an order's eta
    delivery_failed_after: SpanMs = 0
    push_delay: SpanMs = 120_000  # off-app push only if the notification is still unread by then
    push_attempts: int = Field(default=5, ge=1, le=20)
    push_backoff: SpanMs = 5_000  # first retry delay; doubles per attempt
    tick: SpanMs = Field(default=1_000, gt=0)  # how often deadlines are checked
    timezone: str | None = None  # IANA name for quiet hours; the machine's local time if unset
    quiet_hours: dict[str, Annotated[str, Field(pattern=_QUIET)]] = Field(default_factory=dict)  # user: HH:MM-HH:MM


class PushTarget(_Strict):
    """One ``push:`` entry: an apprise URL and who it is for (by role or by user name)."""

    url: str = Field(min_length=3)
    roles: list[Literal["owner", "staff", "rider", "customer"]] | None = None
    users: list[Annotated[str, Field(pattern=NAME_PATTERN)]] | None = None
    min_priority: Priority = "high"

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("not an apprise URL (scheme://...)")
        return value


class Config(_Strict):
    """The whole of broker.yaml."""

    prefix: str = Field(default="fishim", pattern=r"^[A-Za-z0-9_-]{1,32}(/[A-Za-z0-9_-]{1,32}){0,3}$")
    store: StoreConfig = StoreConfig()
    listeners: list[ListenerConfig] = Field(default_factory=lambda: [ListenerConfig()], min_length=1)
    limits: Limits = Limits()
    broker: BrokerSettings = BrokerSettings()
    bridge: BridgeConfig = BridgeConfig()
    logging: LoggingConfig = LoggingConfig()
    http: HttpSettings = HttpSettings()
    media: MediaConfig = MediaConfig()
    webhooks: list[WebhookConfig] = Field(default_factory=list)
    alerts: AlertsConfig = AlertsConfig()
    push: list[PushTarget] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_mqtt_listener(self) -> Config:
        if not self.mqtt_listeners:
            raise ValueError("at least one tcp or ws listener is needed (http serves only HTTP)")
        return self

    @property
    def mqtt_listeners(self) -> list[ListenerConfig]:
        """The listeners the MQTT broker opens (``http`` ones are served by :mod:`fishim.http`)."""
        return [lst for lst in self.listeners if lst.type != "http"]

    @model_validator(mode="before")
    @classmethod
    def _bridge_names_per_prefix(cls, data: Any) -> Any:
        """A shop with its own prefix gets its own bridge client id and account by default.

        Several shops may share one broker (docs/tenants.md), where MQTT client ids and usernames are
        global: two bridges on the same default client id would share one persistent session, and each
        would acknowledge, and so take from the other, messages of the other shop. ``fishim`` keeps
        the plain names, so a single shop is unchanged.
        """
        if not isinstance(data, dict) or data.get("prefix", "fishim") == "fishim":
            return data
        bridge = data.get("bridge") or {}
        if not isinstance(bridge, dict) or not isinstance(data["prefix"], str):
            return data
        name = f"fishim-bridge-{data['prefix'].replace('/', '-')}"[:64]
        return {**data, "bridge": {"client_id": name, "username": name, **bridge}}

    @property
    def listener(self) -> ListenerConfig:
        """The first TCP listener: where the bridge and the CLI connect."""
        return next((lst for lst in self.listeners if lst.type == "tcp"), self.mqtt_listeners[0])


def split_bind(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT`` too) into its parts."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def load_config(path: Path | str | None = None, env: dict[str, str] | None = None) -> Config:
    """Read broker.yaml (or defaults if the default file is absent), then apply env overrides.

    ``FISHIM_CONFIG`` names the file, ``FISHIM_DB`` overrides ``store.path`` and ``FISHIM_BIND`` the
    first listener's ``bind``.
    """
    env = dict(os.environ) if env is None else env
    explicit = path is not None or "FISHIM_CONFIG" in env
    file = Path(path if path is not None else env.get("FISHIM_CONFIG", DEFAULT_CONFIG))
    data = _read_yaml(file) if explicit or file.exists() else {}
    if "FISHIM_DB" in env:
        data.setdefault("store", {})
        data["store"] = store_override(_mapping(data["store"], file, "store"), env["FISHIM_DB"])
    if "FISHIM_BIND" in env:
        data["listeners"] = _override_bind(data.get("listeners"), env["FISHIM_BIND"], file)
    return _validate(data, file)


def store_override(store: dict[str, Any], value: str | Path) -> dict[str, Any]:
    """``FISHIM_DB`` / ``--db``: a SQLite path, or a ``postgresql://`` URL; either replaces the other."""
    text = str(value)
    if text.startswith(("postgresql://", "postgres://")):
        return {**store, "url": text}
    return {**store, "path": text, "url": None}


def _read_yaml(file: Path) -> dict[str, Any]:
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read config: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{file}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    return _mapping(data, file, "(top level)")


def _mapping(value: Any, file: Path, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{file}: {key}: expected a mapping")
    return dict(value)


def _override_bind(listeners: Any, bind: str, file: Path) -> list[dict[str, Any]]:
    items = list(listeners) if isinstance(listeners, list) and listeners else [{}]
    first = _mapping(items[0], file, "listeners.0")
    return [{**first, "bind": bind}, *items[1:]]


def _validate(data: dict[str, Any], file: Path) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = _unknown_key(err["loc"])
        raise ConfigError(f"{file}: {key}: {msg}") from None


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    """"unknown key" plus the closest known key of the same section, when one is close."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part)
        model = _model_of(field.annotation) if field is not None else None
    known = list(model.model_fields) if model is not None else []
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    return f"unknown key (did you mean {close[0]!r}?)" if close else f"unknown key (known: {', '.join(known)})"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model inside ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
