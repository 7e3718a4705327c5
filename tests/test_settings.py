"""worker.settings: environment and .env, one-line errors naming the variable, secrets never shown."""

from __future__ import annotations

from datetime import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from worker import settings as settings_module
from worker.settings import CandleSettings, RedisSettings, Settings, SettingsError, load, plaintext_warnings

REQUIRED = {
    "ANGEL_API_KEY": "key-Zq81",
    "ANGEL_CLIENT_CODE": "A123456",
    "ANGEL_PIN": "pin-7305",
    "ANGEL_TOTP_SECRET": "TOTPSECRETJBSWY3DPEHPK3PXP",
}
SECRET_VARS = ("ANGEL_API_KEY", "ANGEL_PIN", "ANGEL_TOTP_SECRET")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No real .env (cwd is empty) and no setting inherited from the developer's environment."""
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)
    return tmp_path


@pytest.fixture
def required_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in REQUIRED.items():
        monkeypatch.setenv(name, value)


def error_of(**overrides: Any) -> str:
    with pytest.raises(SettingsError) as info:
        load(**overrides)
    message = str(info.value)
    assert len(message.splitlines()) == 1  # not only \n: \r, \v, \x1c, \x85, \u2028 … break lines too
    assert info.value.__cause__ is None
    assert info.value.__context__ is None  # nothing of the rejected input travels with the error
    return message


# ----------------------------------------------------------------- sources


@pytest.mark.usefixtures("required_env")
def test_load_from_the_environment_with_defaults() -> None:
    s = load()
    assert s.angel_api_key.get_secret_value() == REQUIRED["ANGEL_API_KEY"]
    assert s.angel_client_code == "A123456"
    assert s.angel_pin.get_secret_value() == REQUIRED["ANGEL_PIN"]
    assert s.angel_totp_secret.get_secret_value() == REQUIRED["ANGEL_TOTP_SECRET"]
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.angel_api_url == "https://apiconnect.angelone.in"
    assert s.angel_ws_url == "wss://smartapisocket.angelone.in/smart-stream"
    assert s.angel_relogin_time == time(8, 0)
    assert s.log_level == "INFO"
    assert (s.stream_maxlen, s.events_maxlen, s.batch_max) == (10_000, 10_000, 200)


def test_load_from_a_dotenv_file_in_the_working_directory(clean_env: Path) -> None:
    lines = [f"{name}={value}" for name, value in REQUIRED.items()]
    lines += ["REDIS_URL=rediss://cache.example:6380/2", "LOG_LEVEL=debug", "STREAM_MAXLEN=500", "UNRELATED=1"]
    (clean_env / ".env").write_text("\n".join(lines) + "\n", encoding="utf-8")
    s = load()
    assert s.angel_client_code == "A123456"
    assert s.angel_totp_secret.get_secret_value() == REQUIRED["ANGEL_TOTP_SECRET"]
    assert s.redis_url == "rediss://cache.example:6380/2"
    assert s.log_level == "DEBUG"
    assert s.stream_maxlen == 500


def test_overrides_beat_the_environment_which_beats_dotenv(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text(
        "".join(f"{name}={value}\n" for name, value in REQUIRED.items()) + "BATCH_MAX=7\nBUFFER_MAX=8\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("BATCH_MAX", "70")
    monkeypatch.setenv("BUFFER_MAX", "80")
    s = load(buffer_max=800)
    assert (s.batch_max, s.buffer_max) == (70, 800)


# ----------------------------------------------------------------- missing settings


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_a_missing_required_setting_is_one_line_naming_it(monkeypatch: pytest.MonkeyPatch, missing: str) -> None:
    for name, value in REQUIRED.items():
        if name != missing:
            monkeypatch.setenv(name, value)
    message = error_of()
    assert message.startswith(f"{missing} is required")
    assert ".env.example" in message
    assert ".env" in message.replace(".env.example", "")


def test_with_nothing_set_the_error_is_still_one_line() -> None:
    message = error_of()
    assert message.count(" is required") == 1
    assert message.split(" ")[0] in REQUIRED


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


# ----------------------------------------------------------------- validators


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://user:pw@host:6380/1", "unix:///tmp/redis.sock"])
def test_redis_url_schemes_accepted(url: str) -> None:
    assert load(redis_url=url).redis_url == url


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", ""])
def test_redis_url_other_schemes_rejected(url: str) -> None:
    message = error_of(redis_url=url)
    assert message.startswith("REDIS_URL is invalid:")
    assert "redis://" in message
    assert repr(url) in message  # not a secret: the value is shown


@pytest.mark.usefixtures("required_env")
def test_redis_url_from_the_environment_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "postgres://db")
    assert error_of().startswith("REDIS_URL is invalid:")


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://apiconnect.angelone.in/", "https://apiconnect.angelone.in"),
        ("http://127.0.0.1:8700//", "http://127.0.0.1:8700"),
        ("https://example.com/api", "https://example.com/api"),
    ],
)
def test_angel_api_url_scheme_and_trailing_slash(url: str, expected: str) -> None:
    assert load(angel_api_url=url).angel_api_url == expected


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize("url", ["ftp://example.com", "apiconnect.angelone.in", "wss://x"])
def test_angel_api_url_must_be_http(url: str) -> None:
    assert error_of(angel_api_url=url).startswith("ANGEL_API_URL is invalid: must be an http(s):// URL")


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize("url", ["wss://smartapisocket.angelone.in/smart-stream", "ws://127.0.0.1:8700/smart-stream"])
def test_angel_ws_url_schemes_accepted(url: str) -> None:
    assert load(angel_ws_url=url).angel_ws_url == url


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize("url", ["https://smartapisocket.angelone.in", "smartapisocket.angelone.in"])
def test_angel_ws_url_other_schemes_rejected(url: str) -> None:
    assert error_of(angel_ws_url=url).startswith("ANGEL_WS_URL is invalid: must be a wss://")


