"""An example test file for your own hypervisor tests: copy it, run `pytest`.

The devirt-emu pytest plugin (installed with devirt-emu) gives the fixtures
`vmx_case` / `vmx_runner` / `devirt_machine` and the assertions; the
strategies come from `devirt_emu.testing.strategies`.  Every expectation here
is the SDM's.
"""
from hypothesis import given, settings

from devirt_emu.testing import strategies as vs
from devirt_emu.testing.asserts import assert_entry_fails, assert_exit, assert_no_exit

PROC = "CPU_BASED_VM_EXEC_CONTROL"
HLT_EXITING = 1 << 7
USE_IO_BITMAPS = 1 << 25


def test_cpuid_exits_unconditionally(vmx_case):
    assert_exit(vmx_case("cpuid"), reason="CPUID", instruction_length=2)


def test_hlt_exits_only_with_hlt_exiting(vmx_case):
    assert_exit(vmx_case("hlt", vmcs={PROC: HLT_EXITING}, legal=True), reason="HLT")
    assert_no_exit(vmx_case("hlt"), why="halted")


def test_in_through_the_io_bitmap(vmx_case):
    r = vmx_case("in al, 0x60", vmcs={PROC: USE_IO_BITMAPS}, legal=True, io_bitmap_a=[0x60])
    # port 0x60, immediate operand, IN, 1 byte (SDM Table "Exit Qualification for I/O Instructions")
    assert_exit(r, reason="IO_INSTRUCTION", qualification=0x00600048)


def test_a_must_be_1_control_bit_left_0(vmx_case):
    assert_entry_fails(vmx_case("hlt", vmcs={PROC: HLT_EXITING}), error=7,
                       field="CPU_BASED_VM_EXEC_CONTROL")


@settings(max_examples=20, deadline=None)
@given(vs.entry_breakage(area="guest"))
def test_a_broken_guest_state_check_fails_entry(vmx_runner, x):
    fields, _, breakage = x
    r = vmx_runner.run("cpuid", vmcs={**fields, **breakage.fields})
    assert_entry_fails(r, exit_reason=0x80000021, field=breakage.field)


def test_a_machine_boots_and_runs(devirt_machine):
    from devirt_emu.platform import longmode
    from devirt_emu.asm import assemble
    m = devirt_machine(cores=1, arch="none")
    code, _ = assemble("mov al, 0\nout 0xf4, al", 0x200000, "example")
    longmode.write_environment(m)
    m.write_phys(0x200000, code)
    longmode.enter(m.cores[0], 0x200000)
    m.boot(prepared=True)
    assert m.run().verdict == "pass"
