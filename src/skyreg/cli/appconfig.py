"""`skyreg.toml`, an app's configuration file (skyreg's `fly.toml`): find, read, validate, write.

    app = "web"
    primary_region = "syd"
    [build]                     # dockerfile, image, target (or build-target), [build.args]
    [env]                       # plain variables, NAME = "value"
    [deploy]                    # strategy (rolling or immediate), wait_timeout ("5m")
    [http_service]              # internal_port, force_https, auto_stop_machines,
    [[http_service.checks]]     #   min_machines_running; its checks
    [checks.NAME]               # type (http or tcp), port, path, interval, timeout, grace_period

`skyreg deploy` sends [http_service]'s internal_port and every check (its own and the
[checks.NAME]) as the release's service (`release_service`): the agent runs the checks, the
proxy routes to internal_port. force_https, auto_stop_machines and min_machines_running are
read and validated only. Check limits are the API's (at most 10 checks, paths of printable
ASCII), so a mistake is named by file and line before anything reaches the server.

Mistakes are `ConfigError`s naming the file, the line and the key; unknown keys are warnings
(`AppConfig.warnings`), since a fly.toml carries many keys skyreg does not use. tomllib gives no
positions for keys, so `_key_lines` finds them in the text.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, TypeVar

from skyreg.cli.waiting import MAX_WAIT
from skyreg.services.names import (
    ARG_RE,
    MAX_BUILD_ARG_VALUE,
    MAX_BUILD_ARGS,
    REGION_RE,
    STRATEGIES,
    TARGET_RE,
    is_dns_label,
    parse_duration,
)

CONFIG_NAME = "skyreg.toml"

MAX_FILE = 256 << 10  # bytes of a skyreg.toml
MAX_ENV = 200
MAX_ENV_VALUE = 32 << 10  # characters of one env value
MAX_STRING = 4096  # characters of any other string value (a path, an image reference)
# A service's checks, as the API takes them (`services/releases.py` check_service).
MAX_CHECKS = 10  # [checks.NAME] and [[http_service.checks]] together
MAX_CHECK_PATH = 1024
CHECK_PATH_RE = re.compile(r"/[\x21-\x7e]*\Z")  # printable ASCII: no space, CR or LF
# Whole seconds (durations are written as 10s, 1m); the API's timeout may go down to 0.1 s.
CHECK_SECONDS = {"interval": (1, 3600), "timeout": (1, 60), "grace_period": (0, 3600)}
CHECK_DEFAULTS = {"interval": 10, "timeout": 2, "grace_period": 5}  # the API's
MAX_WARNINGS = 100  # then one line counts the rest
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}\Z")
CHECK_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,63}\Z")
CHECK_TYPES = ("http", "tcp")
DURATION_HINT = "use a duration such as 10s, 1m or 1h30m"
APP_INVALID = "must be a DNS label: a-z, 0-9 and '-', 1 to 63 characters, such as my-app"
REGION_INVALID = "must be a region code such as iad, sin, syd"

T = TypeVar("T")


class ConfigError(Exception):
    """A skyreg.toml that cannot be used; the message names the file, line and key."""


@dataclass(frozen=True)
class BuildConfig:
    """`[build]`: what `skyreg deploy` builds, or the image it deploys instead."""

    dockerfile: str | None = None
    image: str | None = None
    args: dict[str, str] = field(default_factory=dict)
    target: str | None = None


@dataclass(frozen=True)
class DeployConfig:
    """`[deploy]`: how a release replaces the running machines."""

    strategy: str | None = None  # one of skyreg.services.names.STRATEGIES
    wait_timeout: str | None = None  # a duration, as written ("5m")


@dataclass(frozen=True)
class Check:
    """A health check. Durations are kept as written ("10s"); they are valid for
    `parse_duration`. `path` is set for http checks only (default "/")."""

    type: str
    port: int
    path: str | None = None
    interval: str | None = None
    timeout: str | None = None
    grace_period: str | None = None


@dataclass(frozen=True)
class HttpService:
    """`[http_service]`: the app's HTTP service. internal_port and the checks are deployed as
    the release's service (`release_service`); the other fields are validated only."""

    internal_port: int
    force_https: bool = False
    auto_stop_machines: bool = False
    min_machines_running: int = 0
    checks: list[Check] = field(default_factory=list)


