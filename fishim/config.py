"""broker.yaml: one validated model for every process (broker, bridge, CLI).

A bad file or value raises :class:`ConfigError` whose message is one line naming the file and the key,
so the CLI can print it and exit 2 instead of showing a traceback.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONFIG = Path("broker.yaml")
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class ConfigError(Exception):
    """A config problem a person can fix; ``str()`` is a single line."""


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
    type: Literal["tcp", "ws"] = "tcp"
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


class Limits(_Strict):
    """Bounds that keep one bad or slow client from hurting everyone else."""

    max_payload: int = Field(default=64 * 1024, gt=0, le=1024 * 1024)
    max_queued: int = Field(default=10_000, gt=0)
    max_topic_length: int = Field(default=256, gt=0, le=65535)
    max_inline_media: int = Field(default=16 * 1024, ge=0)
    sync_page_events: int = Field(default=200, gt=0, le=10_000)
    sync_page_bytes: int = Field(default=256 * 1024, gt=1024)
    login_failures_per_minute: int = Field(default=10, gt=0)
    login_failures_per_address: int = Field(default=100, gt=0)
    max_concurrent_logins: int = Field(default=8, gt=0)
    max_connections_per_address: int = Field(default=256, ge=0)
    max_filters_per_subscribe: int = Field(default=64, gt=0, le=10_000)
    max_subscriptions: int = Field(default=256, gt=0)
    max_queued_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    publish_rate: float = Field(default=50.0, ge=0)
    publish_burst: int = Field(default=200, gt=0)


class BrokerSettings(_Strict):
    keepalive_grace: float = Field(default=1.5, ge=1.0, le=10.0)
    max_inflight: int = Field(default=100, gt=0)
    retry_interval: float = Field(default=20.0, gt=0)
    session_expiry_days: float = Field(default=7.0, ge=0)
    account_check_interval: float = Field(default=5.0, gt=0)


class BridgeConfig(_Strict):
    client_id: str = Field(default="fishim-bridge", pattern=NAME_PATTERN)
    username: str = Field(default="fishim-bridge", pattern=NAME_PATTERN)
    batch_max: int = Field(default=500, gt=0, le=10_000)
    batch_wait_ms: float = Field(default=2.0, ge=0, le=100)


class LoggingConfig(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: Path | None = None


class Config(_Strict):
    """The whole of broker.yaml."""

    prefix: str = Field(default="fishim", pattern=r"^[A-Za-z0-9_-]{1,32}(/[A-Za-z0-9_-]{1,32}){0,3}$")
    store: StoreConfig = StoreConfig()
    listeners: list[ListenerConfig] = Field(default_factory=lambda: [ListenerConfig()], min_length=1)
    limits: Limits = Limits()
    broker: BrokerSettings = BrokerSettings()
    bridge: BridgeConfig = BridgeConfig()
    logging: LoggingConfig = LoggingConfig()

    @property
    def listener(self) -> ListenerConfig:
        """The first TCP listener: where the bridge and the CLI connect."""
        return next((lst for lst in self.listeners if lst.type == "tcp"), self.listeners[0])


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
        data["store"] = {**_mapping(data["store"], file, "store"), "path": env["FISHIM_DB"]}
    if "FISHIM_BIND" in env:
        data["listeners"] = _override_bind(data.get("listeners"), env["FISHIM_BIND"], file)
    return _validate(data, file)


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
        raise ConfigError(f"{file}: {key}: {msg}") from None
