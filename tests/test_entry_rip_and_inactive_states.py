"""The guest-RIP VM-entry check, and the VM exits that wake HLT and shutdown.

SDM expectations:

* 26.3.1.4 "Checks on Guest RIP, RFLAGS, and SSP": with "IA-32e mode guest"
  and CS.L = 1, bits 63:N of RIP must be identical, N the linear-address width
  (48 here).  Bit 47 is not part of the check: RIP = 0x0000_8000_0000_0000
  passes it, the entry succeeds, and the first fetch raises #GP(0) (a
  non-canonical linear address).  The checks after it (the VMCS link pointer,
  qualification 4) are then reached.
* Vol. 3C "VMX-Preemption Timer": the timer counts in the HLT and shutdown
  states; when it reaches 0 in any activity state but wait-for-SIPI it wakes
  the processor and causes a VM exit (reason 52).
* A pending MTF VM exit after a VM entry to the HLT or shutdown state wakes the
  processor (reason 37), as the issue 14 reference and hardware do.
"""
from __future__ import annotations

import pytest

from devirt_emu.asm import assemble
from devirt_emu.machine import Machine
from devirt_emu.platform import longmode as LM
from devirt_emu.testing.vmx_case import CODE_BASE, CaseRunner, run_case
from devirt_emu.vmx import exit_reasons as ER
from devirt_emu.vmx.fields import VmcsField as F

EXCEPTION_NMI, TRIPLE_FAULT, INVALID_STATE, MTF_EXIT, PREEMPTION_TIMER_EXIT = 0, 2, 33, 37, 52
GP = 13
HW_EXCEPTION = 3 << 8
VALID, DELIVER_CODE = 1 << 31, 1 << 11
PIN, PROC = "PIN_BASED_VM_EXEC_CONTROL", "CPU_BASED_VM_EXEC_CONTROL"
PREEMPTION_TIMER = 1 << 6
MONITOR_TRAP_FLAG = 1 << 27
HLT_EXITING = 1 << 7
SAVE_TIMER, HOST_64 = 1 << 22, 1 << 9
ACTIVE, HLT, SHUTDOWN, WAIT_SIPI = 0, 1, 2, 3
RATE = 5                               # IA32_VMX_MISC[4:0] of every modelled part
NOT_CANONICAL_BUT_ENTERS = 0x0000_8000_0000_0000


# ---------------------------------------------------------------- guest RIP
def test_rip_with_bit_47_set_enters_and_the_fetch_faults_gp0():
    r = run_case("nop", vmcs={"GUEST_RIP": NOT_CANONICAL_BUT_ENTERS, "EXCEPTION_BITMAP": 1 << GP})
    assert r.entry_failure is None
    assert r.exit is not None and r.exit.reason == EXCEPTION_NMI
    assert r.exit.interruption_info == VALID | DELIVER_CODE | HW_EXCEPTION | GP
    assert r.exit.error_code == 0
    assert r.vmcs["GUEST_RIP"] == NOT_CANONICAL_BUT_ENTERS      # a fault: RIP of the fetch
    assert r.steps == 0


def test_rip_fetch_fault_is_delivered_through_the_guest_idt():
    # the fresh case's IDT gates are all invalid: #GP, #DF, then a triple fault
    r = run_case("nop", vmcs={"GUEST_RIP": NOT_CANONICAL_BUT_ENTERS})
    assert r.exit is not None and r.exit.reason == TRIPLE_FAULT


def test_the_checks_after_guest_rip_are_reached():
    r = run_case("nop", vmcs={"GUEST_RIP": NOT_CANONICAL_BUT_ENTERS, "VMCS_LINK_POINTER": 0x1000})
    f = r.entry_failure
    assert f is not None and f.basic_reason == INVALID_STATE
    assert f.qualification == 4                                   # ENTRY_FAIL_VMCS_LINK_PTR


@pytest.mark.parametrize("rip", [0xFFFE_8000_0000_0000, 0x0001_0000_0000_0000, 1 << 63])
def test_rip_whose_bits_63_48_differ_fails_the_entry(rip):
    f = run_case("nop", vmcs={"GUEST_RIP": rip}).entry_failure
    assert f is not None and f.basic_reason == INVALID_STATE and f.qualification == 0
    assert f.field == "GUEST_RIP"


# ---------------------------------------------------------------- preemption timer, MTF: case API
def timer_case(activity, value=10, cpu=None):
    runner = CaseRunner(cpu=cpu) if cpu else None
    fields = {PIN: PREEMPTION_TIMER, "VMX_PREEMPTION_TIMER_VALUE": value,
              "VM_EXIT_CONTROLS": SAVE_TIMER | HOST_64, "GUEST_ACTIVITY_STATE": activity}
    if runner is None:
        return run_case("nop", vmcs=fields, legal=True)
    core = runner.core
    t0 = core.now()
    r = runner.run("nop", vmcs=fields, legal=True)
    return r, core.now() - t0


@pytest.mark.parametrize("activity", [HLT, SHUTDOWN])
def test_preemption_timer_counts_in_hlt_and_shutdown_and_wakes_with_exit_52(activity):
    r, elapsed = timer_case(activity, cpu="skylake-server")
    assert r.exit is not None and r.exit.reason == PREEMPTION_TIMER_EXIT, str(r)
    assert r.steps == 0                                  # nothing ran: the core was inactive
    assert elapsed >= 10 << RATE                         # 10 ticks of TSC / 2^5
    assert r.vmcs["VMX_PREEMPTION_TIMER_VALUE"] == 0
    assert r.vmcs["GUEST_ACTIVITY_STATE"] == activity    # saved: the state it woke from