@dataclass(frozen=True)
class AppConfig:
    """A skyreg.toml; `path` is where it was read from (None when made in code)."""

    app: str | None = None
    primary_region: str | None = None
    build: BuildConfig = field(default_factory=BuildConfig)
    env: dict[str, str] = field(default_factory=dict)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    http_service: HttpService | None = None
    checks: dict[str, Check] = field(default_factory=dict)
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)


def find_config(directory: Path, explicit: Path | None) -> Path | None:
    """The config to use: `explicit` (a `--config` path, relative to the working directory),
    which must be a file (ConfigError otherwise); else `directory/skyreg.toml` when it is a
    file; else None."""
    if explicit is not None:
        if not explicit.exists():
            raise ConfigError(f"{explicit}: no such file")
        if not explicit.is_file():
            raise ConfigError(f"{explicit}: not a file")
        return explicit
    candidate = directory / CONFIG_NAME
    return candidate if candidate.is_file() else None


def load_config(path: Path) -> AppConfig:
    """Read and validate the skyreg.toml at `path` (at most 256 KiB of UTF-8 TOML).
    ConfigError names the file, the line (when it can be found) and the key."""
    name = str(path)
    if not path.is_file():  # never open a FIFO or a device: it could block or never end
        raise ConfigError(f"{name}: no such file" if not path.exists() else f"{name}: not a file")
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as e:
        raise ConfigError(f"{name}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_FILE:
        raise ConfigError(f"{name}: larger than {MAX_FILE >> 10} KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{name}:{line}: not UTF-8 text") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_syntax_error(name, str(e), text)) from None
    except (ValueError, RecursionError):  # an integer too long to convert, arrays nested deep
        raise ConfigError(
            f"{name}: invalid TOML (a value is too long or nested too deeply)"
        ) from None
    reader = _Reader(name, _key_lines(text))
    return reader.config(doc, path)


def render_config(config: AppConfig) -> str:
    """A skyreg.toml holding `config` (`path` and `warnings` are not written);
    `load_config` reads it back equal."""
    out = [
        "# skyreg.toml: how skyreg builds and deploys this app (fly.toml's keys).",
        "",
    ]
    if config.app is not None:
        out.append(f"app = {_toml_str(config.app)}")
    if config.primary_region is not None:
        out.append(f"primary_region = {_toml_str(config.primary_region)}")
    build = config.build
    out += ["", "[build]"]
    out += _assignments(
        {"dockerfile": build.dockerfile, "image": build.image, "target": build.target}
    )
    if build.args:
        out += ["", "[build.args]", *_assignments(build.args)]
    out += ["", "[env]", *_assignments(config.env)]
    deploy = config.deploy
    out += ["", "[deploy]"]
    out += _assignments({"strategy": deploy.strategy, "wait_timeout": deploy.wait_timeout})
    service = config.http_service
    if service is not None:
        out += ["", "[http_service]"]
        out += _assignments(
            {
                "internal_port": service.internal_port,
                "force_https": service.force_https,
                "auto_stop_machines": service.auto_stop_machines,
                "min_machines_running": service.min_machines_running,
            }
        )
        for check in service.checks:
            out += ["", "[[http_service.checks]]", *_assignments(_check_fields(check))]
    for check_name, check in config.checks.items():
        out += ["", f"[checks.{_toml_key(check_name)}]", *_assignments(_check_fields(check))]
    return "\n".join(out) + "\n"


# --- the deployed service ---------------------------------------------------------------------


def release_service(config: AppConfig) -> dict[str, Any] | None:
    """The `service` of a deploy request (the API's Service): [http_service]'s internal_port
    with its checks, then the [checks.NAME]; None without [http_service] (the app's service
    stays as it is)."""
    service = config.http_service
    if service is None:
        return None
    return service_body(service.internal_port, [*service.checks, *config.checks.values()])


def service_body(internal_port: int, checks: Sequence[Check]) -> dict[str, Any]:
    """A Service as the API takes it: durations in seconds, a check's port only when it is not
    `internal_port`, fields not written left to the server's defaults."""
    return {
        "internal_port": internal_port,
        "checks": [_check_body(c, internal_port) for c in checks],
    }


