"""`devirt-emu fuzz`: the reference, the CLI, and a deliberately broken rule
found, shrunk and written out as a pytest file that fails on the broken build
and passes on the real one.

The broken build is made in a subprocess: the INVLPG rule is wrapped so that
it never exits, which contradicts the SDM ("INVLPG. The instruction causes a
VM exit if the 'INVLPG exiting' VM-execution control is 1")."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devirt_emu.cli import main
from devirt_emu.testing import strategies as vs
from devirt_emu.testing.fuzz import FuzzSettings, reference, run_fuzz
from devirt_emu.testing.strategies import Case, Insn
from devirt_emu.testing.vmx_case import DEFAULT_CONTROLS
from devirt_emu.vmx import controls as C

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[1]
BREAK_INVLPG = """
import devirt_emu.vmx.rules as R
from devirt_emu.events import Kind
_real = R.RULES[Kind.INVLPG]
R.RULES[Kind.INVLPG] = lambda ev, vmcs, rm, pl: _real(ev, vmcs, rm, pl)._replace(exit=False)
"""


def _python(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTEST_ADDOPTS="")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _case(*insns, **fields):
    vmcs = dict(DEFAULT_CONTROLS)
    vmcs.update(fields)
    return Case(program=tuple(insns), vmcs=vmcs)


def test_reference_follows_the_sdm():
    hlt, cpuid, ud2 = Insn("hlt", "hlt"), Insn("cpuid", "cpuid"), Insn("ud2", "ud2")
    proc = DEFAULT_CONTROLS["CPU_BASED_VM_EXEC_CONTROL"]
    assert reference(_case(cpuid)).reason == 10
    assert reference(_case(hlt)).reason is None                        # halts
    assert reference(_case(hlt, CPU_BASED_VM_EXEC_CONTROL=proc | C.CPU_BASED_HLT_EXITING)).reason == 12
    assert reference(_case(ud2)).reason == 2                           # #UD, #GP, #DF: triple fault
    assert reference(_case(ud2, EXCEPTION_BITMAP=1 << 13)) == reference(
        _case(ud2, EXCEPTION_BITMAP=1 << 13))
    e = reference(_case(ud2, EXCEPTION_BITMAP=1 << 13))
    assert (e.reason, e.vector) == (0, 13)
    io = Insn("in", "mov dx, 0x60\nin al, dx", {"port": 0x60})
    bm = proc | C.CPU_BASED_USE_IO_BITMAPS | C.CPU_BASED_UNCOND_IO_EXITING
    # with I/O bitmaps the unconditional control is ignored: only the port's bit counts
    assert reference(_case(io, CPU_BASED_VM_EXEC_CONTROL=bm)).reason is None
    cr0 = Insn("mov_to_cr0", "mov rax, 0x80010033\nmov cr0, rax", {"value": 0x80010033})
    assert reference(_case(cr0, CR0_GUEST_HOST_MASK=8, CR0_READ_SHADOW=0x80010033)).reason is None
    assert reference(_case(cr0, CR0_GUEST_HOST_MASK=8, CR0_READ_SHADOW=0x8001003B)).reason == 28


def test_fuzz_passes_on_the_model_and_reports_coverage(tmp_path):
    report = run_fuzz(FuzzSettings(examples=60, seed=5, out=str(tmp_path), progress=False))
    assert report.failure is None, report.failure
    assert report.cases >= 60
    assert report.coverage.reasons and report.coverage.entry_checks
    assert not list(tmp_path.iterdir())


def test_the_cli(tmp_path, capsys):
    assert main(["fuzz", "--examples", "30", "--seed", "1", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["failure"] is None and out["cases"] >= 30 and out["exit_reasons"]
    assert main(["fuzz", "--arch", "svm"]) == 2
    assert "only vmx can be fuzzed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["fuzz", "--examples", "0"])
    assert e.value.code == 2
    f = tmp_path / "file"
    f.write_text("")
    assert main(["fuzz", "--out", str(f)]) == 2


def test_fuzz_finds_a_broken_rule_and_the_reproducer_fails(tmp_path):
    run = _python(BREAK_INVLPG + f"""
import sys
from devirt_emu.cli import main
sys.exit(main(["fuzz", "--examples", "3000", "--seed", "0", "--out", {str(tmp_path)!r}]))
""", tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "INVLPG" in run.stdout, run.stdout
    (repro,) = tmp_path.glob("test_fuzz_repro_*.py")
    text = repro.read_text()
    assert "invlpg" in text and "CODE = " in text
    pytest_cmd = (f"import sys, pytest\nsys.exit(pytest.main([{str(repro)!r}, '-q', '-p', "
                  "'devirt_emu.testing.plugin', '-p', 'no:cacheprovider']))\n")
    broken = _python(BREAK_INVLPG + pytest_cmd, tmp_path)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert "INVLPG" in broken.stdout
    healthy = _python(pytest_cmd, tmp_path)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr


def test_shrunk_programs_are_short():
    """The strategies shrink: the smallest program that reaches INVLPG is one step."""
    from hypothesis import find, settings
    p = find(vs.programs(), lambda prog: any(i.kind == "invlpg" for i in prog),
             settings=settings(max_examples=1000, database=None))
    assert [i.kind for i in p] == ["invlpg"]


def test_a_reproducer_for_another_cpu_model_runs_on_it(pytester):
    """A reproducer of `fuzz --cpu westmere` runs its case on a westmere runner;
    on the real model (no bug) it passes."""
    from devirt_emu.testing.fuzz import PropertyFailure, write_reproducer
    proc = DEFAULT_CONTROLS["CPU_BASED_VM_EXEC_CONTROL"] | C.CPU_BASED_HLT_EXITING
    case = _case(Insn("hlt", "hlt"), CPU_BASED_VM_EXEC_CONTROL=proc)
    path = write_reproducer(pytester.path, ("case", case), PropertyFailure("reference", "x"),
                            FuzzSettings(cpu="westmere"))
    text = path.read_text()
    assert "CaseRunner(cpu='westmere')" in text and "--cpu westmere" in text
    pytester.runpytest("-p", "devirt_emu.testing.plugin", str(path)).assert_outcomes(passed=1)
