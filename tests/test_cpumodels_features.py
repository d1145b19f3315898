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
