"""compose.yaml, the Dockerfile and requirements.lock, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.cli import _PASS_THROUGH, build_parser
from worker.settings import CandleSettings, Settings, load, plaintext_warnings

ROOT = Path(__file__).parent.parent
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SETTINGS = {name.upper() for name in Settings.model_fields} | {name.upper() for name in CandleSettings.model_fields}


def env_example_names() -> set[str]:
    lines = (ROOT / ".env.example").read_text().splitlines()
    return {line.lstrip("# ").split("=", 1)[0] for line in lines if re.match(r"^#? ?[A-Z_]+=", line)}


def test_every_service_is_there_with_an_image_or_a_build() -> None:
    assert set(SERVICES) == {"redis", "worker", "candles", "sim", "demo-worker", "demo-subscribe"}
    for name, service in SERVICES.items():
        assert "image" in service or "build" in service, name
        if service.get("build"):
            assert (ROOT / service["build"] / "Dockerfile").is_file()
    assert SERVICES["redis"]["image"].startswith("redis:7")
    assert SERVICES["redis"]["command"][1:3] == ["--appendonly", "yes"], "persistent streams"
    assert "redis-data" in COMPOSE["volumes"]
    assert SERVICES["redis"]["volumes"] == ["redis-data:/data"]


def test_the_worker_runs_with_env_file_after_a_healthy_redis_and_restarts() -> None:
    worker = SERVICES["worker"]
    assert worker["command"] == ["run"]
    assert worker["env_file"] == ".env"
    assert worker["depends_on"] == {"redis": {"condition": "service_healthy"}}
    assert worker["restart"] == "unless-stopped"
    assert "healthcheck" in SERVICES["redis"]
    assert SERVICES["candles"]["command"] == ["candles"]


@pytest.mark.parametrize("name", ["worker", "candles", "sim", "demo-worker"])
def test_each_command_is_an_angelstream_command_that_parses(name: str) -> None:
    command = SERVICES[name]["command"]
    if command[0] in _PASS_THROUGH:
        return
    args = build_parser().parse_args(command)
    assert args.command == command[0]


def test_every_variable_the_services_read_is_a_setting_and_in_env_example() -> None:
    documented = env_example_names()
    text = (ROOT / "compose.yaml").read_text()
    interpolated = set(re.findall(r"\$\{([A-Z_]+)", text))
    for name, service in SERVICES.items():
        if service["image"].startswith("redis"):
            continue
        for variable in set(service.get("environment", {})) | interpolated:
            assert variable in SETTINGS, f"{name}: {variable} is not a setting"
            assert variable in documented, f"{name}: {variable} is missing from .env.example"
    assert documented >= SETTINGS, "every setting is in .env.example"


def test_the_demo_profile_needs_no_credentials() -> None:
    demo = {name for name, s in SERVICES.items() if "demo" in s.get("profiles", [])}
    assert demo == {"sim", "demo-worker", "demo-subscribe", "candles"}
    for name in demo:
        assert "env_file" not in SERVICES[name], f"{name} must not need .env"
    env = SERVICES["demo-worker"]["environment"]
    assert env["ANGEL_API_URL"] == "http://sim:8700"
    assert env["ANGEL_WS_URL"].startswith("ws://sim:8700/")
    assert SERVICES["demo-worker"]["depends_on"]["sim"] == {"condition": "service_healthy"}
    assert plaintext_warnings(load(**{k.lower(): v for k, v in env.items()})) == [
        f"{name}={env[name]} is UNENCRYPTED (no TLS) and leaves this machine, allowed by ANGEL_ALLOW_PLAINTEXT=true: "
        "only for a simulator on a network you trust, never Angel One"
        for name in ("ANGEL_API_URL", "ANGEL_WS_URL", "ANGEL_INSTRUMENTS_URL")
    ], "the demo worker's settings load: the simulator's plain http/ws is explicitly allowed"
    assert "healthcheck" in SERVICES["sim"]
    subscribe = SERVICES["demo-subscribe"]["command"]
    assert subscribe[:5] == ["redis-cli", "-h", "redis", "HSET", "angelstream:subscriptions"]
    assert len(subscribe[5:]) % 2 == 0, "pairs of EXCHANGE:SYMBOL and mode"


def test_the_live_worker_never_allows_plaintext() -> None:
    assert "ANGEL_ALLOW_PLAINTEXT" not in SERVICES["worker"].get("environment", {})
    assert Settings.model_fields["angel_allow_plaintext"].default is False


def test_the_image_is_slim_non_root_healthchecked_and_stops_with_sigterm() -> None:
    assert re.search(r"^FROM python:3\.1[1-9]-slim", DOCKERFILE, re.MULTILINE)
    final = DOCKERFILE.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER angelstream$", final, re.MULTILINE), "the final stage runs as a non-root user"
    assert "HEALTHCHECK" in final
    assert "/healthz" in final
    assert "STOPSIGNAL SIGTERM" in final
    assert "HEALTH_HOST=0.0.0.0" in final
    assert all("--no-cache-dir" in line for line in DOCKERFILE.splitlines() if "pip install" in line)
    assert "-r requirements.lock" in DOCKERFILE
    assert "--no-deps ." in DOCKERFILE
    assert "apt-get" not in final, "no build tools in the final image"


def test_the_lock_pins_every_runtime_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{line}: every line is pinned with =="
            pinned[re.sub(r"[-_.]+", "-", name).lower()] = version
    for requirement in project["dependencies"]:
        name = re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0]
        assert re.sub(r"[-_.]+", "-", name).lower() in pinned, f"{name} is not in requirements.lock"
    assert pinned["smartapi-python"] == "1.5.5"
