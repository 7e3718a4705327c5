"""Every setting of the worker, from the environment and an optional ``.env`` (pydantic-settings).

Nothing else reads the environment. Secrets are ``SecretStr``: they print as ``**********``.
A missing or invalid setting is reported by :func:`load` as one line naming it.

Angel's endpoints are https:// and wss://, always with certificate verification. Plaintext
(http://, ws://) is the opt-out for the simulator: accepted for a loopback host (127.0.0.0/8, ::1,
their IPv4-mapped form ::ffff:127.x.y.z, localhost), refused for any other host unless
``ANGEL_ALLOW_PLAINTEXT=true``; the worker warns about each plaintext endpoint at startup
(:func:`plaintext_warnings`).
"""

from __future__ import annotations

import ipaddress
import re
from datetime import time, timedelta, timezone
from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PositiveFloat = Annotated[float, Field(gt=0)]
_S = TypeVar("_S", bound=BaseSettings)
PositiveInt = Annotated[int, Field(gt=0)]

#: India's time zone (no daylight saving time): every wall time in the settings is in it.
IST = timezone(timedelta(hours=5, minutes=30), "IST")

ANGEL_API_URL = "https://apiconnect.angelone.in"
ANGEL_WS_URL = "wss://smartapisocket.angelone.in/smart-stream"
ANGEL_INSTRUMENTS_URL = "https://margincalculator.angelbroking.com/OpenAPI_File/files/OpenAPIScripMaster.json"


class SettingsError(ValueError):
    """A setting is missing or invalid; the message is one line naming it."""