def test_preemption_timer_does_not_wake_wait_for_sipi():
    r = timer_case(WAIT_SIPI)
    assert r.exit is None and r.entry_failure is None


def test_hlt_executed_in_the_guest_is_woken_by_the_timer():
    r = run_case("hlt", vmcs={PIN: PREEMPTION_TIMER, "VMX_PREEMPTION_TIMER_VALUE": 4}, legal=True)
    assert r.exit is not None and r.exit.reason == PREEMPTION_TIMER_EXIT
    assert r.vmcs["GUEST_ACTIVITY_STATE"] == HLT
    assert r.vmcs["GUEST_RIP"] == CODE_BASE + 1         # past the HLT (1 byte)


@pytest.mark.parametrize("activity", [HLT, SHUTDOWN])
def test_mtf_after_entry_to_hlt_or_shutdown_wakes_with_exit_37(activity):
    r = run_case("nop", vmcs={PROC: MONITOR_TRAP_FLAG, "GUEST_ACTIVITY_STATE": activity},
                 legal=True)
    assert r.exit is not None and r.exit.reason == MTF_EXIT, str(r)
    assert r.steps == 0


def test_without_a_wake_event_hlt_and_shutdown_stay_inactive():
    assert run_case("nop", vmcs={"GUEST_ACTIVITY_STATE": HLT}).exit is None
    assert run_case("nop", vmcs={"GUEST_ACTIVITY_STATE": SHUTDOWN}).exit is None


# ---------------------------------------------------------------- in the machine
def _machine(source: str) -> Machine:
    code, _ = assemble(source, CODE_BASE, "wake")
    m = Machine(cores=1, arch="vmx", config="stock", max_ns=10**8)
    LM.write_environment(m)
    m.write_phys(CODE_BASE, code)
    LM.enter(m.cores[0], CODE_BASE)
    m.l0.attach()
    return m


def _run(m: Machine) -> Machine:
    m.l0.launch()
    m.boot(prepared=True)
    m.run()
    return m


def test_in_the_machine_a_shutdown_guest_is_woken_by_the_preemption_timer():
    """The L0 puts its guest into the shutdown state with the timer armed; the
    timer's exit wakes it, the L0 makes it active again and it finishes."""
    seen = []
    m = _machine("cpuid\nmov al, 0\nout 0xf4, al")
    l0_cpuid = m.l0.handlers[ER.CPUID]

    def cpuid(vcpu):
        l0_cpuid(vcpu)                                   # emulates, skips the CPUID
        v = vcpu.vmcs
        v.set(F.GUEST_ACTIVITY_STATE, SHUTDOWN)
        v.set(F.VMX_PREEMPTION_TIMER_VALUE, 8)
        v.set(F.PIN_BASED_VM_EXEC_CONTROL, v.get(F.PIN_BASED_VM_EXEC_CONTROL) | PREEMPTION_TIMER)
        seen.append(("shutdown at", vcpu.core.now()))

    def timer(vcpu):
        v = vcpu.vmcs
        seen.append(("timer", vcpu.core.now(), v.get(F.GUEST_ACTIVITY_STATE)))
        v.set(F.GUEST_ACTIVITY_STATE, ACTIVE)
        v.set(F.PIN_BASED_VM_EXEC_CONTROL, v.get(F.PIN_BASED_VM_EXEC_CONTROL) & ~PREEMPTION_TIMER)

    m.l0.handlers[ER.CPUID] = cpuid
    m.l0.handlers[ER.PREEMPTION_TIMER] = timer
    _run(m)
    assert m.verdict == "pass", m.message
    assert [s[0] for s in seen] == ["shutdown at", "timer"]
    assert seen[1][2] == SHUTDOWN
    assert seen[1][1] - seen[0][1] >= 8 << RATE


def test_in_the_machine_a_halted_guest_is_woken_by_the_preemption_timer():
    seen = []
    m = _machine("cli\nhlt\nmov al, 0\nout 0xf4, al")
    v = m.l0.vcpus[0].vmcs
    v.set(F.CPU_BASED_VM_EXEC_CONTROL, v.get(F.CPU_BASED_VM_EXEC_CONTROL) & ~HLT_EXITING)
    v.set(F.PIN_BASED_VM_EXEC_CONTROL, v.get(F.PIN_BASED_VM_EXEC_CONTROL) | PREEMPTION_TIMER)
    v.set(F.VMX_PREEMPTION_TIMER_VALUE, 100)

    def timer(vcpu):
        v = vcpu.vmcs
        seen.append(v.get(F.GUEST_ACTIVITY_STATE))
        v.set(F.GUEST_ACTIVITY_STATE, ACTIVE)
        v.set(F.PIN_BASED_VM_EXEC_CONTROL, v.get(F.PIN_BASED_VM_EXEC_CONTROL) & ~PREEMPTION_TIMER)

    m.l0.handlers[ER.PREEMPTION_TIMER] = timer
    _run(m)
    assert m.verdict == "pass", m.message
    assert seen == [HLT]