# ----------------------------------------------------------------- TLS, and plaintext only for the simulator

ENDPOINT_VARS = ("ANGEL_API_URL", "ANGEL_WS_URL", "ANGEL_INSTRUMENTS_URL")


def plain(var: str, host: str) -> str:
    return f"ws://{host}/smart-stream" if var == "ANGEL_WS_URL" else f"http://{host}/x"


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize("var", ENDPOINT_VARS)
@pytest.mark.parametrize(
    "host", ["127.0.0.1:8700", "127.5.6.7", "localhost:8700", "LocalHost", "[::1]:8700", "[::ffff:127.0.0.1]:8700"]
)
def test_plaintext_to_a_loopback_host_is_accepted(var: str, host: str) -> None:
    url = plain(var, host)
    assert getattr(load(**{var.lower(): url}), var.lower()) == url


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize("var", ENDPOINT_VARS)
@pytest.mark.parametrize(
    ("host", "named"),
    [("sim:8700", "sim"), ("10.0.0.5", "10.0.0.5"), ("apiconnect.angelone.in", "apiconnect.angelone.in"),
     ("127.0.0.1.evil.example", "127.0.0.1.evil.example"), ("0.0.0.0:8700", "0.0.0.0"),
     ("[2001:db8::1]:80", "2001:db8::1"), ("localhost.evil.example", "localhost.evil.example"),
     ("[::ffff:10.0.0.5]", "::ffff:10.0.0.5")],
)  # fmt: skip
def test_plaintext_to_any_other_host_is_refused(var: str, host: str, named: str) -> None:
    url = plain(var, host)
    scheme = url.split(":")[0]
    assert error_of(**{var.lower(): url}) == (
        f"{var} is invalid: {scheme}:// to {named!r} is unencrypted (credentials and ticks in clear): use "
        f"{scheme}s://, or set ANGEL_ALLOW_PLAINTEXT=true if it is a simulator on a network you trust (got {url!r})"
    )


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize("var", ENDPOINT_VARS)
def test_plaintext_to_another_host_with_the_explicit_opt_in(monkeypatch: pytest.MonkeyPatch, var: str) -> None:
    monkeypatch.setenv("ANGEL_ALLOW_PLAINTEXT", "true")
    monkeypatch.setenv(var, plain(var, "sim:8700"))
    assert getattr(load(), var.lower()).startswith(("http://sim:8700", "ws://sim:8700"))
    monkeypatch.setenv("ANGEL_ALLOW_PLAINTEXT", "perhaps")
    assert error_of().startswith("ANGEL_ALLOW_PLAINTEXT is invalid: Input should be a valid boolean")