def _check_body(check: Check, internal_port: int) -> dict[str, Any]:
    body: dict[str, Any] = {"type": check.type}
    if check.port != internal_port:
        body["port"] = check.port
    if check.type == "http":
        body["path"] = check.path or "/"
    for key, text in (
        ("interval", check.interval),
        ("timeout", check.timeout),
        ("grace_period", check.grace_period),
    ):
        if text is not None:
            body[key] = check_seconds(text, key)
    return body


def check_seconds(text: str | None, key: str) -> float:
    """Seconds of a check's valid duration `key` (interval, timeout, grace_period); the API's
    default when None."""
    seconds = parse_duration(text, key, DURATION_HINT)
    return float(CHECK_DEFAULTS[key] if seconds is None else seconds)


def duration_problem(text: str, least: int, most: int) -> str | None:
    """Why `text` is not a duration of `least` to `most` seconds ("must be ..."), or None."""
    try:
        seconds = parse_duration(text, "duration", DURATION_HINT)
    except ValueError:
        seconds = None
    if seconds is None:
        return f"must be a duration: {DURATION_HINT}, not {text[:40]!r}"
    if not least <= seconds <= most:
        return f"must be from {_span(least)} to {_span(most)}"
    return None


def check_path_problem(path: str) -> str | None:
    """Why `path` cannot be an http check's path ("must ..."), or None."""
    if not path.startswith("/"):
        return f"must start with '/', not {path[:40]!r}"
    if len(path) > MAX_CHECK_PATH:
        return f"must be at most {MAX_CHECK_PATH} characters"
    if not CHECK_PATH_RE.match(path):
        return "must be printable ASCII without spaces (write a space as %20)"
    return None


def check_timing_problem(interval: str | None, timeout: str | None) -> tuple[str, str] | None:
    """(key, "must ...") when a check's timeout (given or default) exceeds its interval."""
    every, wait = check_seconds(interval, "interval"), check_seconds(timeout, "timeout")
    if wait <= every:
        return None
    if timeout is None:
        return "interval", f"must be at least the timeout ({wait:g}s by default), not {every:g}s"
    default = " by default" if interval is None else ""
    return "timeout", f"must be at most the interval ({every:g}s{default}), not {wait:g}s"


def _span(seconds: int) -> str:
    """60 as 1m, 3600 as 1h, 86400 as 24h."""
    if seconds and seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


# --- validation -------------------------------------------------------------------------------

Key = tuple[str | int, ...]

_TOP_KEYS = ("app", "primary_region", "build", "env", "deploy", "http_service", "checks")
_BUILD_KEYS = ("dockerfile", "image", "target", "build-target", "args")
_DEPLOY_KEYS = ("strategy", "wait_timeout")
_SERVICE_KEYS = (
    "internal_port",
    "force_https",
    "auto_stop_machines",
    "min_machines_running",
    "checks",
)
_CHECK_KEYS = ("type", "port", "path", "interval", "timeout", "grace_period")


