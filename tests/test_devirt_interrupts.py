"""KVM-devirt's interrupt path (DESIGN: "Interrupts and IPIs"; configs.py):

* its vector ranges: the firmware's interrupt vectors are in the guest ranges
  (devices C1H-EBH, system ECH-FFH: timer ECH, reschedule FDH, spurious FFH);
* interrupts KVM wants to inject into a devirtualized core become self-IPIs on
  the physical local APIC at the next VM entry (no event injection, no
  virtual ISR: the guest's passed-through EOI ends them);
* the host takes a core back with an NMI (NMI exiting stays on: an
  EXCEPTION_NMI exit) and a forced failed VM entry (reason 33, bit 31 set):
  the core runs nothing until it is given back, then the guest goes on to
  native's verdict.
"""
from __future__ import annotations

import re
from pathlib import Path

from devirt_emu.asm import build_image
from devirt_emu.hypervisor.configs import DEVIRT_GUEST_VECTORS, DEVIRT_VECTOR_RANGES
from devirt_emu.machine import Machine
from devirt_emu.vmx import controls as C
from devirt_emu.vmx.fields import VmcsField as F

ROOT = Path(__file__).resolve().parent.parent
PINGPONG = ROOT / "guest_tests" / "ipi_pingpong.S"


def test_firmware_vectors_are_in_kvm_devirts_guest_ranges():
    defs = (ROOT / "firmware" / "defs.S").read_text()
    vectors = {name: int(v, 0) for name, v in
               re.findall(r"^\.set (\w+_VECTOR),\s+(0x[0-9A-Fa-f]+)", defs, re.M)}
    lo, hi = DEVIRT_VECTOR_RANGES["guest devices"][0], DEVIRT_VECTOR_RANGES["guest system"][1]
    interrupts = {k: v for k, v in vectors.items() if v >= 0x20}
    assert interrupts                                  # the table was read
    for name, v in interrupts.items():
        assert lo <= v <= hi, name
    assert vectors["LOCAL_TIMER_VECTOR"] == DEVIRT_GUEST_VECTORS["timer"] == 0xEC
    assert vectors["RESCHEDULE_VECTOR"] == DEVIRT_GUEST_VECTORS["reschedule"] == 0xFD
    assert vectors["SPURIOUS_APIC_VECTOR"] == DEVIRT_GUEST_VECTORS["spurious"] == 0xFF


def steady_devirt_pingpong():
    m = Machine(cores=2, arch="vmx", config="devirt")
    m.load_image(build_image(PINGPONG))
    m.boot()
    m.run_until(max_instructions=60_000)
    assert m.verdict is None and m.l0.devirtualized == {0, 1}
    return m


def test_injection_into_a_devirtualized_core_is_a_self_ipi():
    m = steady_devirt_pingpong()
    vcpu = m.l0.vcpus[1]
    lapic = m.cores[1].lapic
    m.l0.virr[1].add(0xF0)              # FW_BOOT_IPI_VECTOR: its handler only EOIs
    m.l0.prepare_entry(vcpu)
    assert not m.l0.virr[1]
    assert lapic.rdmsr(0x827) >> (0xF0 - 224) & 1     # IRR[F0H] of the physical APIC
    assert not vcpu.vmcs.get(F.VM_ENTRY_INTR_INFO_FIELD) & C.INTR_INFO_VALID_MASK
    res = m.run()
    assert res.verdict == "pass", res.message
    assert not lapic.rdmsr(0x827) >> (0xF0 - 224) & 1 and lapic.rdmsr(0x817) == 0   # EOI'd
    assert res.window_exit_counts == {}              # no exit for it in the steady state


def test_taking_a_core_back_with_an_nmi_and_a_failed_entry():
    m = steady_devirt_pingpong()
    v1 = m.l0.vcpus[1]
    m.l0.take_back(v1)
    stop = m.run_until(max_instructions=20_000)
    names = [(e.core, e.name, e.entry_failure) for e in list(m.recent_exits)[-2:]]
    assert names == [(1, "EXCEPTION_NMI", False), (1, "INVALID_STATE", True)]
    last = list(m.recent_exits)[-1]
    assert last.reason == 33                          # VM-entry failure: invalid guest state
    assert v1.parked and m.l0.taken_back == {1}
    frozen = m.cores[1].icount
    # core 0 waits for the token core 1 holds: the machine stops, nothing can run
    assert stop.kind.value == "verdict" and m.verdict == "halted"
    assert m.cores[1].icount == frozen
    m.new_run()
    assert m.l0.give_back(v1)
    res = m.run()
    assert res.verdict == "pass", res.message
    assert m.cores[1].icount > frozen
    assert "1000 round trips, every core forwarded every token" in res.serial


def test_rdmsr_of_the_tsc_adds_the_tsc_offset_as_rdtsc_does():
    """SDM "Changes to Instruction Behavior in VMX Non-Root Operation": with "use TSC
    offsetting" 1 (no TSC scaling) RDTSC, RDTSCP and a non-exiting RDMSR of
    IA32_TIME_STAMP_COUNTER (10H; KVM and KVM-devirt pass its reads through) return
    the TSC plus TSC_OFFSET; without the control, the TSC itself."""
    from devirt_emu.testing.vmx_case import run_case
    code = ("rdtsc\nshl rdx, 32\nor rax, rdx\nmov rbx, rax\n"
            "mov ecx, 0x10\nrdmsr\nshl rdx, 32\nor rax, rdx\ncpuid")
    offset = 1 << 40
    for ctl, base in ((C.CPU_BASED_USE_TSC_OFFSETTING, offset), (0, 0)):
        r = run_case(code, vmcs={"CPU_BASED_VM_EXEC_CONTROL": ctl | C.CPU_BASED_USE_MSR_BITMAPS,
                                 "TSC_OFFSET": offset}, legal=True)
        rdtsc, rdmsr = r.exit.regs["rbx"], r.exit.regs["rax"]
        assert base <= rdtsc < base + 1000 and rdtsc <= rdmsr < rdtsc + 100, (hex(rdtsc), hex(rdmsr))