@pytest.mark.usefixtures("required_env")
def test_tls_endpoints_need_no_opt_in_and_a_file_is_not_a_url() -> None:
    s = load(
        angel_api_url="https://api.example:8443/", angel_ws_url="wss://10.0.0.5/s", angel_instruments_url="master.json"
    )
    assert (s.angel_api_url, s.angel_ws_url, s.angel_instruments_url) == (
        "https://api.example:8443", "wss://10.0.0.5/s", "master.json",
    )  # fmt: skip
    assert plaintext_warnings(s) == []


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize("var", ENDPOINT_VARS)
@pytest.mark.parametrize(
    ("url", "message"),
    [("https://", "must name a host: scheme://host[:port]/path"),
     ("https://:443/x", "must name a host: scheme://host[:port]/path"),
     ("https://[::1/x", "is not a valid URL (Invalid IPv6 URL)"),
     ("https://host:99999/x", "is not a valid URL (Port out of range 0-65535)"),
     ("https://host:port/x", "is not a valid URL (Port could not be cast to integer value as 'port')")],
)  # fmt: skip
def test_an_endpoint_must_be_a_url_with_a_host(var: str, url: str, message: str) -> None:
    url = url.replace("https", "wss") if var == "ANGEL_WS_URL" else url
    assert error_of(**{var.lower(): url}) == f"{var} is invalid: {message} (got {url!r})"


@pytest.mark.usefixtures("required_env")
def test_a_reason_that_quotes_the_input_raw_is_still_one_line() -> None:
    """urlsplit's NFKC check puts the host into its message as is, U+2028 (a line break) and all."""
    url = "https://a\u2028b\uff0fc/x"
    assert error_of(angel_api_url=url) == (
        "ANGEL_API_URL is invalid: is not a valid URL (netloc 'a b\uff0fc' contains invalid characters under NFKC "
        f"normalization) (got {url!r})"
    )


@pytest.mark.usefixtures("required_env")
def test_each_plaintext_endpoint_gets_a_warning_naming_it() -> None:
    s = load(
        angel_api_url="http://127.0.0.1:8700",
        angel_ws_url="wss://smartapisocket.angelone.in/smart-stream",
        angel_instruments_url="http://10.1.2.3:8700/m.json",
        angel_allow_plaintext=True,
    )
    assert plaintext_warnings(s) == [
        "ANGEL_API_URL=http://127.0.0.1:8700 is UNENCRYPTED (no TLS): only for the local simulator, never Angel One",
        "ANGEL_INSTRUMENTS_URL=http://10.1.2.3:8700/m.json is UNENCRYPTED (no TLS) and leaves this machine, allowed "
        "by ANGEL_ALLOW_PLAINTEXT=true: only for a simulator on a network you trust, never Angel One",
    ]
    assert plaintext_warnings(load()) == []  # the defaults: Angel One, TLS


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize(
    ("given", "level"), [("debug", "DEBUG"), ("Info", "INFO"), ("warning", "WARNING"), ("ERROR", "ERROR")]
)
def test_log_level_is_case_insensitive(monkeypatch: pytest.MonkeyPatch, given: str, level: str) -> None:
    monkeypatch.setenv("LOG_LEVEL", given)
    assert load().log_level == level


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize("level", ["trace", "CRITICAL", ""])
def test_log_level_invalid(level: str) -> None:
    message = error_of(log_level=level)
    assert message == f"LOG_LEVEL is invalid: must be DEBUG, INFO, WARNING or ERROR (got {level!r})"


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("stream_maxlen", 0),
        ("events_maxlen", -1),
        ("buffer_max", 0),
        ("batch_max", -5),
        ("heartbeat_interval", 0),
        ("stall_timeout", -0.5),
        ("reconnect_initial", 0.0),
        ("reconnect_max", -30),
        ("healthy_after", 0),
        ("connect_timeout", 0),
        ("redis_retry_max", -1),
        ("shutdown_timeout", 0),
        ("reconnect_jitter", -0.1),
        ("batch_linger_ms", -1),
        ("batch_linger_ms", 100.5),
    ],
)
def test_numbers_out_of_range(name: str, value: float) -> None:
    message = error_of(**{name: value})
    assert message.startswith(f"{name.upper()} is invalid: Input should be ")
    assert message.endswith(f"(got {value!r})")


@pytest.mark.usefixtures("required_env")
def test_numbers_at_the_edges_are_accepted() -> None:
    s = load(reconnect_jitter=0, batch_linger_ms=100, stream_maxlen=1, heartbeat_interval=0.001)
    assert (s.reconnect_jitter, s.batch_linger_ms, s.stream_maxlen, s.heartbeat_interval) == (0, 100, 1, 0.001)