class _Reader:
    """Validates a parsed document, naming `file:line: [table] key` in errors and warnings."""

    def __init__(self, name: str, lines: _KeyLines) -> None:
        self.name = name
        self.lines = lines
        self.warnings: list[str] = []
        self.unwarned = 0  # warnings past MAX_WARNINGS

    # messages

    def _where(self, path: Key) -> str:
        line = self.lines.find(path)
        return f"{self.name}:{line}" if line is not None else self.name

    def error(self, table: Key, key: Key, problem: str) -> ConfigError:
        """`file:line: [table] key problem`; with `key` (), `file:line: [table] problem`."""
        label = _label(table, key) if key else f"[{_dotted(table)}]"
        return ConfigError(f"{self._where(table + key)}: {label} {problem}")

    def warn(self, table: Key, key: Key, problem: str) -> None:
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(f"{self._where(table + key)}: {problem}")
        else:
            self.unwarned += 1

    def unknown_keys(
        self, table: Key, at: Key, doc: Mapping[str, Any], known: Sequence[str]
    ) -> None:
        """Warn of each key of `doc` (the table at `table + at`) that is not `known`."""
        for key, value in doc.items():
            if key in known:
                continue
            if isinstance(value, dict):
                what = f"table [{_dotted((*table, *at, key))}]"
            else:
                what = f"key {_label(table, (*at, key))}"
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            self.warn(table, (*at, key), f"unknown {what} (ignored){hint}")

    # values

    def typed(self, table: Key, key: Key, value: object, kind: type[T], what: str) -> T:
        # bool is an int in Python, never in TOML
        if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
            return value
        hint = ""
        if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            hint = " (write true or false without quotes)"
        raise self.error(table, key, f"must be {what}, not {_type_name(value)}{hint}")

    def string(self, table: Key, key: Key, value: object, limit: int = MAX_STRING) -> str:
        text = self.typed(table, key, value, str, "a string")
        if not text:
            raise self.error(table, key, "must not be empty")
        if len(text) > limit or "\x00" in text:
            raise self.error(table, key, f"must be at most {limit} characters, without NUL")
        return text

    def optional_string(self, table: Key, doc: Mapping[str, Any], key: str) -> str | None:
        value = doc.get(key)
        return None if value is None else self.string(table, (key,), value)

    def port(self, table: Key, key: Key, value: object) -> int:
        number = self.typed(table, key, value, int, "an integer")
        if not 1 <= number <= 65535:
            raise self.error(table, key, f"must be a port number from 1 to 65535, not {number}")
        return number

    def duration(self, table: Key, key: Key, value: object, least: int, most: int) -> str:
        """A duration string (kept as written) of `least` to `most` seconds."""
        text = self.typed(table, key, value, str, f"a duration ({DURATION_HINT})")
        problem = duration_problem(text, least, most)
        if problem:
            raise self.error(table, key, problem)
        return text

    # sections

    def config(self, doc: dict[str, Any], path: Path) -> AppConfig:
        self.unknown_keys((), (), doc, _TOP_KEYS)
        app = doc.get("app")
        if app is not None:
            app = self.typed((), ("app",), app, str, "a string")
            if not is_dns_label(app):
                raise self.error((), ("app",), APP_INVALID)
        region = doc.get("primary_region")
        if region is not None:
            region = self.typed((), ("primary_region",), region, str, "a string")
            if not REGION_RE.match(region):
                raise self.error((), ("primary_region",), REGION_INVALID)
        build = self.build(doc.get("build"))
        env = self.pairs(("env",), (), doc.get("env"), MAX_ENV, ENV_NAME_RE, MAX_ENV_VALUE)
        deploy = self.deploy(doc.get("deploy"))
        service = self.http_service(doc.get("http_service"))
        checks = self.checks(doc.get("checks"))
        if service is not None and len(service.checks) + len(checks) > MAX_CHECKS:
            raise self.error(
                ("checks",), (), f"and http_service hold more than {MAX_CHECKS} checks"
            )
        if checks and service is None:
            self.warn(
                ("checks",),
                (),
                "[checks] without [http_service] are not deployed (a service needs internal_port)",
            )
        if self.unwarned:
            self.warnings.append(f"{self.name}: {self.unwarned} more warnings")
        return AppConfig(
            app=app,
            primary_region=region,
            build=build,
            env=env,
            deploy=deploy,
            http_service=service,
            checks=checks,
            path=path,
            warnings=self.warnings,
        )

    def build(self, value: object) -> BuildConfig:
        if value is None:
            return BuildConfig()
        t: Key = ("build",)
        doc = self.typed((), t, value, dict, "a table")
        self.unknown_keys(t, (), doc, _BUILD_KEYS)
        dockerfile = self.optional_string(t, doc, "dockerfile")
        image = self.optional_string(t, doc, "image")
        if dockerfile is not None and image is not None:
            raise self.error(t, ("image",), "and dockerfile: set one (an image is not built)")
        if "target" in doc and "build-target" in doc:
            raise self.error(t, ("build-target",), "and target: set one")
        target_key = "build-target" if "build-target" in doc else "target"
        target = self.optional_string(t, doc, target_key)
        if target is not None and not TARGET_RE.match(target):
            raise self.error(t, (target_key,), "must be the name of a stage of the Dockerfile")
        args = self.pairs(
            t, ("args",), doc.get("args"), MAX_BUILD_ARGS, ARG_RE, MAX_BUILD_ARG_VALUE
        )
        return BuildConfig(dockerfile=dockerfile, image=image, args=args, target=target)

    def pairs(
        self,
        table: Key,
        at: Key,
        value: object,
        most: int,
        name_re: re.Pattern[str],
        longest: int,
    ) -> dict[str, str]:
        """NAME = "value" pairs: [env] (`at` ()) or [build] args (`at` ("args",))."""
        if value is None:
            return {}
        doc = self.typed(table if at else (), at or table, value, dict, "a table")
        if len(doc) > most:
            raise self.error(table, at, f"must hold at most {most} entries, not {len(doc)}")
        pairs: dict[str, str] = {}
        for name, item in doc.items():
            key = (*at, name)
            if not name_re.match(name):
                raise self.error(table, key, "is not a valid name: [A-Za-z_][A-Za-z0-9_]*")
            text = self.typed(table, key, item, str, "a string")
            if len(text) > longest or "\x00" in text:
                raise self.error(table, key, f"must be at most {longest} characters, without NUL")
            pairs[name] = text
        return pairs

    def deploy(self, value: object) -> DeployConfig:
        if value is None:
            return DeployConfig()
        t: Key = ("deploy",)
        doc = self.typed((), t, value, dict, "a table")
        self.unknown_keys(t, (), doc, _DEPLOY_KEYS)
        strategy = self.optional_string(t, doc, "strategy")
        if strategy is not None and strategy not in STRATEGIES:
            allowed = ", ".join(STRATEGIES)
            raise self.error(t, ("strategy",), f"must be one of {allowed}, not {strategy[:40]!r}")
        wait_timeout = doc.get("wait_timeout")
        if wait_timeout is not None:
            wait_timeout = self.duration(t, ("wait_timeout",), wait_timeout, 0, MAX_WAIT)
        return DeployConfig(strategy=strategy, wait_timeout=wait_timeout)

    def http_service(self, value: object) -> HttpService | None:
        if value is None:
            return None
        t: Key = ("http_service",)
        doc = self.typed((), t, value, dict, "a table")
        self.unknown_keys(t, (), doc, _SERVICE_KEYS)
        if "internal_port" not in doc:
            raise self.error(t, (), "needs internal_port, the port the app listens on")
        port = self.port(t, ("internal_port",), doc["internal_port"])
        force_https, auto_stop = (
            self.typed(t, (key,), doc.get(key, False), bool, "true or false")
            for key in ("force_https", "auto_stop_machines")
        )
        key = "min_machines_running"
        running = self.typed(t, (key,), doc.get(key, 0), int, "an integer")
        if running < 0:
            raise self.error(t, (key,), f"must be 0 or more, not {running}")
        raw = self.typed(t, ("checks",), doc.get("checks", []), list, "an array of tables")
        if len(raw) > MAX_CHECKS:
            raise self.error(t, ("checks",), f"must hold at most {MAX_CHECKS} checks")
        checks = [self.check(t, ("checks", i), item, port) for i, item in enumerate(raw)]
        return HttpService(
            internal_port=port,
            force_https=force_https,
            auto_stop_machines=auto_stop,
            min_machines_running=running,
            checks=checks,
        )

    def checks(self, value: object) -> dict[str, Check]:
        if value is None:
            return {}
        t: Key = ("checks",)
        doc = self.typed((), t, value, dict, "a table")
        if len(doc) > MAX_CHECKS:
            raise self.error(t, (), f"at most {MAX_CHECKS} checks, not {len(doc)}")
        checks: dict[str, Check] = {}
        for name, item in doc.items():
            if not CHECK_NAME_RE.match(name):
                problem = "names a check with other than A-Z, a-z, 0-9, '_' and '-'"
                raise self.error((*t, name), (), problem)
            checks[name] = self.check((*t, name), (), item, None)
        return checks

    def check(self, table: Key, at: Key, value: object, service_port: int | None) -> Check:
        """A [checks.NAME] (`table` ("checks", NAME), `at` ()), or an http_service check
        (`table` ("http_service",), `at` ("checks", i)): type http and the service's port
        unless given."""
        doc = self.typed(table if at else (), at or table, value, dict, "a table")
        self.unknown_keys(table, at, doc, _CHECK_KEYS)
        missing = [k for k in ("type", "port") if k not in doc and service_port is None]
        if missing:
            raise self.error(table, at, f"needs {' and '.join(missing)}")
        kind = self.typed(table, (*at, "type"), doc.get("type", "http"), str, "a string")
        if kind not in CHECK_TYPES:
            raise self.error(table, (*at, "type"), f"must be http or tcp, not {kind[:40]!r}")
        port = self.port(table, (*at, "port"), doc.get("port", service_port))
        path = None
        if kind == "http":
            path = self.typed(table, (*at, "path"), doc.get("path", "/"), str, "a string")
            problem = check_path_problem(path)
            if problem:
                raise self.error(table, (*at, "path"), problem)
        elif "path" in doc:
            self.warn(
                table,
                (*at, "path"),
                f"{_label(table, (*at, 'path'))} is for http checks only (ignored)",
            )
        durations = {
            key: None if doc.get(key) is None else self.duration(table, (*at, key), doc[key], *span)
            for key, span in CHECK_SECONDS.items()
        }
        timing = check_timing_problem(durations["interval"], durations["timeout"])
        if timing:
            raise self.error(table, (*at, timing[0]), timing[1])
        return Check(type=kind, port=port, path=path, **durations)


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime | date | time):
        return "a date or time"
    return type(value).__name__


