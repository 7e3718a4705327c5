"""The one adapter around smartapi-python: login, and every SDK quirk contained here.

Nothing else in angelstream imports ``SmartApi``. What is contained (protocol spec §5.1, §5.6):

* importing ``SmartApi`` runs ``requests.get("https://api.ipify.org")`` with no timeout in a class
  body (it can hang for ever on a black-holed network, and its result is thrown away anyway):
  we import with that one call refused;
* every ``SmartConnect(...)``/``SmartWebSocketV2(...)`` creates ``./logs/<date>/app.log`` in the
  working directory and repoints logzero at it: both SDK modules get a ``logzero``/``os`` whose
  ``logfile``/``makedirs`` do nothing;
* the SDK's logzero logger prints request headers and bodies on errors, i.e. the API key, the
  PIN and the TOTP: it is disabled.

The SDK's ``SmartWebSocketV2`` is used only as a test oracle and a benchmark baseline
(:func:`sdk_packet_parser`); the worker speaks the protocol itself (``worker.protocol``).
"""

from __future__ import annotations

import logging
import os
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyotp
import requests

log = logging.getLogger(__name__)

_lock = threading.Lock()
_sdk: types.SimpleNamespace | None = None


def _refusing_get(importer: int, real_get: Callable[..., Any]) -> Callable[..., Any]:
    """``requests.get`` while the SDK is imported: refused in the importing thread, untouched in any
    other (the worker's other threads may be fetching something meanwhile)."""

    def get(url: str, *args: Any, **kwargs: Any) -> Any:
        if threading.get_ident() == importer:
            raise requests.ConnectionError(f"angelstream: the SDK's import-time lookup of {url} is disabled")
        return real_get(url, *args, **kwargs)

    return get


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None


def load_sdk() -> types.SimpleNamespace:
    """Import smartapi-python with its side effects contained; returns its two classes."""
    global _sdk  # noqa: PLW0603 - one import per process, guarded by the lock
    with _lock:
        if _sdk is None:
            import logzero  # noqa: PLC0415 - imported only with the SDK

            logzero.logger.disabled = True  # it logs credentials on errors
            real_get = requests.get
            requests.get = _refusing_get(threading.get_ident(), real_get)
            try:
                from SmartApi import smartConnect, smartWebSocketV2  # noqa: PLC0415 - the contained import
            finally:
                requests.get = real_get
            quiet_logzero = types.SimpleNamespace(logfile=_no_op)
            no_dirs_os = types.SimpleNamespace(path=os.path, makedirs=_no_op)
            for module in (smartConnect, smartWebSocketV2):
                module.logzero = quiet_logzero
                module.os = no_dirs_os
            _sdk = types.SimpleNamespace(
                SmartConnect=smartConnect.SmartConnect, SmartWebSocketV2=smartWebSocketV2.SmartWebSocketV2
            )
        return _sdk


def sdk_packet_parser() -> Callable[[bytes], dict[str, Any]]:
    """The SDK's own ``SmartWebSocketV2._parse_binary_data``, bound to a throwaway instance."""
    client = load_sdk().SmartWebSocketV2("jwt", "api-key", "client", "feed")
    parser: Callable[[bytes], dict[str, Any]] = client._parse_binary_data
    return parser


# --------------------------------------------------------------------------- login


class LoginError(Exception):
    """Angel refused the login or could not be reached; the message never contains a secret."""


@dataclass(frozen=True)
class Session:
    """What a login yields. Tokens are kept out of ``repr`` so they cannot reach a log line."""

    client_code: str
    jwt_token: str = field(repr=False)  # "Bearer eyJ…", as SmartConnect returns it
    feed_token: str = field(repr=False)
    refresh_token: str = field(repr=False)


def login(api_url: str, api_key: str, client_code: str, pin: str, totp_secret: str, timeout: float = 10.0) -> Session:
    """Log in through ``SmartConnect.generateSession`` with a fresh TOTP."""
    try:
        totp = pyotp.TOTP(totp_secret).now()
    except Exception:
        raise LoginError("ANGEL_TOTP_SECRET is not a valid base32 TOTP secret") from None
    # disable_ssl=False: requests verifies the certificate (the SDK's default, made explicit here).
    connect = load_sdk().SmartConnect(api_key=api_key, root=api_url, timeout=timeout, disable_ssl=False)
    try:
        reply = connect.generateSession(client_code, pin, totp)
    except Exception as exc:
        raise LoginError(f"login request to {api_url} failed: {type(exc).__name__}") from None
    data = reply.get("data") if isinstance(reply, dict) else None
    if not isinstance(reply, dict) or not reply.get("status") or not isinstance(data, dict):
        message = reply.get("message", "no message") if isinstance(reply, dict) else "unexpected reply"
        code = (reply.get("errorcode") or reply.get("errorCode") or "") if isinstance(reply, dict) else ""
        raise LoginError(f"Angel refused the login for {client_code}: {message} {code}".rstrip())
    try:
        return Session(client_code, data["jwtToken"], data["feedToken"], data["refreshToken"])
    except KeyError as exc:
        raise LoginError(f"login reply from {api_url} lacks {exc.args[0]}") from None