@pytest.mark.usefixtures("required_env")
def test_numbers_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STALL_TIMEOUT", "2.5")
    monkeypatch.setenv("BATCH_MAX", "50")
    s = load()
    assert (s.stall_timeout, s.batch_max) == (2.5, 50)
    monkeypatch.setenv("BATCH_MAX", "lots")
    message = error_of()
    assert message.startswith("BATCH_MAX is invalid:")
    assert message.endswith("(got 'lots')")


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize(
    ("text", "expected"), [("08:30", time(8, 30)), ("07:05:00", time(7, 5)), ("23:59", time(23, 59))]
)
def test_relogin_time(monkeypatch: pytest.MonkeyPatch, text: str, expected: time) -> None:
    monkeypatch.setenv("ANGEL_RELOGIN_TIME", text)
    assert load().angel_relogin_time == expected


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize("text", ["25:00", "8.30am", "noon"])
def test_relogin_time_invalid(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("ANGEL_RELOGIN_TIME", text)
    message = error_of()
    assert message.startswith("ANGEL_RELOGIN_TIME is invalid:")
    assert message.endswith(f"(got {text!r})")


@pytest.mark.usefixtures("required_env")
def test_empty_client_code_is_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANGEL_CLIENT_CODE", "")
    assert error_of().startswith("ANGEL_CLIENT_CODE is invalid:")


# ----------------------------------------------------------------- secrets


@pytest.mark.usefixtures("required_env")
@pytest.mark.parametrize("var", SECRET_VARS)
def test_an_invalid_secret_is_named_but_never_shown(var: str) -> None:
    leaked = "hunter2-do-not-print"
    message = error_of(**{var.lower(): [leaked]})
    assert message.startswith(f"{var} is invalid:")
    assert leaked not in message
    assert "**********" in message


@pytest.mark.usefixtures("required_env")
def test_masked_never_contains_the_secrets() -> None:
    s = load(angel_relogin_time="08:30")
    masked = s.masked()
    assert set(masked) == set(Settings.model_fields)
    for var in SECRET_VARS:
        assert masked[var.lower()] == "**********"
    text = repr(masked) + str(masked)
    for var in SECRET_VARS:
        assert REQUIRED[var] not in text
    assert masked["angel_client_code"] == "A123456"  # not a secret
    assert masked["angel_relogin_time"] == time(8, 30)
    assert masked["redis_url"] == s.redis_url
    assert REQUIRED["ANGEL_PIN"] not in repr(s)


def test_an_error_without_a_location_names_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole-model error (no field in ``loc``) is still one line, and nothing is masked for it."""

    def broken(**_: Any) -> Settings:
        details: list[InitErrorDetails] = [
            {"type": PydanticCustomError("custom", "the settings disagree"), "loc": (), "input": "whole"}
        ]
        raise ValidationError.from_exception_data("Settings", details)

    monkeypatch.setattr(settings_module, "Settings", broken)
    assert error_of() == "settings is invalid: the settings disagree (got 'whole')"


# ----------------------------------------------------------------- RedisSettings


def test_redis_settings_default_and_needs_no_angel_credentials() -> None:
    assert RedisSettings().redis_url == "redis://localhost:6379/0"


def test_redis_settings_from_environment_and_dotenv(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text("REDIS_URL=redis://from-dotenv:6379/3\nANGEL_PIN=1\n", encoding="utf-8")
    assert RedisSettings().redis_url == "redis://from-dotenv:6379/3"
    monkeypatch.setenv("REDIS_URL", "redis://from-env:6379/4")
    assert RedisSettings().redis_url == "redis://from-env:6379/4"


@pytest.mark.parametrize("name", ["ANGEL_API_KEY", "ANGEL_PIN", "ANGEL_TOTP_SECRET"])
def test_an_empty_secret_is_refused_and_the_error_keeps_no_trace_of_it(
    name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for key, value in {
        "ANGEL_API_KEY": "k",
        "ANGEL_CLIENT_CODE": "C1",
        "ANGEL_PIN": "9",
        "ANGEL_TOTP_SECRET": "S",
    }.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(name, "")
    with pytest.raises(SettingsError, match=f"^{name} is invalid") as caught:
        load()
    assert caught.value.__context__ is None
    assert caught.value.__cause__ is None


def test_env_example_names_every_setting_and_loads_as_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    example = (Path(__file__).parent.parent / ".env.example").read_text()
    named = {line.lstrip("# ").split("=", 1)[0] for line in example.splitlines() if "=" in line.split(" ")[-1]}
    assert {name.upper() for name in Settings.model_fields} <= named
    assert {name.upper() for name in CandleSettings.model_fields} <= named
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    (tmp_path / ".env").write_text(example)
    loaded = load()
    assert loaded.angel_ws_url == "ws://127.0.0.1:8700/smart-stream"
    assert loaded.stream_maxlen == Settings.model_fields["stream_maxlen"].default


def test_the_log_format_is_text_or_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    base = {"angel_api_key": "k", "angel_client_code": "C1", "angel_pin": "9", "angel_totp_secret": "S"}
    assert load(**base, log_format="JSON").log_format == "json"
    with pytest.raises(SettingsError, match="LOG_FORMAT is invalid: must be text or json"):
        load(**base, log_format="xml")


# ----------------------------------------------------------------- fuzz: whatever the input, one line naming it

FIELDS = sorted(Settings.model_fields)
SCHEMES = st.sampled_from(["http://", "https://", "ws://", "wss://", "redis://", "rediss://", "unix://", ""])
#: Any character, and more often the ones URL parsers and one-line messages trip on: delimiters, their
#: full-width look-alikes (NFKC turns them into delimiters), line breaks beyond \n, controls, non-ASCII.
TRICKY = "/:?#@[]%\\ \t\r\n\v\f\x1c\x85\u2028\u2029\x00\x7f\uff0f\uff1a\uff1f\uff03\uff20\u2100\u00e9\u0964"
URL_CHARS = st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from(TRICKY)
HOSTS = st.sampled_from(["127.0.0.1", "localhost", "[::1]", "sim", "[::1", "::", "10.0.0.5", "", "127.0.0.1.x"])
URLS = st.builds(
    lambda scheme, host, port, path: scheme + host + port + path,
    SCHEMES,
    HOSTS | st.text(URL_CHARS) | st.tuples(HOSTS, st.text(URL_CHARS, max_size=3)).map("".join),
    st.sampled_from(["", ":8700", ":0", ":65536", ":-1", ":port", ":"])
    | st.text(URL_CHARS, max_size=4).map(":".__add__),
    st.text(URL_CHARS, max_size=12),
)
NUMBERS = st.one_of(
    st.integers(), st.floats(), st.decimals(allow_nan=True), st.sampled_from(["0", "-1", "1e309", "nan", "inf", "-0"])
)
VALUES = st.one_of(
    URLS, NUMBERS, NUMBERS.map(str), st.text(URL_CHARS), st.booleans(), st.none(), st.binary(max_size=8),
    st.lists(st.integers(), max_size=2), st.times(), st.sampled_from(["true", "no", "25:00", "08:30", "json", "x"]),
)  # fmt: skip
#: What the environment can hold: str without NUL (and without lone surrogates, as URL_CHARS).
ENV_TEXT = st.one_of(URLS, NUMBERS.map(str), st.text(URL_CHARS)).map(lambda text: text.replace("\x00", ""))


def check_loaded_or_one_line(overrides: dict[str, Any]) -> None:
    """Settings, or SettingsError: one line naming a setting, no exception chained; anything else fails."""
    try:
        load(**overrides)
    except SettingsError as exc:
        error = exc
    else:
        return
    message = str(error)
    assert len(message.splitlines()) == 1, message
    assert error.__cause__ is None
    assert error.__context__ is None
    name, _, rest = message.partition(" is ")
    assert name.lower() in Settings.model_fields, message
    assert rest.startswith(("invalid: ", "required: ")), message
    if name in SECRET_VARS:
        assert "**********" in message


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=4))
@pytest.mark.usefixtures("required_env")
def test_fuzz_any_overrides_load_or_fail_with_one_line_naming_the_setting(overrides: dict[str, Any]) -> None:
    check_loaded_or_one_line(overrides)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(FIELDS), ENV_TEXT, max_size=4))
@pytest.mark.usefixtures("required_env")
def test_fuzz_any_environment_loads_or_fails_with_one_line_naming_the_setting(env: dict[str, str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name.upper(), value)
        check_loaded_or_one_line({})


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sampled_from([var.lower() for var in ENDPOINT_VARS]),
    st.sampled_from(["http://", "https://", "ws://", "wss://"]),
    st.text(st.sampled_from(TRICKY + "a1.-"), max_size=8),
    st.text(URL_CHARS, max_size=8),
    st.booleans(),
)
@pytest.mark.usefixtures("required_env")
def test_fuzz_endpoints_with_awkward_hosts_load_or_fail_with_one_line(
    name: str, scheme: str, host: str, rest: str, allow_plaintext: bool
) -> None:
    check_loaded_or_one_line({name: scheme + host + rest, "angel_allow_plaintext": allow_plaintext})