def _label(table: Key, key: Key) -> str:
    """`[build] args.PORT`, `[checks.web] port`, `http_service` checks `checks[0].path`, `app`."""
    return f"[{_dotted(table)}] {_dotted(key)}" if table else _dotted(key)


def _dotted(key: Key) -> str:
    text = ""
    for part in key:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            shown = _toml_key(part[:40] + ("…" if len(part) > 40 else ""))
            text += f".{shown}" if text else shown
    return text


# --- where keys are -------------------------------------------------------------------------

_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_KEYS = rf"{_PART}(?:\s*\.\s*{_PART})*"
_PART_RE = re.compile(_PART)
_ARRAY_HEADER_RE = re.compile(rf"\s*\[\[\s*({_KEYS})\s*\]\]\s*(?:#.*)?\Z")
_TABLE_HEADER_RE = re.compile(rf"\s*\[\s*({_KEYS})\s*\]\s*(?:#.*)?\Z")
_KEY_VALUE_RE = re.compile(rf"\s*({_KEYS})\s*=(.*)\Z")


class _KeyLines:
    """Line numbers of keys and table headers, by path (array-of-tables elements by index)."""

    def __init__(self) -> None:
        self.lines: dict[Key, int] = {}
        self.one_line: set[Key] = set()  # keys whose whole value (an inline table) is on its line

    def find(self, path: Key) -> int | None:
        """The line of `path`; for a key inside a one-line value, that value's line; else None
        (a key inside a value over several lines, or one not written at all)."""
        if path in self.lines:
            return self.lines[path]
        for end in range(len(path) - 1, 0, -1):
            prefix = path[:end]
            if prefix in self.lines:
                return self.lines[prefix] if prefix in self.one_line else None
        return None

    def record(self, path: Key, line: int) -> None:
        for end in range(1, len(path)):
            self.lines.setdefault(path[:end], line)
        self.lines.setdefault(path, line)