class RedisSettings(BaseSettings):
    """Only what a reader of the streams needs (no Angel credentials)."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True)

    redis_url: str = Field("redis://localhost:6379/0", description="Redis to read from")


class CandleSettings(RedisSettings):
    """``angelstream candles``: the candle builder (reads the tick streams, writes candles)."""

    candle_intervals: str = Field("1m", description="comma-separated intervals, e.g. 1m,5m,15m,1h,1d")
    candle_sessions: str = Field(
        "", description="session starts (IST) overriding the defaults, e.g. MCX=09:00,NSE=09:15"
    )
    candle_grace: float = Field(5.0, ge=0, description="seconds after a candle's end before a timer closes it")
    candle_name: str = Field("", description="this replica's consumer name (default: the host name)")
    candle_lease: PositiveFloat = Field(10.0, description="seconds a replica holds a symbol without renewing")
    candles_maxlen: PositiveInt = Field(100_000, description="entries kept per candle stream (MAXLEN ~)")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True)

    # --- Redis
    redis_url: str = Field("redis://localhost:6379/0", description="Redis to write to (redis://, rediss:// for TLS)")
    stream_maxlen: PositiveInt = Field(10_000, description="entries kept per tick stream (MAXLEN ~)")
    events_maxlen: PositiveInt = Field(10_000, description="entries kept in angelstream:events (MAXLEN ~)")

    # --- Angel One account
    angel_api_key: SecretStr = Field(min_length=1, description="SmartAPI app key")
    angel_client_code: str = Field(min_length=1, description="Angel One client code, e.g. A123456")
    angel_pin: SecretStr = Field(min_length=1, description="the account PIN (MPIN) used to log in")
    angel_totp_secret: SecretStr = Field(min_length=1, description="base32 TOTP secret of the account")
    angel_allow_plaintext: bool = Field(
        False, description="allow http:// and ws:// to a host other than loopback (a simulator elsewhere)"
    )
    angel_api_url: str = Field(ANGEL_API_URL, description="REST root for login")
    angel_ws_url: str = Field(ANGEL_WS_URL, description="SmartStream WebSocket URL")
    angel_instruments_url: str = Field(ANGEL_INSTRUMENTS_URL, description="instrument master: https URL or file path")
    angel_relogin_time: time = Field(
        time(8, 0), description="daily fresh login, Asia/Kolkata wall time (HH:MM), before the market opens"
    )

    # --- Feed connection
    heartbeat_interval: PositiveFloat = Field(10.0, description="seconds between text pings")
    stall_timeout: PositiveFloat = Field(30.0, description="seconds without any frame before reconnecting")
    reconnect_initial: PositiveFloat = Field(0.5, description="first reconnect delay, seconds (then doubles)")
    reconnect_max: PositiveFloat = Field(30.0, description="cap of the reconnect delay before its jitter, seconds")
    reconnect_jitter: float = Field(1.0, ge=0, description="random seconds added to each reconnect delay (capped too)")
    healthy_after: PositiveFloat = Field(
        10.0, description="a connection up this long resets the reconnect delay (shorter ones count as failures)"
    )
    connect_timeout: PositiveFloat = Field(10.0, description="seconds for login and the WebSocket upgrade")
    angel_max_connections: PositiveInt = Field(
        3, description="feed connections per client code (Angel allows 3), each with at most 1000 tokens"
    )

    # --- Control plane and health
    reconcile_interval: PositiveFloat = Field(
        30.0, description="seconds between re-reads of angelstream:subscriptions (commands apply at once)"
    )
    control_rate: PositiveFloat = Field(
        10.0, description="commands/s accepted on angelstream:control on average; more are refused"
    )
    control_burst: PositiveInt = Field(
        50, description="commands accepted at once on angelstream:control before CONTROL_RATE applies"
    )
    status_interval: PositiveFloat = Field(
        1.0, description="seconds between updates of angelstream:state and the angelstream:heartbeat key"
    )
    stale_after: PositiveFloat = Field(60.0, description="a live symbol without a tick for this long is stale")
    instruments_cache: str = Field(
        ".angelstream/instruments.json",
        description="local copy of the instrument master, used when the download fails ('' for none)",
    )

    # --- Writer
    buffer_max: PositiveInt = Field(200_000, description="ticks buffered while Redis is slow or down")
    batch_max: PositiveInt = Field(200, description="XADDs per pipeline")
    batch_linger_ms: float = Field(0.0, ge=0, le=100, description="wait this long for a batch to fill")
    redis_retry_max: PositiveFloat = Field(5.0, description="cap of the delay between Redis write retries, seconds")
    shutdown_timeout: PositiveFloat = Field(4.0, description="seconds to flush on SIGTERM before exiting")

    # --- Health, metrics, logs
    health_host: str = Field(
        "127.0.0.1", description="address of /healthz, /readyz and /metrics (0.0.0.0 in a container)"
    )
    health_port: int = Field(
        8000, ge=0, le=65535, description="port of /healthz, /readyz and /metrics (0: any free port)"
    )
    market_open: time = Field(time(9, 15), description="IST, weekdays: from here /readyz requires fresh data")
    market_close: time = Field(time(15, 30), description="IST: until here /readyz requires fresh data")
    fresh_within: PositiveFloat = Field(
        30.0, description="in market hours, the last tick must be this recent (seconds)"
    )
    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    log_format: str = Field("text", description="text (key=value) or json (one object per line)")

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("angel_api_url")
    @classmethod
    def _http_scheme(cls, value: str, info: ValidationInfo) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s):// URL")
        _check_endpoint(value, info)
        return value.rstrip("/")

    @field_validator("angel_ws_url")
    @classmethod
    def _ws_scheme(cls, value: str, info: ValidationInfo) -> str:
        if not value.startswith(("wss://", "ws://")):
            raise ValueError("must be a wss:// (or ws:// for the local simulator) URL")
        _check_endpoint(value, info)
        return value

    @field_validator("angel_instruments_url")
    @classmethod
    def _instruments_source(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith(("https://", "http://")):
            _check_endpoint(value, info)
        return value  # else a file path

    @field_validator("log_format")
    @classmethod
    def _format(cls, value: str) -> str:
        if value.lower() not in ("text", "json"):
            raise ValueError("must be text or json")
        return value.lower()

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value.upper()

    def masked(self) -> dict[str, Any]:
        """The effective configuration, secrets masked (safe to print or log)."""
        shown = {name: ("**********" if isinstance(v, SecretStr) else v) for name, v in self}
        return shown | {"redis_url": redact_url(self.redis_url)}


PLAINTEXT = ("http://", "ws://")
ENDPOINTS = ("angel_api_url", "angel_ws_url", "angel_instruments_url")


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8, ::1 or 127.0.0.0/8 mapped into IPv6 (``::ffff:127.0.0.1``): traffic
    that never leaves this machine."""
    if host.lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # Python < 3.13 does not look into it
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def host_of(url: str) -> str:
    """The host of an http(s)/ws(s) URL; ValueError (a one-line reason) if it has none."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed for its ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if not parts.hostname:
        raise ValueError("must name a host: scheme://host[:port]/path")
    return parts.hostname


def _check_endpoint(url: str, info: ValidationInfo) -> None:
    host = host_of(url)
    if url.startswith(PLAINTEXT) and not is_loopback(host) and not info.data.get("angel_allow_plaintext"):
        scheme = url.split(":", 1)[0]
        raise ValueError(
            f"{scheme}:// to {host!r} is unencrypted (credentials and ticks in clear): use {scheme}s://, "
            "or set ANGEL_ALLOW_PLAINTEXT=true if it is a simulator on a network you trust"
        )


def plaintext_warnings(settings: Settings) -> list[str]:
    """One line per Angel endpoint without TLS, for the worker to log at startup."""
    lines = []
    for name in ENDPOINTS:
        url = getattr(settings, name)
        if not url.startswith(PLAINTEXT):
            continue
        if is_loopback(host_of(url)):
            lines.append(f"{name.upper()}={url} is UNENCRYPTED (no TLS): only for the local simulator, never Angel One")
        else:
            lines.append(
                f"{name.upper()}={url} is UNENCRYPTED (no TLS) and leaves this machine, allowed by "
                "ANGEL_ALLOW_PLAINTEXT=true: only for a simulator on a network you trust, never Angel One"
            )
    return lines


def redact_url(url: str) -> str:
    """A Redis URL without its password."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


def _describe(error: dict[str, Any]) -> str:
    name = str(error["loc"][0]).upper() if error["loc"] else "settings"
    if error["type"] == "missing":
        return f"{name} is required: set it in the environment or in .env (see .env.example)"
    message = re.sub(r"^Value error, ", "", str(error["msg"]))
    message = " ".join(message.splitlines())  # a reason may quote the input raw (urlsplit's does): still one line
    return f"{name} is invalid: {message} (got {error.get('input')!r})"


def load(**overrides: Any) -> Settings:
    """Settings from the environment and ``.env``; ``overrides`` win (tests, demo)."""
    return load_as(Settings, **overrides)


def load_as(kind: type[_S], **overrides: Any) -> _S:
    """Settings of ``kind`` from the environment and ``.env``, or :class:`SettingsError` naming the problem."""
    try:
        return kind(**overrides)
    except ValidationError as exc:
        first = exc.errors()[0]
    # Raised outside the handler, so the error carries no context holding the rejected (secret) input.
    secret = str(first["loc"][0] if first["loc"] else "") in _SECRET_FIELDS
    if secret:
        first = {**first, "input": "**********"}
    raise SettingsError(_describe(dict(first)))


_SECRET_FIELDS = {name for name, f in Settings.model_fields.items() if f.annotation is SecretStr}
