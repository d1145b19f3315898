"""Features the CPU models advertise work (issue 14, "every feature a model
advertises works, or the model does not advertise it").

* IA32_VMX_MISC bit 30 (SDM Vol. 3D A.6; Vol. 3C "Checks on VM-Entry Control
  Fields", "Event Injection"): with it, a software interrupt, privileged
  software exception or software exception may be injected with VM-entry
  instruction length 0; the frame then returns to GUEST_RIP itself.  Without
  it (nehalem, westmere) the entry fails with VMfailValid 7.
* IA32_VMX_EPT_VPID_CAP bit 0 (SDM Vol. 3C "EPT Misconfigurations"): with it an
  EPT entry with bits 2:0 = 100b is an execute-only translation: fetches go,
  a data read is an EPT violation reporting "executable" (qualification bit 5);
  without it the entry is an EPT misconfiguration (exit 49).
"""
from __future__ import annotations

import pytest

from devirt_emu.cpumodels import get_model
from devirt_emu.testing.vmx_case import CODE_BASE, run_case

CPUID_EXIT = 10
VALID = 1 << 31
SOFT_INTR, PRIV_SOFT_EXC, SOFT_EXC = 4 << 8, 5 << 8, 6 << 8
IDT_BASE = 0x12000                 # the fresh case's IDTR base
VMXERR_ENTRY_INVALID_CONTROL_FIELD = 7


def interrupt_gate(handler: int) -> bytes:
    """A 64-bit interrupt gate (SDM "64-Bit IDT Gate Descriptors"): selector 0x08, type 0xE, P."""
    lo = (handler & 0xFFFF) | 0x08 << 16 | 0xE << 40 | 1 << 47 | ((handler >> 16) & 0xFFFF) << 48
    return (lo | (handler >> 32) << 64).to_bytes(16, "little")


SRC = "nop\nhandler: mov rax, [rsp]\nexit: cpuid"


@pytest.mark.parametrize("itype,vector", [(SOFT_INTR, 0x80), (PRIV_SOFT_EXC, 1), (SOFT_EXC, 3)])
def test_injection_with_length_0_returns_to_guest_rip(itype, vector):
    assert get_model("skylake-server").has("VMX_MISC_ZERO_LEN_INS")
    sym = run_case(SRC).symbols
    r = run_case(SRC, vmcs={"VM_ENTRY_INTR_INFO_FIELD": VALID | itype | vector,
                            "VM_ENTRY_INSTRUCTION_LEN": 0},
                 memory={IDT_BASE + 16 * vector: interrupt_gate(sym["handler"])})
    assert r.exit is not None and r.exit.reason == CPUID_EXIT, str(r)
    assert r.exit.regs["rax"] == CODE_BASE          # the pushed RIP: GUEST_RIP + 0


@pytest.mark.parametrize("cpu", ["nehalem", "westmere"])
def test_injection_with_length_0_fails_where_misc_bit_30_is_clear(cpu):
    assert not get_model(cpu).has("VMX_MISC_ZERO_LEN_INS")
    r = run_case(SRC, vmcs={"VM_ENTRY_INTR_INFO_FIELD": VALID | SOFT_INTR | 0x80,
                            "VM_ENTRY_INSTRUCTION_LEN": 0}, cpu=cpu)
    assert r.entry_failure is not None
    assert r.entry_failure.error == VMXERR_ENTRY_INVALID_CONTROL_FIELD


EPT_VIOLATION, EPT_MISCONFIG = 48, 49
X_ONLY = 0b100
Q_READ, Q_X, Q_GLA, Q_TRANSLATION = 1 << 0, 1 << 5, 1 << 7, 1 << 8


@pytest.mark.parametrize("cpu", ["skylake-server", "nehalem", "sapphire-rapids"])
def test_ept_execute_only_code_page_runs(cpu):
    assert get_model(cpu).has("ept_x_only")
    r = run_case("nop\ncpuid", ept=["identity", {CODE_BASE: (CODE_BASE, X_ONLY)}], cpu=cpu)
    assert r.exit is not None and r.exit.reason == CPUID_EXIT, str(r)
    assert r.exit.guest_rip == CODE_BASE + 1


