"""docs/debugging.md tells the truth: its walk-through is run and every output
line it shows appears in order; its Python example runs; every REPL command
is in its command table."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from devirt_emu.debugger.repl import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "debugging.md").read_text()


def _block(after: str, lang: str) -> list[str]:
    start = DOC.index(after)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(DOC, start)
    return m.group(1).splitlines()


def test_the_walkthrough(tmp_path):
    lines = _block("<!-- walkthrough -->", "console")
    assert lines[0].startswith("$ python3 -m devirt_emu debug ")
    argv = shlex.split(lines[0][2:])
    script = [ln[len("(devirt) "):] for ln in lines[1:] if ln.startswith("(devirt) ")]
    assert len(script) > 10
    (tmp_path / "walk.txt").write_text("\n".join(script) + "\n")
    p = subprocess.run([sys.executable, *argv[1:], "--batch", str(tmp_path / "walk.txt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={"XDG_STATE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
                            "HOME": str(tmp_path)})
    assert p.returncode == 0, p.stdout + p.stderr
    got = [ln.rstrip() for ln in p.stdout.splitlines()]
    pos = 0
    for want in lines[1:]:
        if want.strip() == "...":
            continue
        want = want.rstrip()
        try:
            pos = got.index(want, pos) + 1
        except ValueError:
            raise AssertionError(f"not in the output (in order): {want!r}\n" + p.stdout)


def test_the_python_example(tmp_path, monkeypatch, capsys):
    code = "\n".join(_block("## The Python API", "python"))
    monkeypatch.chdir(ROOT)
    exec(compile(code, "docs/debugging.md", "exec"), {})
    assert "CPU_BASED_VM_EXEC_CONTROL" in capsys.readouterr().out


def test_every_command_is_documented():
    table = DOC[DOC.index("## Commands"):DOC.index("## why and why-not")]
    for name in COMMANDS:
        assert f"`{name}" in table, name
