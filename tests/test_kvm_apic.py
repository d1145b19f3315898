"""The L0's local APIC under ``stock`` and ``devirt``: TPR shadow and flexpriority
as KVM sets them, and its handlers for APIC-access and TPR-below-threshold exits.

Expectations are written here as literals from these sources:

* KVM (Linux 5.4, ``arch/x86/kvm/vmx/vmx.c``, ``x86.c``) with an in-kernel
  LAPIC and APICv off, on a CPU with "use TPR shadow" and "virtualize APIC
  accesses": ``vmx_exec_control`` keeps "use TPR shadow" (primary bit 21) and
  leaves CR8-load/store exiting (bits 19, 20) off; the secondary controls keep
  "virtualize APIC accesses" (bit 0) while the guest's APIC is in xAPIC mode
  (``vmx_set_virtual_apic_mode``: cleared in x2APIC mode); the APIC-access
  page is at guest-physical 0xFEE00000; ``update_cr8_intercept`` sets
  TPR_THRESHOLD to the highest pending vector's priority class when
  TPR[7:4] >= that class, else 0.
* The SDM (vol. 3A "Task Priority in IA-32e Mode", "Interrupt, Task, and
  Processor Priority"; vol. 3C "APIC Virtualization and Virtual Interrupts"):
  CR8[3:0] is TPR[7:4] and MOV to CR8 clears TPR[3:0]; an interrupt is taken
  only when its priority class (vector[7:4]) is above PPR[7:4], PPR being TPR
  when TPR[7:4] >= ISRV[7:4], else ISRV[7:4] << 4; exit reason 44 APIC
  access (qualification bits 11:0 the page offset, 15:12 the access type: 0
  linear read, 1 linear write, 2 linear fetch) and reason 43 TPR below
  threshold (trap-like: RIP after the instruction, qualification 0).
* DESIGN.md, "What KVM-devirt is": while a BM runs, the host holds the
  physical TPR at 0xB0 (below the guest's vectors 0xC1-0xFF); the x2APIC ICR
  and EOI MSRs are passed through.
* The platform's local APIC model (``platform/lapic.py``): version register
  0x01060014, SVR 0xFF after the APIC is disabled.

The guests are self-checking: each ``cmp`` is one of the expectations above.
"""
from __future__ import annotations

import pytest

from devirt_emu.asm import build_image
from devirt_emu.hypervisor.configs import DEVIRT, STOCK
from devirt_emu.hypervisor.kvm import tpr_threshold
from devirt_emu.machine import Machine
from devirt_emu.vmx.fields import VmcsField as F


CR8_LOAD_EXITING, CR8_STORE_EXITING, TPR_SHADOW = 1 << 19, 1 << 20, 1 << 21
VIRTUALIZE_APIC_ACCESSES = 1 << 0
APIC_ACCESS, TPR_BELOW_THRESHOLD, CR_ACCESS = 44, 43, 28
READ, WRITE, FETCH = 0x0000, 0x1000, 0x2000
HOST_AREA = 4 << 20                       # the L0's share at the top of RAM (kvm.py)


def run_guest(tmp_path, source: str, config: str | None, cores: int = 1):
    path = tmp_path / "guest.S"
    path.write_text(source)
    image = build_image(path)
    m = Machine(cores=cores, arch="vmx" if config else "none", config=config, wall_timeout_s=60)
    m.load_image(image)
    return m.run(), image.symbols, m


def exits_named(res, name):
    return [e for e in res.exits if e["name"] == name]


# ---------------------------------------------------------------------------- TPR_THRESHOLD
@pytest.mark.parametrize("tpr, max_irr, expected", [
    (0x00, None, 0), (0xF0, None, 0),      # nothing pending: never exit
    (0xF0, 0xE3, 0xE),                     # class E masked by TPR class F: exit below E
    (0xE7, 0xE3, 0xE),                     # equal classes mask too
    (0xD0, 0xE3, 0),                       # not masked by the TPR: injectable (or ISR-blocked)
    (0x20, 0x20, 0x2), (0x10, 0x20, 0),
])
def test_tpr_threshold_is_kvms_update_cr8_intercept(tpr, max_irr, expected):
    assert tpr_threshold(tpr, max_irr) == expected