def test_ept_execute_only_page_refuses_a_data_read():
    r = run_case("mov rax, [rip]\ncpuid", ept=["identity", {CODE_BASE: (CODE_BASE, X_ONLY)}])
    assert r.exit is not None and r.exit.reason == EPT_VIOLATION, str(r)
    assert r.exit.qualification == Q_READ | Q_X | Q_GLA | Q_TRANSLATION
    assert r.exit.guest_physical_address == CODE_BASE + 7     # the byte after the 7-byte MOV


def test_ept_execute_only_entry_is_a_misconfiguration_without_the_capability():
    r = run_case("nop\ncpuid", ept=["identity", {CODE_BASE: (CODE_BASE, X_ONLY)}],
                 cpu="skylake-server,-ept_x_only")
    assert r.exit is not None and r.exit.reason == EPT_MISCONFIG, str(r)


# ---------------------------------------------------------------- MONITOR / MWAIT
# SDM Vol. 2B MONITOR, MWAIT: CPL 0 only (#UD), reserved ECX bits #GP(0); MWAIT falls
# through when the monitor is not armed (or was triggered), else it waits until a store
# to the monitored line or an interrupt (IF = 1, or any with ECX[0] = 1), NMI, INIT.
from devirt_emu.asm import assemble                         # noqa: E402
from devirt_emu.machine import Machine                      # noqa: E402
from devirt_emu.platform import longmode as LM              # noqa: E402
from devirt_emu.platform.core import State                  # noqa: E402

MONITOR_EXITING, MWAIT_EXITING = 1 << 29, 1 << 10
MWAIT_EXIT, MONITOR_EXIT, EXC_EXIT = 36, 39, 0
FLAG = 0x400000
ARM = f"mov rax, {FLAG:#x}\nxor ecx, ecx\nxor edx, edx\nmonitor\n"


def test_cpuid_advertises_monitor_and_leaf_5():
    m = get_model("skylake-server")
    assert m.cpuid_for(1, 0, 0, 1)[2] >> 3 & 1                  # CPUID.01H:ECX.MONITOR
    eax, ebx, ecx, _ = m.cpuid_for(5, 0, 0, 1)
    assert eax & 0xFFFF == ebx & 0xFFFF == 64 and ecx & 3 == 3


def test_mwait_after_a_store_to_the_line_falls_through():
    r = run_case(ARM + "mov byte ptr [rax], 1\nmwait\ncpuid")
    assert r.exit is not None and r.exit.reason == CPUID_EXIT, str(r)


def test_mwait_without_monitor_falls_through():
    assert run_case("xor ecx, ecx\nmwait\ncpuid").exit.reason == CPUID_EXIT


def test_mwait_on_an_armed_line_waits():
    r = run_case(ARM + "mwait\ncpuid")
    assert r.exit is None and r.no_exit.why == "halted"


@pytest.mark.parametrize("code", ["mov ecx, 2\nmwait", "mov ecx, 1\nmov rax, 0x400000\nmonitor"])
def test_reserved_ecx_bits_raise_gp(code):
    r = run_case(code + "\ncpuid", vmcs={"EXCEPTION_BITMAP": 1 << 13})
    assert r.exit is not None and r.exit.reason == EXC_EXIT
    assert r.exit.interruption_info & 0xFF == 13 and r.exit.error_code == 0


def test_monitor_and_mwait_raise_ud_on_a_model_without_them():
    for code in ("monitor", "mwait"):
        r = run_case(code + "\ncpuid", vmcs={"EXCEPTION_BITMAP": 1 << 6},
                     cpu="skylake-server,-monitor")
        assert r.exit is not None and r.exit.reason == EXC_EXIT and r.exit.interruption_info & 0xFF == 6


