"""What the agent parses from a tenant's image is bounded like what the registry parses.

SECURITY.md: "no input of any shape reaches a crash".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from skyreg.machines.agent import MAX_LOG_LINE, LogTail
from skyreg.machines.runtime import ImageConfig, MachineError


def test_a_deeply_nested_image_config_is_a_clear_error_not_a_crash() -> None:
    deep = b'{"config": {"Env": ' + b"[" * 200_000 + b"]" * 200_000 + b"}}"
    with pytest.raises(MachineError, match="image config"):
        ImageConfig.from_json(deep)


def test_an_ordinary_image_config_still_parses() -> None:
    conf = ImageConfig.from_json(b'{"config": {"Env": ["A=1"], "Cmd": ["sh"]}}')
    assert conf.env["A"] == "1"
    assert conf.cmd == ("sh",)


def test_machine_log_lines_are_storable_and_bounded(tmp_path: Path) -> None:
    log = tmp_path / "log"
    long_line = b"x" * (MAX_LOG_LINE * 3)
    log.write_bytes(b"a\x00b\n" + long_line)
    tail = LogTail(log, 0)
    lines = tail.read()
    # NUL cannot be stored in a database column: it becomes U+FFFD like undecodable bytes.
    assert lines[0] == "a\ufffdb"
    # A line that never ends is shipped in bounded pieces, not buffered without limit.
    assert all(len(line) <= MAX_LOG_LINE for line in lines)
    assert len(tail.partial) <= MAX_LOG_LINE