# ---------------------------------------------------------------------------- the control sets
@pytest.mark.parametrize("cfg", [STOCK, DEVIRT])
def test_both_sets_have_the_tpr_shadow_and_flexpriority_and_no_cr8_exiting(cfg):
    assert cfg.primary & TPR_SHADOW
    assert not cfg.primary & (CR8_LOAD_EXITING | CR8_STORE_EXITING)
    assert cfg.secondary & VIRTUALIZE_APIC_ACCESSES


HELLO = """
.text
guest_main:
    xor eax, eax
    ret
"""


@pytest.mark.parametrize("config", ["stock", "devirt"])
def test_the_vmcs_kvm_builds(tmp_path, config):
    path = tmp_path / "hello.S"
    path.write_text(HELLO)
    m = Machine(cores=2, arch="vmx", config=config)
    m.load_image(build_image(path))
    m.l0.attach()
    pages = set()
    for vcpu in m.l0.vcpus:
        v = vcpu.vmcs
        vapic = v.get(F.VIRTUAL_APIC_PAGE_ADDR)
        assert vapic % 4096 == 0 and m.mem.size - HOST_AREA <= vapic < m.mem.size
        pages.add(vapic)
        assert v.get(F.APIC_ACCESS_ADDR) == 0xFEE00000
        assert v.get(F.TPR_THRESHOLD) == 0
        # the APIC starts in xAPIC mode (RESET): APIC accesses are virtualized
        assert v.get(F.SECONDARY_VM_EXEC_CONTROL) & VIRTUALIZE_APIC_ACCESSES
    assert len(pages) == 2                   # one virtual-APIC page per vCPU

    res = Machine(cores=2, arch="vmx", config=config)
    res.load_image(build_image(path))
    assert res.run().verdict == "pass"
    for vcpu in res.l0.vcpus:
        v = vcpu.vmcs
        # the firmware put the APIC in x2APIC mode: KVM clears "virtualize APIC accesses"
        assert not v.get(F.SECONDARY_VM_EXEC_CONTROL) & VIRTUALIZE_APIC_ACCESSES
        assert v.get(F.CPU_BASED_VM_EXEC_CONTROL) & TPR_SHADOW
        assert not v.get(F.CPU_BASED_VM_EXEC_CONTROL) & (CR8_LOAD_EXITING | CR8_STORE_EXITING)


# ---------------------------------------------------------------------------- CR8 and the x2APIC TPR
TV = 0xE3            # the test vector: priority class 0xE

# labels fail_1 .. fail_3: print msg_<i> and fail with code i (firmware/lib.S fail_msg)
FAIL_1_TO_3 = "".join(f"fail_{i}:\n    mov rdi, msg_{i}\n    mov esi, {i}\n    call fail_msg\n"
                      for i in (1, 2, 3))

