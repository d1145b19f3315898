"""The debugger's REPL, scripted through --batch and -ex (every command's help,
bad input, a session), and one pexpect test of the interactive prompt."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devirt_emu.asm import build_image
from devirt_emu.debugger.repl import COMMANDS

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guest_tests"


def debug(*args, batch: str | None = None, tmp_path=None, timeout=120):
    cmd = [sys.executable, "-m", "devirt_emu", "debug", *map(str, args)]
    if batch is not None:
        f = tmp_path / "cmds.txt"
        f.write_text(batch)
        cmd += ["--batch", str(f)]
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path or "/tmp"))
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


def test_every_command_has_help(tmp_path):
    script = "".join(f"help {name}\n" for name in COMMANDS) + "help\n"
    p = debug(GUESTS / "hello.S", batch=script, tmp_path=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    for name, cmd in COMMANDS.items():
        assert f"usage: {cmd.usage}" in p.stdout, name
        assert cmd.help.split()[0] in p.stdout
    assert "error:" not in p.stdout


def test_bad_input_gets_one_line_and_the_session_survives(tmp_path):
    script = """\
bogus
break no_such_symbol
x/4q 0x1000
x/4gx 0x7fffffffffff0000
vmcs NO_SUCH_FIELD
set NO_SUCH_FIELD 1
set VIRTUAL_PROCESSOR_ID 0x10000
set VM_EXIT_REASON 1
explain NOPE
until
core 9
stepi -1
stepi x
break-exit NOPE
"unterminated
stepi 3
"""
    p = debug(GUESTS / "hello.S", "--arch", "vmx", batch=script, tmp_path=tmp_path)
    assert p.returncode == 1                       # some command failed
    assert "Traceback" not in p.stdout + p.stderr
    errors = [ln for ln in p.stdout.splitlines() if ln.startswith("error:")]
    assert len(errors) == 15, p.stdout
    assert "internal error" not in p.stdout
    assert "step: core 0" in p.stdout              # still alive at the end


def test_a_scripted_session(tmp_path):
    syms = build_image(GUESTS / "lapic_timer.S").symbols
    script = """\
break timer_handler
continue
x/1gx $rsp
regs
why
vmcs control
set CPU_BASED_RDTSC_EXITING 1
explain CPU_BASED_RDTSC_EXITING
set CPU_BASED_RDTSC_EXITING 0
break-exit MSR_WRITE
continue
why
exits reason MSR_WRITE last 1
info breakpoints
snapshot here
stepi 2
reverse-stepi 2
restore here
quit
stepi
"""
    p = debug(GUESTS / "lapic_timer.S", "--cores", "2", "--arch", "vmx", batch=script,
              tmp_path=tmp_path)
    out = p.stdout
    assert p.returncode == 0, out + p.stderr
    assert f"breakpoint 1: core 1 at {syms['timer_handler']:#x} <timer_handler>" in out
    assert "PIN_BASED_EXT_INTR_MASK" in out            # controls as named bits
    assert "CPU_BASED_RDTSC_EXITING=1" in out and "bit 12 of CPU_BASED_VM_EXEC_CONTROL" in out
    assert "VM exit MSR_WRITE (32)" in out
    assert "MSR bitmap write-low bit" in out          # the rule's cause, then where it lives
    assert "efer" in out and "[LME LMA" in out
    assert out.count("(devirt) stepi") == 1           # quit ended the script


def test_ex_commands_then_batch_from_stdin(tmp_path):
    p = subprocess.run([sys.executable, "-m", "devirt_emu", "debug", str(GUESTS / "hello.S"),
                        "-ex", "stepi 4", "--batch", "-"], input="core\n", cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0
    assert "* core 0: running, 4 instructions" in p.stdout


def test_bad_options(tmp_path):
    p = debug("no_such_file.S", tmp_path=tmp_path)
    assert p.returncode == 2 and "no such file" in p.stderr
    p = debug(GUESTS / "hello.S", "--config", "stock", tmp_path=tmp_path)
    assert p.returncode == 2 and "--config needs --arch vmx" in p.stderr


def test_the_interactive_prompt(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    guest = tmp_path / "spin.S"
    guest.write_text(".text\nguest_main:\n    nop\nspin:\n    jmp spin\n")
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path), TERM="dumb")
    child = pexpect.spawn(sys.executable, ["-m", "devirt_emu", "debug", str(guest),
                                           "--max-time", "100"], cwd=str(ROOT), env=env,
                          encoding="utf-8", timeout=30)
    try:
        child.expect_exact("(devirt) ")
        child.sendline("break spin")
        child.expect("breakpoint 1 at 0x[0-9a-f]+ <spin>")
        child.expect_exact("(devirt) ")
        child.sendline("continue")
        child.expect("breakpoint 1: core 0 at 0x[0-9a-f]+ <spin>")
        child.expect_exact("(devirt) ")
        child.sendline("delete")
        child.expect_exact("(devirt) ")
        child.sendline("no_such_command")
        child.expect("error: unknown command")
        child.expect_exact("(devirt) ")
        child.sendline("continue")                   # spins until Ctrl-C
        import time
        time.sleep(1.5)
        child.sendintr()
        child.expect("interrupted: core 0")
        child.expect_exact("(devirt) ")
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert (tmp_path / "devirt-emu" / "debug_history").read_text().count("continue") == 2


def test_set_a_register(tmp_path):
    p = debug(GUESTS / "hello.S", "-ex", "stepi 100", "-ex", "set $rbx 0x1234",
              "-ex", "x/1gx $rbx", "-ex", "set $xmm0 1", "-ex", "set $rbx 0x10000000000000000",
              batch="", tmp_path=tmp_path)
    assert "$rbx = 0x1234" in p.stdout
    assert "0x1234:" in p.stdout                 # $rbx resolves to the new value
    assert p.stdout.count("error:") == 2 and p.returncode == 1


def test_gdb_stub_that_cannot_listen_is_one_line(tmp_path):
    p = debug(GUESTS / "hello.S", "--gdb", "192.0.2.1:1234", "--gdb-symbols",
              tmp_path / "s.elf", tmp_path=tmp_path)
    assert p.returncode == 2 and "cannot listen on 192.0.2.1:1234" in p.stderr
    assert "Traceback" not in p.stderr


def test_tab_completes_a_symbol(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    import time
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path), TERM="xterm")
    child = pexpect.spawn(sys.executable, ["-m", "devirt_emu", "debug",
                                           str(GUESTS / "lapic_timer.S")], cwd=str(ROOT),
                          env=env, encoding="utf-8", timeout=30, dimensions=(24, 200))
    try:
        child.expect(r"\(devirt\)")
        child.send("break timer_han")
        time.sleep(1.0)
        child.send("\t")
        time.sleep(1.0)
        child.send("\r")
        child.expect("breakpoint 1 at 0x[0-9a-f]+ <timer_handler>")
        child.expect(r"\(devirt\)")
        child.sendline("quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)


def test_physical_watch(tmp_path):
    # the tick counter is at guest-physical 0x1a1c0 = linear (the firmware maps RAM 1:1)
    p = debug(GUESTS / "lapic_timer.S", "--cores", "2", "-ex", "watch -p ticks 8",
              "-ex", "continue", "-ex", "watch -p", batch="", tmp_path=tmp_path)
    assert "watchpoint 1 (write) on guest-physical 0x1a1c0+8" in p.stdout, p.stdout
    assert "watchpoint 1" in p.stdout.split("(devirt) continue", 1)[1]
    assert "error: watch: usage: watch [-p] ADDR [SIZE]" in p.stdout