def test_the_exit_rules_keep_working():
    assert run_case("monitor\ncpuid", vmcs={"CPU_BASED_VM_EXEC_CONTROL": MONITOR_EXITING},
                    legal=True).exit.reason == MONITOR_EXIT
    # the MWAIT exit qualification says whether the monitor was armed (SDM Table 28-? "MWAIT")
    armed = run_case(ARM + "mwait\ncpuid", vmcs={"CPU_BASED_VM_EXEC_CONTROL": MWAIT_EXITING},
                     legal=True)
    assert armed.exit.reason == MWAIT_EXIT and armed.exit.qualification == 1
    idle = run_case("xor ecx, ecx\nmwait\ncpuid", vmcs={"CPU_BASED_VM_EXEC_CONTROL": MWAIT_EXITING},
                    legal=True)
    assert idle.exit.reason == MWAIT_EXIT and idle.exit.qualification == 0


WAITER = 0x100000
WRITER = 0x101000


def _two_cores(waiter: str, writer: str) -> Machine:
    m = Machine(cores=2, max_ns=10**8)
    LM.write_environment(m)
    for core, base, src in ((m.cores[0], WAITER, waiter), (m.cores[1], WRITER, writer)):
        code, _ = assemble(src, base, "mwait")
        m.write_phys(base, code)
    LM.enter(m.cores[0], WAITER)
    LM.enter(m.cores[1], WRITER, rsp=LM.STACK_TOP - 0x1000)
    m.boot(prepared=True)
    return m


def test_a_store_by_another_core_wakes_mwait():
    # core 0 waits on the line; core 1 spins a while, then stores 7 into it; core 0 then
    # reports the flag through the exit port (0 would mean it woke too early)
    waiter = ARM + "mwait\nmov al, [rax]\nxor al, 7\nout 0xf4, al\nhlt"
    writer = f"mov ecx, 2000\n1: dec ecx\njnz 1b\nmov byte ptr [{FLAG:#x}], 7\n2: hlt\njmp 2b"
    m = _two_cores(waiter, writer)
    res = m.run()
    assert res.verdict == "pass", res.message


SPIN = "1: pause\njmp 1b"        # core 1 keeps the machine running


def _waiting_with_a_masked_interrupt(ecx: int) -> Machine:
    m = _two_cores(f"cli\n{ARM}mov ecx, {ecx}\nmwait\nmov al, 0\nout 0xf4, al\nhlt", SPIN)
    m.run_until(max_instructions=200)
    c0 = m.cores[0]
    assert c0.state is State.HALTED and c0.monitor.waiting
    c0.lapic.mmio_write(0xF0, 4, 0x1FF)        # SVR: the local APIC software-enabled
    assert c0.lapic.accept(0x40)               # a fixed interrupt arrives, RFLAGS.IF = 0
    return m


def test_a_masked_interrupt_ends_the_wait_with_ecx_bit_0():
    m = _waiting_with_a_masked_interrupt(1)
    m.run_until(max_instructions=5000)
    assert m.verdict == "pass", m.message
    assert m.cores[0].lapic.pending_vector() == 0x40       # not delivered: IF = 0


def test_a_masked_interrupt_does_not_end_the_wait_without_ecx_bit_0():
    m = _waiting_with_a_masked_interrupt(0)
    m.run_until(max_instructions=5000)
    assert m.verdict is None
    assert m.cores[0].state is State.HALTED and m.cores[0].monitor.waiting


# ---------------------------------------------------------------- PCID / INVPCID
# SDM Vol. 3A 4.10.1, Vol. 2A INVPCID, MOV to CR: CR4.PCIDE needs IA-32e mode and
# CR3[11:0] = 0 (#GP(0)); with PCIDE, MOV to CR3 takes the PCID in bits 11:0 and does
# not load bit 63; INVPCID #GP(0) for type > 3, reserved descriptor bits, a
# non-canonical type-0 address, a non-zero PCID with type 0/1 while PCIDE = 0.
import struct                                               # noqa: E402

