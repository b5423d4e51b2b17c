"""What starting the CLI imports, checked in fresh interpreters: `skyreg --help`, every command's
`--help` and the remote `skyreg deploy` path load none of the server, agent, builder, event-loop,
table-drawing or image-reading modules; those are imported by the commands that use them."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = [
    "asyncio",
    "aiohttp",
    "sqlalchemy",
    "rich",
    "docker",
    "requests",
    "nacl",
    "skyreg.server",
    "skyreg.machines",
    "skyreg.builder",
    "skyreg.client.imagesource",
]

# Prints the HEAVY modules (or their submodules) loaded once the code before it has run.
REPORT = """
import json, sys
heavy = json.loads(sys.argv[1])
found = [h for h in heavy if any(m == h or m.startswith(h + ".") for m in sys.modules)]
print(json.dumps(sorted(found)))
"""

# Builds the click command tree (typer resolves every command's annotations here) and asks every
# command and group for its --help, the way `skyreg ... --help` does; exits non-zero if one fails.
EVERY_HELP = """
import contextlib, io
import typer
from skyreg.cli.main import app

def paths(command, prefix):  # typer's groups (its own click copy) have .commands
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from paths(sub, [*prefix, name])

every = list(paths(typer.main.get_command(app), []))
assert len(every) > 40, every
for path in every:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            app([*path, "--help"], prog_name="skyreg")
        except SystemExit as e:
            if e.code:
                raise SystemExit(f"skyreg {' '.join(path)} --help exited {e.code}") from None
"""


def loaded_heavy_modules(code: str, heavy: list[str]) -> list[str]:
    """The modules of `heavy` a fresh interpreter has loaded after running `code`."""
    proc = subprocess.run(
        [sys.executable, "-c", code + REPORT, json.dumps(heavy)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    found: list[str] = json.loads(proc.stdout.splitlines()[-1])
    return found


def test_importing_the_cli_and_building_its_commands_loads_no_heavy_module() -> None:
    code = "import typer\nfrom skyreg.cli.main import app\ntyper.main.get_command(app)\n"
    assert loaded_heavy_modules(code, HEAVY) == []


def test_every_help_page_loads_no_heavy_module_but_typers_rich() -> None:
    # typer formats help with rich when it is installed (not at `import typer`: on rendering).
    assert loaded_heavy_modules(EVERY_HELP, [m for m in HEAVY if m != "rich"]) == []


def test_the_remote_build_path_loads_no_heavy_module() -> None:
    # `skyreg deploy PATH` imports skyreg.cli.build to pack, send and follow a remote build.
    code = "import skyreg.cli.main, skyreg.cli.build\n"
    assert loaded_heavy_modules(code, HEAVY) == []


# Reads a skyreg.toml that uses every rule appconfig takes from the server (region, strategy,
# build target and args), as `skyreg deploy` does before it builds.
LOAD_CONFIG = """
import pathlib, sys, tempfile
from skyreg.cli.appconfig import load_config
path = pathlib.Path(tempfile.mkdtemp()) / "skyreg.toml"
path.write_text(
    'app = "web"\\nprimary_region = "syd"\\n[build]\\ntarget = "final"\\n'
    '[build.args]\\nMODE = "prod"\\n[deploy]\\nstrategy = "immediate"\\n'
)
assert load_config(path).primary_region == "syd"
"""


def test_loading_a_config_loads_no_heavy_module() -> None:
    assert loaded_heavy_modules(LOAD_CONFIG, HEAVY) == []
