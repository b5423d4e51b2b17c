"""skyreg.toml: a full file loads, each mistake names file, line and key, unknown keys warn,
hostile files are refused, find_config's rules, render_config round-trips via load_config, and
release_service turns [http_service] and the checks into the API's Service."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from skyreg.cli.appconfig import (
    CONFIG_NAME,
    AppConfig,
    BuildConfig,
    Check,
    ConfigError,
    DeployConfig,
    HttpService,
    find_config,
    load_config,
    release_service,
    render_config,
)

FULL = """\
# a fly.toml-shaped file
app = "web"
primary_region = "syd"

[build]
dockerfile = "Dockerfile.prod"
target = "runtime"

[build.args]
NODE_ENV = "production"
VERSION = "1.2"

[env]
PORT = "8080"
GREETING = "hello \\"world\\""

[deploy]
strategy = "immediate"
wait_timeout = "10m"

[http_service]
internal_port = 8080
force_https = true
auto_stop_machines = true
min_machines_running = 1

[[http_service.checks]]
path = "/healthz"
interval = "15s"
timeout = "2s"
grace_period = "5s"

[checks.db]
type = "tcp"
port = 5432
interval = "30s"

[checks.status]
type = "http"
port = 9090
path = "/status"
"""


def write(directory: Path, text: str, name: str = CONFIG_NAME) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> AppConfig:
    """load_config of `text`, named skyreg.toml relative to the working directory (as the
    messages show it)."""
    write(tmp_path, text)
    return load_config(Path(CONFIG_NAME))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_a_full_file_loads_every_field(tmp_path: Path) -> None:
    config = load_text(tmp_path, FULL)

    assert config == AppConfig(
        app="web",
        primary_region="syd",
        build=BuildConfig(
            dockerfile="Dockerfile.prod",
            image=None,
            args={"NODE_ENV": "production", "VERSION": "1.2"},
            target="runtime",
        ),
        env={"PORT": "8080", "GREETING": 'hello "world"'},
        deploy=DeployConfig(strategy="immediate", wait_timeout="10m"),
        http_service=HttpService(
            internal_port=8080,
            force_https=True,
            auto_stop_machines=True,
            min_machines_running=1,
            # type http, the service's port and path as given
            checks=[Check("http", 8080, "/healthz", "15s", "2s", "5s")],
        ),
        checks={
            "db": Check("tcp", 5432, None, "30s", None, None),
            "status": Check("http", 9090, "/status", None, None, None),
        },
        path=Path(CONFIG_NAME),
        warnings=[],
    )


def test_an_empty_file_and_fly_spellings_load(tmp_path: Path) -> None:
    assert load_text(tmp_path, "") == AppConfig(path=Path(CONFIG_NAME))
    # fly.toml writes the stage as build-target; an image instead of a build
    config = load_text(tmp_path, '[build]\nimage = "web:v1"\nbuild-target = "base"\n')
    assert config.build == BuildConfig(image="web:v1", target="base")
    # a check written as an inline table gets the http defaults too
    config = load_text(tmp_path, "http_service = { internal_port = 80, checks = [{}] }\n")
    assert config.http_service == HttpService(80, checks=[Check("http", 80, "/")])


MISTAKES = [
    pytest.param(
        "[build]\nargs = { PORT = 8080 }\n",
        "skyreg.toml:2: [build] args.PORT must be a string, not an integer",
        id="build-arg-integer",
    ),
    pytest.param(
        "[build.args]\n\nPORT = 8080\n",
        "skyreg.toml:3: [build] args.PORT must be a string, not an integer",
        id="build-arg-in-own-table",
    ),
    pytest.param(
        'app = "web"\n\nprimary_region = "Sydney!"\n',
        "skyreg.toml:3: primary_region must be a region code such as iad, sin, syd",
        id="region",
    ),
    pytest.param(
        'app = "Web_App"\n',
        "skyreg.toml:1: app must be a DNS label: a-z, 0-9 and '-', 1 to 63 characters, "
        "such as my-app",
        id="app-name",
    ),
    pytest.param(
        "app = 7\n",
        "skyreg.toml:1: app must be a string, not an integer",
        id="app-type",
    ),
    pytest.param(
        '[http_service]\ninternal_port = 8080\nforce_https = "true"\n',
        "skyreg.toml:3: [http_service] force_https must be true or false, not a string "
        "(write true or false without quotes)",
        id="bool-as-string",
    ),
    pytest.param(
        "[http_service]\ninternal_port = 70000\n",
        "skyreg.toml:2: [http_service] internal_port must be a port number from 1 to 65535, "
        "not 70000",
        id="port-range",
    ),
    pytest.param(
        '[http_service]\ninternal_port = "8080"\n',
        "skyreg.toml:2: [http_service] internal_port must be an integer, not a string",
        id="port-type",
    ),
    pytest.param(
        "[http_service]\nforce_https = true\n",
        "skyreg.toml:1: [http_service] needs internal_port, the port the app listens on",
        id="port-missing",
    ),
    pytest.param(
        "[http_service]\ninternal_port = 80\nmin_machines_running = -1\n",
        "skyreg.toml:3: [http_service] min_machines_running must be 0 or more, not -1",
        id="negative",
    ),
    pytest.param(
        "[http_service]\ninternal_port = 80\nmin_machines_running = true\n",
        "skyreg.toml:3: [http_service] min_machines_running must be an integer, not a boolean",
        id="bool-for-integer",
    ),
    pytest.param(
        '[deploy]\nstrategy = "canary"\n',
        "skyreg.toml:2: [deploy] strategy must be one of rolling, immediate, not 'canary'",
        id="strategy",
    ),
    pytest.param(
        '[deploy]\nwait_timeout = "5 minutes"\n',
        "skyreg.toml:2: [deploy] wait_timeout must be a duration: use a duration such as 10s, "
        "1m or 1h30m, not '5 minutes'",
        id="duration-malformed",
    ),
    pytest.param(
        "[deploy]\nwait_timeout = 300\n",
        "skyreg.toml:2: [deploy] wait_timeout must be a duration (use a duration such as 10s, "
        "1m or 1h30m), not an integer",
        id="duration-type",
    ),
    pytest.param(
        '[deploy]\nwait_timeout = "25h"\n',
        "skyreg.toml:2: [deploy] wait_timeout must be from 0s to 24h",
        id="duration-range",
    ),
    pytest.param(
        '[env]\n1BAD = "x"\n',
        "skyreg.toml:2: [env] 1BAD is not a valid name: [A-Za-z_][A-Za-z0-9_]*",
        id="env-name",
    ),
    pytest.param(
        '[env]\n"MY VAR" = "x"\n',
        'skyreg.toml:2: [env] "MY VAR" is not a valid name: [A-Za-z_][A-Za-z0-9_]*',
        id="env-name-quoted",
    ),
    pytest.param(
        "[env]\nDEBUG = false\n",
        "skyreg.toml:2: [env] DEBUG must be a string, not a boolean",
        id="env-value-type",
    ),
    pytest.param(
        'env = "PORT=8080"\n',
        "skyreg.toml:1: env must be a table, not a string",
        id="section-type",
    ),
    pytest.param(
        '[build]\nimage = "web:v1"\ndockerfile = "Dockerfile"\n',
        "skyreg.toml:2: [build] image and dockerfile: set one (an image is not built)",
        id="image-and-dockerfile",
    ),
    pytest.param(
        '[checks.web]\ntype = "http"\nport = 80\npath = "healthz"\n',
        "skyreg.toml:4: [checks.web] path must start with '/', not 'healthz'",
        id="check-path",
    ),
    pytest.param(
        '[checks.web]\ntype = "grpc"\nport = 80\n',
        "skyreg.toml:2: [checks.web] type must be http or tcp, not 'grpc'",
        id="check-type",
    ),
    pytest.param(
        '[checks.web]\ntype = "tcp"\n',
        "skyreg.toml:1: [checks.web] needs port",
        id="check-port-missing",
    ),
    pytest.param(
        '[checks.web]\ntype = "tcp"\nport = 80\ninterval = "0s"\n',
        "skyreg.toml:4: [checks.web] interval must be from 1s to 1h",
        id="check-interval-zero",
    ),
    pytest.param(
        '[checks.web]\ntype = "tcp"\nport = 80\ninterval = "2h"\n',
        "skyreg.toml:4: [checks.web] interval must be from 1s to 1h",
        id="check-interval-long",
    ),
    pytest.param(
        '[checks.web]\ntype = "tcp"\nport = 80\ninterval = "2m"\ntimeout = "61s"\n',
        "skyreg.toml:5: [checks.web] timeout must be from 1s to 1m",
        id="check-timeout-long",
    ),
    pytest.param(
        '[checks.web]\ntype = "tcp"\nport = 80\ngrace_period = "61m"\n',
        "skyreg.toml:4: [checks.web] grace_period must be from 0s to 1h",
        id="check-grace-long",
    ),
    pytest.param(
        '[checks.web]\ntype = "tcp"\nport = 80\ninterval = "5s"\ntimeout = "6s"\n',
        "skyreg.toml:5: [checks.web] timeout must be at most the interval (5s), not 6s",
        id="check-timeout-over-interval",
    ),
    pytest.param(
        '[checks.web]\ntype = "tcp"\nport = 80\ntimeout = "30s"\n',
        "skyreg.toml:4: [checks.web] timeout must be at most the interval (10s by default), "
        "not 30s",
        id="check-timeout-over-default-interval",
    ),
    pytest.param(
        '[http_service]\ninternal_port = 80\n[[http_service.checks]]\ninterval = "1s"\n',
        "skyreg.toml:4: [http_service] checks[0].interval must be at least the timeout "
        "(2s by default), not 1s",
        id="check-interval-under-default-timeout",
    ),
    pytest.param(
        '[checks.web]\ntype = "http"\nport = 80\npath = "/a b"\n',
        "skyreg.toml:4: [checks.web] path must be printable ASCII without spaces "
        "(write a space as %20)",
        id="check-path-space",
    ),
    pytest.param(
        '[checks.web]\ntype = "http"\nport = 80\npath = "/\\r\\n"\n',
        "skyreg.toml:4: [checks.web] path must be printable ASCII without spaces "
        "(write a space as %20)",
        id="check-path-crlf",
    ),
    pytest.param(
        '[checks.web]\ntype = "http"\nport = 80\npath = "/\u00e9"\n',
        "skyreg.toml:4: [checks.web] path must be printable ASCII without spaces "
        "(write a space as %20)",
        id="check-path-not-ascii",
    ),
    pytest.param(
        f'[checks.web]\ntype = "http"\nport = 80\npath = "/{"x" * 1024}"\n',
        "skyreg.toml:4: [checks.web] path must be at most 1024 characters",
        id="check-path-long",
    ),
    pytest.param(
        '[checks.web]\ntype = "http"\nport = 80\npath = ""\n',
        "skyreg.toml:4: [checks.web] path must start with '/', not ''",
        id="check-path-empty",
    ),
    pytest.param(
        "[http_service]\ninternal_port = 80\n"
        + "[[http_service.checks]]\n" * 6
        + "".join(f'[checks.c{i}]\ntype = "tcp"\nport = 1\n' for i in range(5)),
        "skyreg.toml:9: [checks] and http_service hold more than 10 checks",
        id="too-many-checks-together",
    ),
    pytest.param(
        '[http_service]\ninternal_port = 80\n[[http_service.checks]]\npath = "/"\n'
        '[[http_service.checks]]\npath = "up"\n',
        "skyreg.toml:6: [http_service] checks[1].path must start with '/', not 'up'",
        id="array-of-tables-element",
    ),
    pytest.param(
        "build.args.PORT = 1\n",
        "skyreg.toml:1: [build] args.PORT must be a string, not an integer",
        id="dotted-key",
    ),
    pytest.param(
        # the lines inside the string look like keys; the real one is line 6
        'app = "web"\nnotes = """\n[deploy]\nstrategy = "x"\n"""\n[deploy]\nstrategy = "x"\n',
        "skyreg.toml:7: [deploy] strategy must be one of rolling, immediate, not 'x'",
        id="after-multiline-string",
    ),
    pytest.param(
        # a key inside a value over several lines: no line rather than a wrong one
        "[http_service]\ninternal_port = 80\nchecks = [\n  { port = 0 },\n]\n",
        "skyreg.toml: [http_service] checks[0].port must be a port number from 1 to 65535, not 0",
        id="no-line-inside-multiline-array",
    ),
]


@pytest.mark.parametrize(("text", "message"), MISTAKES)
def test_each_mistake_names_file_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_text(tmp_path, text)
    assert str(refused.value) == message


def test_a_syntax_error_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        load_text(tmp_path, 'app = "web"\n\n[build\ndockerfile = "x"\n')
    assert str(refused.value).startswith("skyreg.toml:3: invalid TOML: ")
    assert "(column " in str(refused.value)


def test_a_duplicate_key_is_a_syntax_error_with_its_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^skyreg\.toml:2: invalid TOML: "):
        load_text(tmp_path, 'app = "a"\napp = "b"\n')


def test_text_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_bytes(b'app = "web"\nprimary_region = "\xff"\n')
    with pytest.raises(ConfigError, match=r"^skyreg\.toml:2: not UTF-8 text$"):
        load_config(Path(CONFIG_NAME))


def test_unknown_keys_warn_with_a_suggestion_and_do_not_fail(tmp_path: Path) -> None:
    text = (
        'app = "web"\n'
        'kill_signal = "SIGINT"\n'
        "[build]\n"
        'dockerfil = "Dockerfile"\n'
        "[[mounts]]\n"
        'source = "data"\n'
        "[checks.web]\n"
        'type = "http"\n'
        "port = 80\n"
        'intervall = "5s"\n'
        'path = "/"\n'
    )
    config = load_text(tmp_path, text)

    assert config.app == "web"
    assert config.build == BuildConfig()
    assert config.checks == {"web": Check("http", 80, "/")}
    assert config.warnings == [
        "skyreg.toml:2: unknown key kill_signal (ignored)",
        "skyreg.toml:5: unknown key mounts (ignored)",
        "skyreg.toml:4: unknown key [build] dockerfil (ignored); did you mean dockerfile?",
        "skyreg.toml:10: unknown key [checks.web] intervall (ignored); did you mean interval?",
        "skyreg.toml:7: [checks] without [http_service] are not deployed "
        "(a service needs internal_port)",
    ]


def test_an_unknown_table_is_named_as_a_table(tmp_path: Path) -> None:
    config = load_text(tmp_path, "[deploy]\n[deploy.canary]\nmax = 1\n[metrics]\nport = 9\n")
    assert config.warnings == [
        "skyreg.toml:4: unknown table [metrics] (ignored)",
        "skyreg.toml:2: unknown table [deploy.canary] (ignored)",
    ]


def test_a_path_on_a_tcp_check_warns(tmp_path: Path) -> None:
    config = load_text(tmp_path, '[checks.db]\ntype = "tcp"\nport = 5432\npath = "/"\n')
    assert config.checks == {"db": Check("tcp", 5432)}
    assert config.warnings[0] == "skyreg.toml:4: [checks.db] path is for http checks only (ignored)"


def test_an_oversize_file_is_refused(tmp_path: Path) -> None:
    write(tmp_path, 'app = "web"\n' + "# padding\n" * 30_000)  # 300 kB
    with pytest.raises(ConfigError, match=r"^skyreg\.toml: larger than 256 KiB$"):
        load_config(Path(CONFIG_NAME))


def test_too_many_env_variables_are_refused(tmp_path: Path) -> None:
    lines = "".join(f'V{i} = "x"\n' for i in range(201))
    with pytest.raises(ConfigError) as refused:
        load_text(tmp_path, "[env]\n" + lines)
    assert str(refused.value) == "skyreg.toml:1: [env] must hold at most 200 entries, not 201"
    assert len(load_text(tmp_path, "[env]\n" + lines[lines.index("\n") + 1 :]).env) == 200


def test_too_many_build_args_and_checks_are_refused(tmp_path: Path) -> None:
    args = "".join(f'A{i} = "x"\n' for i in range(101))
    with pytest.raises(ConfigError, match=r"\[build\] args must hold at most 100 entries"):
        load_text(tmp_path, "[build.args]\n" + args)
    checks = "".join(f'[checks.c{i}]\ntype = "tcp"\nport = 1\n' for i in range(11))
    with pytest.raises(ConfigError, match=r"^skyreg\.toml:1: \[checks\] at most 10 checks"):
        load_text(tmp_path, checks)
    many = "[http_service]\ninternal_port = 80\n" + "[[http_service.checks]]\n" * 11
    with pytest.raises(ConfigError, match=r"^skyreg\.toml:3: \[http_service\] checks must hold"):
        load_text(tmp_path, many)
    ten = "[http_service]\ninternal_port = 80\n" + "[[http_service.checks]]\n" * 10
    assert len(load_text(tmp_path, ten).http_service.checks) == 10  # type: ignore[union-attr]


def test_an_oversize_env_value_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^skyreg\.toml:2: \[env\] BIG must be at most 32768"):
        load_text(tmp_path, f'[env]\nBIG = "{"x" * 32769}"\n')


def test_a_deeply_nested_value_is_refused_quickly(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"^skyreg\.toml"):
        load_text(tmp_path, "x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert time.monotonic() - started < 10


def test_find_config_prefers_explicit_then_the_directory(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    assert find_config(project, None) is None

    found = write(project, 'app = "web"\n')
    assert find_config(project, None) == project / CONFIG_NAME == found

    other = write(tmp_path, 'app = "other"\n', "staging.toml")
    assert find_config(project, other) == other


def test_find_config_refuses_a_missing_or_non_file_explicit_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.toml: no such file$"):
        find_config(tmp_path, tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match=r": not a file$"):
        find_config(tmp_path, tmp_path)


def test_find_config_ignores_a_directory_named_like_the_config(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).mkdir()
    assert find_config(tmp_path, None) is None


ODD = "quote \" backslash \\ tab \t newline \n cr \r nul-free \x01 \x7f unicode é ✓ 🚀 'single'"


def test_render_then_load_round_trips_odd_strings(tmp_path: Path) -> None:
    config = AppConfig(
        app="web",
        primary_region="syd",
        build=BuildConfig(
            dockerfile='docker files/"prod"\\Dockerfile',
            args={"MESSAGE": ODD, "EMPTY": ""},
            target="runtime",
        ),
        env={"MULTI": "line one\nline two\n", "ODD": ODD, "TRIPLE": "\"\"\"'''"},
        deploy=DeployConfig(strategy="rolling", wait_timeout="1h30m"),
        http_service=HttpService(
            internal_port=443,
            force_https=True,
            min_machines_running=2,
            checks=[Check("http", 443, '/a%20b?c="d"&e=\\', "10s", "1s", "0s")],
        ),
        checks={"tcp-check": Check("tcp", 22, None, "1m")},
    )
    text = render_config(config)

    assert text.startswith("# ")
    loaded = load_text(tmp_path, text)
    assert loaded.warnings == []
    assert dataclasses.replace(loaded, path=None) == config


def test_render_of_a_new_app_writes_its_sections_and_round_trips(tmp_path: Path) -> None:
    config = AppConfig(app="fresh-app", primary_region="iad")
    text = render_config(config)

    for line in ('app = "fresh-app"', 'primary_region = "iad"', "[build]", "[env]", "[deploy]"):
        assert line in text.splitlines()
    assert "[http_service]" not in text
    assert dataclasses.replace(load_text(tmp_path, text), path=None) == config


def test_release_service_sends_seconds_and_only_the_ports_that_differ(tmp_path: Path) -> None:
    config = load_text(
        tmp_path, FULL + '\n[checks.same]\ntype = "tcp"\nport = 8080\ngrace_period = "1m30s"\n'
    )
    assert release_service(config) == {
        "internal_port": 8080,
        "checks": [
            # [[http_service.checks]] first, then [checks.NAME] in the file's order
            {
                "type": "http",
                "path": "/healthz",
                "interval": 15.0,
                "timeout": 2.0,
                "grace_period": 5.0,
            },
            {"type": "tcp", "port": 5432, "interval": 30.0},
            {"type": "http", "port": 9090, "path": "/status"},
            {"type": "tcp", "grace_period": 90.0},
        ],
    }


def test_release_service_of_a_service_without_checks_and_of_no_service(tmp_path: Path) -> None:
    plain = load_text(tmp_path, "[http_service]\ninternal_port = 3000\n")
    assert release_service(plain) == {"internal_port": 3000, "checks": []}
    defaults = load_text(
        tmp_path, "[http_service]\ninternal_port = 3000\n[[http_service.checks]]\n"
    )
    assert release_service(defaults) == {
        "internal_port": 3000,
        "checks": [{"type": "http", "path": "/"}],
    }
    # Checks without [http_service]: nothing to send (the app's own service stays), and a warning.
    alone = load_text(tmp_path, '[checks.db]\ntype = "tcp"\nport = 5432\n')
    assert release_service(alone) is None
    assert alone.warnings == [
        "skyreg.toml:1: [checks] without [http_service] are not deployed "
        "(a service needs internal_port)"
    ]
    assert release_service(load_text(tmp_path, 'app = "web"\n')) is None