def _key_lines(text: str) -> _KeyLines:
    """Where each key and header of a (valid) TOML document is: headers and `key =` lines at the
    start of a line, outside multi-line strings and arrays."""
    found = _KeyLines()
    table: Key = ()
    arrays: dict[Key, int] = {}  # array-of-tables path -> index of its last element
    depth, multiline = 0, ""
    for number, line in enumerate(text.splitlines(), start=1):
        if multiline or depth:
            depth, multiline = _scan_value(line, depth, multiline)
            continue
        if header := _ARRAY_HEADER_RE.match(line):
            parts = _key_parts(header.group(1))
            if parts is None:
                table = ("?",)  # keys below it cannot be placed
                continue
            array = _resolve(parts, arrays)
            arrays[array] = arrays.get(array, -1) + 1
            table = (*array, arrays[array])
            found.record(table, number)
        elif header := _TABLE_HEADER_RE.match(line):
            parts = _key_parts(header.group(1))
            table = ("?",) if parts is None else _resolve(parts, arrays)
            found.record(table, number)
        elif pair := _KEY_VALUE_RE.match(line):
            parts = _key_parts(pair.group(1))
            depth, multiline = _scan_value(pair.group(2), 0, "")
            if parts is not None and table != ("?",):
                found.record((*table, *parts), number)
                if not depth and not multiline:
                    found.one_line.add((*table, *parts))
    return found


