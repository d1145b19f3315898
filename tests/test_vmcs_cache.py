"""The current VMCS as the processor holds it (vmx/vcpu.py TrackedVmcs).

While a vCPU has been entered, the guest-state fields live in the engine and
the VMCS region is synced on access (the SDM lets a processor cache the
current VMCS; only VMCLEAR guarantees memory is up to date).  What users of
the VMCS must see regardless:

- a read of a guest-state field after a VM exit gives the guest's state at
  the exit (SDM "Saving Guest State");
- after VMCLEAR the region in memory holds it too;
- a guest-state field the L0 writes before VMRESUME is what the guest runs
  with (SDM "Loading Guest State");
- VMRESUME checks every field written since the last entry: a non-canonical
  GUEST_RIP of a 64-bit guest is a VM-entry failure with exit reason 33
  (invalid guest state) and bit 31 set; a control outside its allowed
  settings is VMfailValid with error 7 (SDM "Checks on VMX Controls",
  "Checks on Guest RIP, RFLAGS, and SSP", VM-instruction error numbers);
- a VMRESUME with nothing written still does what every VM entry does: the
  monitor trap flag causes an MTF VM exit after the next instruction, and the
  VMX-preemption timer is loaded from VMX_PREEMPTION_TIMER_VALUE (a value of
  0 exits before any instruction) (SDM "Monitor Trap Flag", "VMX-Preemption
  Timer");
- KVM's skip_emulated_instruction (``VmxVcpu.skip_instruction``) makes
  GUEST_RIP the exiting instruction's RIP plus VM_EXIT_INSTRUCTION_LEN, for
  the L0's later reads and for the guest.
"""
from __future__ import annotations

import struct

from devirt_emu.asm import assemble
from devirt_emu.machine import Machine
from devirt_emu.platform import longmode as LM
from devirt_emu.vmx import exit_reasons as ER
from devirt_emu.vmx.fields import VmcsField as F
from devirt_emu.vmx.vmcs import FIELD_SLOTS

CODE = 0x200000
STACK = 0x180000

# Two CPUID exits, then the test-exit port (an I/O exit the L0 emulates: verdict pass).
GUEST = f"""
    mov rsp, {STACK}
    mov rbx, 0x1122334455667788
    push rbx
    xor eax, eax
    cpuid
    mov r9, rsp
    xor eax, eax
    cpuid
    mov al, 0
    out 0xf4, al
"""
CPUID_0_AT = 7 + 10 + 1 + 2   # offset of the first CPUID: mov rsp (7) + mov rbx (10) + push (1) + xor (2)


def attached(source: str) -> Machine:
    """One core in 64-bit mode at CODE running ``source``, the stock L0 attached
    (its VMCS built, not yet launched)."""
    code, _ = assemble(source, CODE, "vmcs-cache")
    m = Machine(cores=1, arch="vmx", config="stock", max_ns=10**9)
    LM.write_environment(m)
    m.write_phys(CODE, code)
    LM.enter(m.cores[0], CODE)
    m.l0.attach()
    return m


def machine_with(handler):
    """One core under the stock L0 at CODE, with ``handler(vcpu)``
    in front of the L0's CPUID handler (it may return False to skip the L0's)."""
    m = attached(GUEST)
    l0_cpuid = m.l0.handlers[ER.CPUID]

    def cpuid(vcpu):
        if handler(vcpu) is not False:
            l0_cpuid(vcpu)
    m.l0.handlers[ER.CPUID] = cpuid
    return m


def run(m):
    m.l0.launch()
    m.boot(prepared=True)
    m.run()
    return m


def test_guest_state_read_at_an_exit_is_the_state_at_the_exit():
    seen = []

    def look(vcpu):
        v = vcpu.vmcs
        seen.append((v.get(F.GUEST_RIP), v.get(F.GUEST_RSP), v.vmread(F.GUEST_CS_SELECTOR),
                     v.get("GUEST_CR3"), v.peek(F.GUEST_IA32_EFER)))
    m = run(machine_with(look))
    assert m.verdict == "pass", m.message
    rip, rsp, cs, cr3, efer = seen[0]
    assert rip == CODE + CPUID_0_AT           # fault-like: RIP of the CPUID itself
    assert rsp == STACK - 8                   # after the push
    assert cs == 0x08 and cr3 == LM.PML4
    assert efer & (1 << 10) and efer & (1 << 8)   # LMA and LME of a 64-bit guest
    assert seen[1][0] == CODE + CPUID_0_AT + 2 + 3 + 2   # cpuid, mov r9 rsp, xor


def test_vmclear_writes_the_guest_state_back_to_memory():
    raw = {}

    def clear_and_read(vcpu):
        if raw:
            return
        v = vcpu.vmcs
        v.clear()
        for f in (F.GUEST_RSP, F.GUEST_RIP):
            off, st, _ = FIELD_SLOTS[f]
            raw[f] = struct.unpack_from("<Q", vcpu.mem.read(v.pa + off, 8))[0]
        v.launch_state = "launched"      # (the L0 goes on with VMRESUME, as after VMPTRLD + VMLAUNCH)
    m = run(machine_with(clear_and_read))
    assert m.verdict == "pass", m.message
    assert raw[F.GUEST_RSP] == STACK - 8
    assert raw[F.GUEST_RIP] == CODE + CPUID_0_AT


def test_a_guest_state_field_written_by_the_l0_is_loaded_at_vmresume():
    def move_stack(vcpu):
        if vcpu.vmcs.get(F.GUEST_RIP) == CODE + CPUID_0_AT:
            vcpu.vmcs.set(F.GUEST_RSP, STACK - 0x100)
    m = run(machine_with(move_stack))
    assert m.verdict == "pass", m.message
    # the guest copied RSP into R9 after the first exit
    assert m.cores[0].probe.gpr(9) == STACK - 0x100


