"""The pytest plugin, tested with pytester: its fixtures work in a user's test
files, the docs' example file passes, and a failing assertion prints the why
(the exit rule's cause, the failed entry check, the controls) and the
disassembly around RIP.  (Each pytester run costs a pytest start-up: the
checks share three runs.)"""
from __future__ import annotations

from pathlib import Path

pytest_plugins = ["pytester"]

PLUGIN = ("-p", "devirt_emu.testing.plugin")
EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "test_vmx_example.py"


def test_fixtures_work(pytester):
    pytester.makepyfile(test_a="""
        import builtins

        def test_runner_is_shared(vmx_runner):
            builtins._devirt_runner = vmx_runner

        def test_case(vmx_case, assert_exit):
            assert_exit(vmx_case("cpuid"), reason=10, instruction_length=2)

        def test_svm(svm_case):
            r = svm_case("cpuid", intercepts=["INTERCEPT_CPUID"])
            assert r.exit.code == 0x72          # APM: VMEXIT_CPUID

        def test_machine(devirt_machine):
            m = devirt_machine(cores=2)
            assert len(m.cores) == 2 and m.l0 is not None
    """, test_b="""
        import builtins

        def test_same_runner_in_another_module(vmx_runner):
            assert builtins._devirt_runner is vmx_runner
    """)
    pytester.runpytest(*PLUGIN).assert_outcomes(passed=5)


def test_the_docs_example_file_passes(pytester):
    pytester.makepyfile(test_example=EXAMPLE.read_text())
    pytester.runpytest(*PLUGIN).assert_outcomes(passed=6)


def test_failing_assertions_print_why_and_the_code(pytester):
    pytester.makepyfile("""
        from devirt_emu.testing.asserts import assert_entry_fails, assert_no_exit
        from devirt_emu.testing.plugin import assert_exit

        def test_wrong_exit(vmx_case):
            r = vmx_case("nop\\nmov ecx, 0x10\\nrdmsr", vmcs={"CPU_BASED_VM_EXEC_CONTROL": 1 << 28},
                         legal=True, msr_bitmap={"read": [0x10]})
            assert_exit(r, reason="HLT")

        def test_missing_exit(vmx_case):
            assert_exit(vmx_case("hlt"), reason="HLT")

        def test_unexpected_exit(vmx_case):
            assert_no_exit(vmx_case("nop\\nud2", vmcs={"EXCEPTION_BITMAP": 1 << 6}))

        def test_wrong_entry_failure(vmx_case):
            assert_entry_fails(vmx_case("hlt", vmcs={"CPU_BASED_VM_EXEC_CONTROL": 1 << 7}), error=8)
    """)
    r = pytester.runpytest(*PLUGIN)
    r.assert_outcomes(failed=4)
    out = r.stdout.str()
    # a wrong exit: the rule looked at "use MSR bitmaps" and the read-low bit of MSR 0x10
    assert "expected 12 (HLT), got 31 (MSR_READ)" in out
    assert "CPU_BASED_USE_MSR_BITMAPS=1" in out and "bit 0x10=1" in out
    r.stdout.fnmatch_lines(["*=> 0x100006: rdmsr*"])
    # a missing exit: the controls in effect, and RIP after the HLT that halted
    r.stdout.fnmatch_lines(["*expected a VM exit HLT, got no exit (halted)*",
                            "*CPU_BASED_VM_EXEC_CONTROL = 0x*no optional bit*",
                            "*the last event the rules let through: HLT at 0x100000, "
                            "because CPU_BASED_HLT_EXITING=0*",
                            "*=> 0x100001: hlt*"])
    # an unexpected exit: the exception bitmap's bit for #UD
    assert "EXCEPTION_BITMAP" in out and "=> 0x100001: ud2" in out
    # a wrong entry failure: the entry check's own words and field
    assert "expected VMfailValid 8, got VMfailValid(7" in out
    assert "VM entry failed the check (field CPU_BASED_VM_EXEC_CONTROL)" in out


def test_the_entry_point_is_declared():
    import tomllib
    meta = tomllib.loads((EXAMPLE.parents[2] / "pyproject.toml").read_text())
    assert meta["project"]["entry-points"]["pytest11"] == {
        "devirt_emu.testing.plugin": "devirt_emu.testing.plugin"}