CR8_GUEST = f"""
.set TV, {TV:#x}
.text
guest_main:
    push rbx
    mov rdi, msg_start
    call print
    # MOV to CR8 writes TPR[7:4] and clears TPR[3:0]
    mov eax, 5
    mov cr8, rax
    mov rbx, cr8
    cmp rbx, 5
    jne fail_1
    mov ecx, 0x808
    rdmsr
    cmp eax, 0x50
    jne fail_1
    # an x2APIC TPR write is what CR8 reads
    mov ecx, 0x808
    mov eax, 0x73
    xor edx, edx
    wrmsr
    mov rbx, cr8
    cmp rbx, 7
    jne fail_2
    mov ecx, 0x808
    rdmsr
    cmp eax, 0x73
    jne fail_2
    # a class-E interrupt waits while TPR[7:4] >= 0xE and is taken when CR8 drops to 0xD
    mov edi, TV
    mov rsi, handler
    call set_handler
    mov eax, 15
    mov cr8, rax
    sti
    xor edi, edi
    mov esi, TV
    call send_ipi
    nop
    cmp qword ptr [count], 0
    jne fail_3
    mov eax, 14
    mov cr8, rax
    nop
    cmp qword ptr [count], 0
    jne fail_3
    mov eax, 13
    mov cr8, rax
after_cr8_d:
    cmp qword ptr [count], 1
    jne fail_3
    cli
    xor eax, eax
    mov cr8, rax
    mov rdi, msg_ok
    call print
    xor eax, eax
    pop rbx
    ret

handler:
    inc qword ptr [count]
    jmp eoi

{FAIL_1_TO_3}
.rodata
msg_start: .asciz "cr8: start\\n"
msg_ok:    .asciz "cr8: ok\\n"
msg_1:     .asciz "cr8: a CR8 write is not the TPR\\n"
msg_2:     .asciz "cr8: an x2APIC TPR write is not what CR8 reads\\n"
msg_3:     .asciz "cr8: the interrupt was not held back by the TPR, or not taken when it dropped\\n"
.data
count: .quad 0
"""


def test_cr8_and_the_x2apic_tpr_under_stock_as_natively(tmp_path):
    native, _, _ = run_guest(tmp_path, CR8_GUEST, None)
    res, syms, _ = run_guest(tmp_path, CR8_GUEST, "stock")
    assert native.verdict == res.verdict == "pass", (res.message, res.serial)
    assert res.serial == native.serial == "cr8: start\ncr8: ok\nPASS\n"
    # no CR8 access exits (TPR shadow, no CR8-load/store exiting); the x2APIC TPR MSR exits
    assert not [e for e in exits_named(res, "CR_ACCESS") if e["qualification"] & 0xF == 8]
    assert any(e["rip"] < syms["after_cr8_d"] for e in exits_named(res, "MSR_READ"))
    # the host took the IPI while the guest's TPR masked it, then TPR_THRESHOLD = 0xE:
    # the MOV to CR8 of 0xD is followed by a trap-like TPR-below-threshold exit
    tpr_exits = exits_named(res, "TPR_BELOW_THRESHOLD")
    assert [(e["reason"], e["qualification"], e["rip"]) for e in tpr_exits] == \
        [(TPR_BELOW_THRESHOLD, 0, syms["after_cr8_d"])]
    assert exits_named(res, "EXTERNAL_INTERRUPT")