def test_vmresume_checks_a_guest_rip_the_l0_wrote():
    def bad_rip(vcpu):
        # bits 63:48 not identical (48-bit linear addresses); 0x0000_8000_0000_0000 would pass
        # the check (bit 47 is not part of it, SDM 26.3.1.4) and fault on the fetch instead
        vcpu.vmcs.set(F.GUEST_RIP, 0xFFFE_8000_0000_0000)
        return False
    m = run(machine_with(bad_rip))
    assert m.verdict == "error"
    assert "INVALID_STATE" in m.message and "0x80000021" in m.message and "GUEST_RIP" in m.message


def test_vmresume_checks_a_control_the_l0_wrote():
    def bad_control(vcpu):
        v = vcpu.vmcs
        # bit 1 of the primary processor-based controls is a default1 bit: must be 1
        v.set(F.CPU_BASED_VM_EXEC_CONTROL, v.get(F.CPU_BASED_VM_EXEC_CONTROL) & ~0x2)
    m = run(machine_with(bad_control))
    assert m.verdict == "error"
    assert "VM entry failed" in m.message
    assert m.l0.vcpus[0].vmcs.get(F.VM_INSTRUCTION_ERROR) == 7


def test_vmresume_of_a_clear_vmcs_fails():
    def clear(vcpu):
        vcpu.vmcs.clear()            # VMCLEAR without a new VMLAUNCH
    m = run(machine_with(clear))
    assert m.verdict == "error"
    # VMfailValid, error 5: VMRESUME with non-launched VMCS
    assert m.l0.vcpus[0].vmcs.get(F.VM_INSTRUCTION_ERROR) == 5


def machine_on(source: str, handlers: dict, **controls):
    """One core under the stock L0 running ``source`` at CODE, the L0's handlers
    replaced by ``handlers`` (exit reason -> handler), control fields set by
    name before VMLAUNCH (``controls``: field name -> bits to OR in)."""
    m = attached(source)
    v = m.l0.vcpus[0].vmcs
    for name, bits in controls.items():
        v.set(F[name], v.get(F[name]) | bits)
    m.l0.handlers.update(handlers)
    return m


MTF = 1 << 27                 # CPU_BASED_MONITOR_TRAP_FLAG
PREEMPTION_TIMER = 1 << 6     # PIN_BASED_VMX_PREEMPTION_TIMER


def test_the_monitor_trap_flag_holds_across_vmresumes_with_nothing_written():
    rips = []
    m = machine_on("nop\nnop\nnop\nmov al, 0\nout 0xf4, al",
                   {ER.MONITOR_TRAP_FLAG: lambda vcpu: rips.append(vcpu.vmcs.get(F.GUEST_RIP))},
                   CPU_BASED_VM_EXEC_CONTROL=MTF)
    run(m)
    assert m.verdict == "pass", m.message
    # an MTF VM exit after each instruction: three NOPs (1 byte), MOV AL, imm8 (2 bytes)
    assert rips == [CODE + 1, CODE + 2, CODE + 3, CODE + 5]


def test_the_preemption_timer_is_loaded_at_every_vmresume():
    exits = []

    def timer(vcpu):
        exits.append(vcpu.vmcs.get(F.GUEST_RIP))
        if len(exits) == 3:       # enough: turn the timer off (a written control)
            v = vcpu.vmcs
            v.set(F.PIN_BASED_VM_EXEC_CONTROL, v.get(F.PIN_BASED_VM_EXEC_CONTROL) & ~PREEMPTION_TIMER)
    m = machine_on("mov al, 0\nout 0xf4, al", {ER.PREEMPTION_TIMER: timer},
                   PIN_BASED_VM_EXEC_CONTROL=PREEMPTION_TIMER)
    run(m)
    assert m.verdict == "pass", m.message
    # VMX_PREEMPTION_TIMER_VALUE is 0: each VM entry exits before the first instruction
    assert exits == [CODE, CODE, CODE]


def test_skip_instruction_moves_guest_rip_past_the_exiting_instruction():
    seen = []

    def skip(vcpu):
        v = vcpu.vmcs
        before = v.get(F.GUEST_RIP)            # (now a copy in the region: must not go stale)
        length = v.get(F.VM_EXIT_INSTRUCTION_LEN)
        vcpu.skip_instruction()
        seen.append((before, length, v.get(F.GUEST_RIP)))
        return False
    m = run(machine_with(skip))
    assert m.verdict == "pass", m.message
    first = CODE + CPUID_0_AT
    # CPUID is 0F A2: 2 bytes; the guest then runs MOV R9, RSP (3) and XOR EAX, EAX (2)
    assert seen == [(first, 2, first + 2), (first + 7, 2, first + 9)]


def test_skip_instruction_after_the_l0_wrote_guest_rip():
    done = []

    def rewind_then_skip(vcpu):
        v = vcpu.vmcs
        if not done:
            done.append(True)
            v.set(F.GUEST_RIP, CODE + CPUID_0_AT - 2)   # back to XOR EAX, EAX (2 bytes)
            vcpu.skip_instruction()                     # ... plus the CPUID's length: the CPUID again
            return False
    m = run(machine_with(rewind_then_skip))
    assert m.verdict == "pass", m.message
    # the CPUID ran twice more after the rewind: three CPUID exits in all
    assert m.exit_counts["CPUID"] == 3