def _key_parts(keys: str) -> Key | None:
    """`a."b.c".'d'` as ("a", "b.c", "d"); None if a quoted part will not decode."""
    parts: list[str | int] = []
    for part in _PART_RE.findall(keys):
        if part.startswith('"'):
            try:
                part = tomllib.loads(f"k = {part}")["k"]
            except tomllib.TOMLDecodeError:
                return None
        elif part.startswith("'"):
            part = part[1:-1]
        parts.append(part)
    return tuple(parts)


def _resolve(parts: Key, arrays: Mapping[Key, int]) -> Key:
    """A header's path, with the current element's index after each array of tables it
    names (`[a.b]` below `[[a]]` is in a's last element)."""
    path: Key = ()
    for part in parts[:-1]:
        path = (*path, part)
        if path in arrays:
            path = (*path, arrays[path])
    return (*path, parts[-1])


def _scan_value(text: str, depth: int, multiline: str) -> tuple[int, str]:
    """The bracket depth and open multi-line string delimiter after `text`, a line (or the
    rest of one) of a value."""
    i, n = 0, len(text)
    while i < n:
        if multiline:
            end = _find_closing(text, i, multiline)
            if end < 0:
                return depth, multiline
            i, multiline = end, ""
            continue
        c = text[i]
        if c == "#":
            break
        if text.startswith('"""', i) or text.startswith("'''", i):
            multiline, i = text[i : i + 3], i + 3
        elif c == '"':
            i = _find_closing(text, i + 1, '"')
            if i < 0:
                break
        elif c == "'":
            end = text.find("'", i + 1)
            i = n if end < 0 else end + 1
        else:
            depth += (c in "[{") - (c in "]}")
            i += 1
    return depth, multiline


def _find_closing(text: str, i: int, quote: str) -> int:
    """The index after the `quote` that closes a string at `i` (backslash escapes in basic
    strings; a multi-line one may end in up to two more quotes), or -1."""
    while i < len(text):
        if quote[0] == '"' and text[i] == "\\":
            i += 2
            continue
        if text.startswith(quote, i):
            end = i + len(quote)
            while len(quote) == 3 and end < len(text) and text[end] == quote[0] and end - i < 5:
                end += 1
            return end
        i += 1
    return -1


def _syntax_error(name: str, message: str, text: str) -> str:
    """tomllib's "... (at line N, column M)" as "file:N: invalid TOML: ... (column M)"."""
    if m := re.search(r" \(at line (\d+), column (\d+)\)\Z", message):
        return f"{name}:{m.group(1)}: invalid TOML: {message[: m.start()]} (column {m.group(2)})"
    if message.endswith(" (at end of document)"):
        line = text.count("\n") + (0 if text.endswith("\n") else 1)
        return (
            f"{name}:{max(line, 1)}: invalid TOML: {message.removesuffix(' (at end of document)')}"
        )
    return f"{name}: invalid TOML: {message}"


# --- writing --------------------------------------------------------------------------------

_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+\Z")
_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml_str(value: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for c in value:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif c < " " or c == "\x7f":
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _toml_key(key: str) -> str:
    return key if _BARE_KEY_RE.match(key) else _toml_str(key)


def _toml_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return _toml_str(value)


def _assignments(values: Mapping[str, str | int | bool | None]) -> Iterator[str]:
    for key, value in values.items():
        if value is not None:
            yield f"{_toml_key(key)} = {_toml_value(value)}"


def _check_fields(check: Check) -> dict[str, str | int | None]:
    return {
        "type": check.type,
        "port": check.port,
        "path": check.path,
        "interval": check.interval,
        "timeout": check.timeout,
        "grace_period": check.grace_period,
    }