# ---------------------------------------------------------------------------- xAPIC MMIO
XAPIC_GUEST = f"""
.set TV, {TV:#x}
.set APIC_PAGE, 0xFEE00000
.text
guest_main:
    push rbx
    push r12
    # xAPIC mode: x2APIC -> disabled -> xAPIC (SDM "x2APIC State Transitions")
    mov ecx, 0x1B
    rdmsr
    mov r12d, eax
    and eax, 0xFFFFF3FF
    wrmsr
    mov eax, r12d
    and eax, 0xFFFFFBFF
    wrmsr
    mov rbx, APIC_PAGE
    # SVR (0xFF after the disable) written and read back, the version register
    mov eax, dword ptr [rbx + 0xF0]
    cmp eax, 0xFF
    jne fail_1
    mov dword ptr [rbx + 0xF0], 0x1FF
    mov eax, dword ptr [rbx + 0xF0]
    cmp eax, 0x1FF
    jne fail_1
    mov eax, dword ptr [rbx + 0x30]
    cmp eax, 0x01060014
    jne fail_1
    # a read-modify-write: the divide configuration (0 after the disable; bits 0, 1, 3)
    or dword ptr [rbx + 0x3E0], 0xB
    mov eax, dword ptr [rbx + 0x3E0]
    cmp eax, 0xB
    jne fail_1
    # the TPR through the page; CR8 and PPR agree with it
    mov dword ptr [rbx + 0x80], 0x45
    mov eax, dword ptr [rbx + 0x80]
    cmp eax, 0x45
    jne fail_2
    mov rax, cr8
    cmp rax, 4
    jne fail_2
    mov eax, dword ptr [rbx + 0xA0]
    cmp eax, 0x45
    jne fail_2
    mov eax, 2
    mov cr8, rax
    mov eax, dword ptr [rbx + 0x80]
    cmp eax, 0x20
    jne fail_2
    # a self-IPI held back by TPR 0xF0 written through the page, taken when TPR 0 is
    mov edi, TV
    mov rsi, handler
    call set_handler
    mov dword ptr [rbx + 0x80], 0xF0
    sti
    mov dword ptr [rbx + 0x310], 0
    mov dword ptr [rbx + 0x300], 0x40000 | TV
    nop
    cmp qword ptr [count], 0
    jne fail_3
    mov dword ptr [rbx + 0x80], 0
after_tpr_0:
    cmp qword ptr [count], 1
    jne fail_3
    cli
    cmp dword ptr [isr_seen], 8             # ISR bits 255:224: vector 0xE3 is bit 3
    jne fail_3
    cmp dword ptr [ppr_seen], 0xE0          # TPR 0 < ISRV class 0xE
    jne fail_3
    mov eax, dword ptr [rbx + 0x170]        # the EOI ended it
    test eax, eax
    jnz fail_3
    # back to x2APIC mode for the library
    mov ecx, 0x1B
    mov eax, r12d
    xor edx, edx
    wrmsr
    mov rdi, msg_ok
    call print
    xor eax, eax
    pop r12
    pop rbx
    ret

handler:
    inc qword ptr [count]
    mov rax, APIC_PAGE
    mov ecx, dword ptr [rax + 0x170]
    mov dword ptr [isr_seen], ecx
    mov ecx, dword ptr [rax + 0xA0]
    mov dword ptr [ppr_seen], ecx
    mov dword ptr [rax + 0xB0], 0           # EOI
    ret

{FAIL_1_TO_3}
.rodata
msg_ok: .asciz "xapic: ok\\n"
msg_1:  .asciz "xapic: register read/write through MMIO\\n"
msg_2:  .asciz "xapic: the TPR through MMIO\\n"
msg_3:  .asciz "xapic: interrupt vs TPR, or ISR/PPR/EOI through MMIO\\n"
.data
count:    .quad 0
isr_seen: .long 0
ppr_seen: .long 0
"""


def test_xapic_registers_through_the_apic_access_page_under_stock(tmp_path):
    res, syms, m = run_guest(tmp_path, XAPIC_GUEST, "stock")
    assert res.verdict == "pass", (res.message, res.serial)
    assert res.serial == "xapic: ok\nPASS\n"
    quals = [e["qualification"] for e in exits_named(res, "APIC_ACCESS")]
    assert all(e["reason"] == APIC_ACCESS for e in exits_named(res, "APIC_ACCESS"))
    # every access but those of the TPR (080H, at most 32 bits) exits, with its offset and type
    assert quals[:4] == [READ | 0x0F0, WRITE | 0x0F0, READ | 0x0F0, READ | 0x030]
    assert READ | 0x0A0 in quals and WRITE | 0x300 in quals and WRITE | 0x310 in quals
    assert READ | 0x170 in quals and WRITE | 0x0B0 in quals
    assert [q & 0xFFF for q in quals[4:6]] == [0x3E0, 0x3E0]   # the OR (one exit), the read
    assert not [q for q in quals if q & 0xFFF == 0x080]
    # (the PPR read right after a virtualized TPR read exits: platform/watch.py flushes the
    # TLB entry the TPR read left behind)
    assert quals.index(READ | 0x0A0) > 3
    # the TPR write of 0 is followed by the trap-like exit, then the interrupt
    assert [e["rip"] for e in exits_named(res, "TPR_BELOW_THRESHOLD")] == [syms["after_tpr_0"]]
    # the writes went to the core's local APIC: SVR and TDCR are what the guest wrote
    assert m.cores[0].lapic.rdmsr(0x80F) == 0x1FF
    assert m.cores[0].lapic.rdmsr(0x83E) == 0xB