from devirt_emu.testing.vmx_case import legal_controls      # noqa: E402

ENABLE_INVPCID, ACTIVATE_SECONDARY = 1 << 12, 1 << 31
DESC = 0x400000
SET_PCIDE = "mov rax, cr4\nbts rax, 17\nmov cr4, rax\n"


def pcid_case(code, desc=(0, 0), cpu=None, invpcid=True):
    fields = legal_controls({"CPU_BASED_VM_EXEC_CONTROL": ACTIVATE_SECONDARY}, cpu)
    fields["SECONDARY_VM_EXEC_CONTROL"] = ENABLE_INVPCID if invpcid else 0
    fields["EXCEPTION_BITMAP"] = (1 << 13) | (1 << 6)
    return run_case(code + "\nexit: cpuid", vmcs=fields, memory={DESC: struct.pack("<QQ", *desc)},
                    cpu=cpu)


def exception_vector(r):
    assert r.exit is not None and r.exit.reason == EXC_EXIT, str(r)
    return r.exit.interruption_info & 0xFF


@pytest.mark.parametrize("cpu,pcid,invpcid", [
    ("skylake-server", True, True), ("icelake-server", True, True),
    ("sapphire-rapids", True, True), ("westmere", True, False), ("nehalem", False, False)])
def test_cpuid_pcid_and_invpcid_by_generation(cpu, pcid, invpcid):
    # PCID: Westmere and later; INVPCID: Haswell and later
    m = get_model(cpu)
    assert m.has("pcid") == pcid and m.has("invpcid") == invpcid
    assert bool(m.cpuid_for(7, 0, 0, 1)[1] >> 10 & 1) == invpcid


@pytest.mark.parametrize("kind", [0, 1, 2, 3])
def test_invpcid_types_0_to_3_execute(kind):
    r = pcid_case(f"mov rax, {kind}\ninvpcid rax, [{DESC:#x}]")
    assert r.exit is not None and r.exit.reason == CPUID_EXIT, str(r)


@pytest.mark.parametrize("kind,desc", [
    (4, (0, 0)),                    # type above 3
    (0, (1 << 12, 0)),              # descriptor bits 63:12
    (0, (0, 1 << 47)),              # type 0, non-canonical address
    (1, (5, 0)),                    # PCID 5 with CR4.PCIDE = 0
    (0, (5, 0x1000)),
])
def test_invpcid_gp(kind, desc):
    r = pcid_case(f"mov rax, {kind}\ninvpcid rax, [{DESC:#x}]", desc=desc)
    assert exception_vector(r) == 13 and r.exit.error_code == 0


def test_pcide_then_cr3_with_a_pcid_and_the_no_flush_bit():
    r = pcid_case(SET_PCIDE + "mov rax, cr3\nor rax, 5\nbts rax, 63\nmov cr3, rax\nmov rbx, cr3\n"
                  f"mov rax, 1\ninvpcid rax, [{DESC:#x}]\nmov rcx, [{DESC + 8:#x}]", desc=(5, 0))
    assert r.exit is not None and r.exit.reason == CPUID_EXIT, str(r)
    cr3 = r.exit.regs["rbx"]
    assert cr3 & 0xFFF == 5 and not cr3 >> 63          # the PCID kept, bit 63 not loaded
    assert r.exit.regs["cr4"] >> 17 & 1


def test_setting_pcide_needs_cr3_bits_11_0_clear():
    r = pcid_case("mov rax, cr3\nor rax, 8\nmov cr3, rax\n" + SET_PCIDE)
    assert exception_vector(r) == 13


def test_no_pcid_on_nehalem_and_no_invpcid_on_westmere():
    assert exception_vector(pcid_case(SET_PCIDE, cpu="nehalem", invpcid=False)) == 13
    r = pcid_case(f"xor eax, eax\ninvpcid rax, [{DESC:#x}]", cpu="westmere", invpcid=False)
    assert exception_vector(r) == 6            # #UD: no INVPCID (and no "enable INVPCID")
