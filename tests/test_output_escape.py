"""Names printed by `ls`, `verify` and the progress lines cannot forge output lines: control characters are escaped."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mirror.digest import Digest
from mirror.engine.copy import ImageResult
from mirror.progress import result_line
from mirror.reference import Reference
from mirror.text import printable
from tools.imagebuild import Layout as SrcLayout
from tools.imagebuild import random_layer

ROOT = Path(__file__).resolve().parent.parent
EVIL = "localhost/x:1\nok\tlocalhost/victim:latest\x00\x1b[2J\x7f\x9b"
EVIL_SHOWN = "localhost/x:1\\nok\\x09localhost/victim:latest\\x00\\x1b[2J\\x7f\\x9b"


def mirror(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True, env=env)


def test_printable_escapes_every_control_character() -> None:
    assert printable("a\nb") == "a\\nb"
    assert printable("\x00\t\r\x1f\x7f\x80\x9f") == "\\x00\\x09\\x0d\\x1f\\x7f\\x80\\x9f"
    assert printable("caf\u00e9 \u00a0ok/x:1.2-rc") == "caf\u00e9 \u00a0ok/x:1.2-rc"  # printable text is untouched
    assert printable(ValueError("bad\nline")) == "bad\\nline"


def test_ls_and_verify_print_a_forged_name_escaped(tmp_path: Path) -> None:
    # A cache written by an old version (or by hand) whose index.json names an image with a
    # newline, a tab, NUL and terminal escapes.
    cache = tmp_path / "cache"
    src = SrcLayout(cache)
    image = src.image([random_layer(2_000, 7)])
    src.tag(EVIL, image)
    src.tag("localhost/plain:1", image)

    res = mirror("ls", "--cache", str(cache))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2  # one line per entry, whatever the names hold
    assert sorted(line.split("\t")[0] for line in lines) == ["localhost/plain:1", EVIL_SHOWN]
    assert all(line.split("\t")[1] == image["digest"] for line in lines)
    assert "\x00" not in res.stdout and "\x1b" not in res.stdout

    res = mirror("verify", "--cache", str(cache))
    assert res.returncode == 0, res.stdout + res.stderr
    assert sorted(res.stdout.splitlines()) == ["ok\tlocalhost/plain:1", f"ok\t{EVIL_SHOWN}"]


def test_progress_lines_escape_names_and_errors() -> None:
    ref = Reference.parse("localhost/x:1")
    ok = ImageResult(ref, "ok", Digest("sha256", "a" * 64), ("linux/amd64",), 10, 0.5)
    assert "\n" not in result_line(ok)
    failed = ImageResult(ref, "failed", error="registry says: no\nok localhost/victim:latest")
    line = result_line(failed)
    assert line == "FAILED localhost/x:1: registry says: no\\nok localhost/victim:latest"