def test_xapic_mode_switches_apic_access_virtualization(tmp_path):
    res, syms, m = run_guest(tmp_path, XAPIC_GUEST, "stock")
    assert res.verdict == "pass"
    # the guest ended in x2APIC mode: the page is no longer watched
    v = m.l0.vcpus[0].vmcs
    assert not v.get(F.SECONDARY_VM_EXEC_CONTROL) & VIRTUALIZE_APIC_ACCESSES
    assert m.cores[0].watched_pages() == frozenset()


FETCH_GUEST = """
.text
guest_main:
    mov ecx, 0x1B
    rdmsr
    and eax, 0xFFFFF3FF
    wrmsr
    or eax, 0x800
    wrmsr
    mov rax, 0xFEE00010
    jmp rax
"""


def test_an_instruction_fetch_from_the_apic_access_page_is_an_emulation_failure(tmp_path):
    res, _, _ = run_guest(tmp_path, FETCH_GUEST, "stock")
    assert res.verdict == "error"
    assert "instruction fetch" in res.message and "emulation failure" in res.message
    e = exits_named(res, "APIC_ACCESS")[-1]
    assert e["qualification"] == FETCH | 0x010 and e["rip"] == 0xFEE00010


# ---------------------------------------------------------------------------- devirt and CR8
DEVIRT_GUEST = f"""
.set TV, {TV:#x}
.text
guest_main:
    push rbx
    mov edi, TV
    mov rsi, handler
    call set_handler
    mov eax, 15
    mov cr8, rax
    mov rbx, cr8
    cmp rbx, 15
    jne bad
    mov ecx, 0x808
    rdmsr
    cmp eax, 0xF0
    jne bad
    sti
    xor edi, edi
    mov esi, TV
    call send_ipi
    nop
    nop
    cli
    mov rdi, msg_high
    call print
    mov rdi, qword ptr [count]
    call print_dec
    mov rdi, msg_nl
    call print
    xor eax, eax
    mov cr8, rax
    sti
    nop
    cli
    mov rdi, msg_low
    call print
    mov rdi, qword ptr [count]
    call print_dec
    mov rdi, msg_nl
    call print
    xor eax, eax
    pop rbx
    ret
bad:
    mov rdi, msg_bad
    mov esi, 1
    call fail_msg

handler:
    inc qword ptr [count]
    jmp eoi

.rodata
msg_high: .asciz "taken with CR8 = 15: "
msg_low:  .asciz "taken with CR8 = 0: "
msg_nl:   .asciz "\\n"
msg_bad:  .asciz "CR8 and the x2APIC TPR disagree\\n"
.data
count: .quad 0
"""


@pytest.mark.parametrize("config, taken_high", [(None, 0), ("stock", 0), ("devirt", 1)])
def test_under_devirt_cr8_does_not_hold_back_passed_through_interrupts(tmp_path, config,
                                                                      taken_high):
    # Natively and under stock a class-E self-IPI waits while CR8 = 15.  Under devirt the
    # MOV to CR8 writes VTPR only, the ICR write is passed through, and the physical PPR
    # has the host's TPR (KVM-devirt's 0xB0, class B < E): the interrupt is taken at once.
    res, _, _ = run_guest(tmp_path, DEVIRT_GUEST, config)
    assert res.verdict == "pass", (res.message, res.serial)
    assert res.serial == (f"taken with CR8 = 15: {taken_high}\n"
                          "taken with CR8 = 0: 1\nPASS\n")

