"""The command line: the JSON object, exit statuses, traces, and bad input
(one clear line on stderr, never a traceback)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "guest_tests" / "hello.S"


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "devirt_emu", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def one_error_line(p):
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    assert lines[0].startswith("devirt-emu: error: ")
    return lines[0]


def test_json_has_every_documented_key():
    p = cli("run", HELLO, "--cores", "2", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    for key in ("verdict", "serial", "cores", "instructions", "virtual_ns", "events", "wall_s",
                "exits", "exit_counts", "window_exit_counts", "markers", "mips", "exit_status"):
        assert key in d
    assert d["verdict"] == "pass" and d["cores"] == 2 and len(d["instructions"]) == 2
    assert all(isinstance(n, int) and n > 0 for n in d["instructions"])
    assert "hello" in d["serial"]
    assert d["events"]["OUT"] > 0


def test_json_exit_records_are_the_first_n_and_the_counts_complete():
    p = cli("run", HELLO, "--arch", "vmx", "--json", "--exit-records", "5")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    total = sum(d["exit_counts"].values())
    assert len(d["exits"]) == 5 and d["exits_dropped"] == total - 5 > 0
    full = json.loads(cli("run", HELLO, "--arch", "vmx", "--json", "--exit-records", "all").stdout)
    assert full["exits"][:5] == d["exits"] and len(full["exits"]) == total
    assert full["exits_dropped"] == 0


def test_text_summary_and_vmx_table():
    p = cli("run", HELLO, "--arch", "vmx", "--config", "devirt")
    assert p.returncode == 0, p.stderr
    assert "verdict      pass" in p.stdout
    assert "hypervisor   vmx devirt" in p.stdout
    assert "IO_INSTRUCTION" in p.stdout


def test_failing_guest_exit_status_is_qemus(tmp_path):
    prog = tmp_path / "f.S"
    prog.write_text("guest_main:\n    mov eax, 5\n    ret\n")
    p = cli("run", prog, "--json")
    d = json.loads(p.stdout)
    assert d["verdict"] == "fail"
    assert p.returncode == (5 << 1) | 1 == d["exit_status"]


def test_trace_writes_json_lines(tmp_path):
    out = tmp_path / "t.jsonl"
    p = cli("run", HELLO, "--trace", out)
    assert p.returncode == 0
    lines = out.read_text().splitlines()
    assert len(lines) > 10
    first = json.loads(lines[0])
    assert {"kind", "core", "rip", "icount"} <= set(first)


def test_missing_file():
    p = cli("run", "no/such/file.S")
    assert p.returncode == 2
    assert "no such file" in one_error_line(p)


def test_assembly_error_names_file_and_line(tmp_path):
    prog = tmp_path / "bad.S"
    prog.write_text("guest_main:\n    xor eax, eax\n    frobnicate eax\n    ret\n")
    p = cli("run", prog)
    assert p.returncode == 2
    line = one_error_line(p)
    assert "bad.S:3" in line


@pytest.mark.parametrize("args", [("run", HELLO, "--cores", "0"), ("run", HELLO, "--cores", "x"),
                                  ("run", HELLO, "--arch", "arm"), ("run", HELLO, "--bogus"),
                                  ("run", HELLO, "--config", "devirt"), ("run", HELLO, "--mem", "8"),
                                  ("run", HELLO, "--exit-records", "-1"),
                                  ("run", HELLO, "--exit-records", "some")])
def test_bad_options(args):
    p = cli(*args)
    assert p.returncode == 2
    one_error_line(p)


def test_not_an_elf_nor_assembly(tmp_path):
    prog = tmp_path / "junk.bin"
    prog.write_bytes(b"\x7fELF" + b"\x00" * 60)
    p = cli("run", prog)
    assert p.returncode == 2
    one_error_line(p)


def test_help_documents_the_options():
    p = cli("run", "--help")
    assert p.returncode == 0
    for word in ("--cores", "--fast", "--json", "--trace", "--arch", "--config", "verdicts",
                 "exit status", "deterministic"):
        assert word in p.stdout


def test_guest_without_guest_main(tmp_path):
    prog = tmp_path / "nomain.S"
    prog.write_text("start:\n    ret\n")
    p = cli("run", prog)
    assert p.returncode == 2
    assert "defines no guest_main" in one_error_line(p)


def test_a_spinning_guest_times_out(tmp_path):
    prog = tmp_path / "spin.S"
    prog.write_text("guest_main:\n1:  jmp 1b\n")
    p = cli("run", prog, "--max-time", "0.01", "--json")
    assert p.returncode == 5
    assert json.loads(p.stdout)["verdict"] == "timeout"
