"""APIC virtualization on a running vCPU, through the case API: the SDM's steps
where the SDM places them (Intel SDM Vol. 3C, "APIC Virtualization and Virtual
Interrupts"; expectations written here as literals):

* VM entry with virtual-interrupt delivery (VID) performs PPR virtualization
  and evaluates pending virtual interrupts: one is recognized when
  "interrupt-window exiting" is 0 and RVI[7:4] > VPPR[7:4].
* A recognized virtual interrupt is delivered on an instruction boundary when
  RFLAGS.IF = 1 and there is no blocking by STI or MOV SS: VISR[RVI] and SVI
  set, VPPR = vector & F0H, VIRR[vector] cleared, RVI = the next highest
  VIRR vector; then the vector goes through the IDT, with no VM exit.
* With "virtualize x2APIC mode", a non-exiting WRMSR of EOI (80BH) with VID
  is EOI virtualization (#GP(0) for a nonzero value): VISR[SVI] cleared, SVI
  the next highest VISR vector, PPR virtualization, then an EOI-induced exit
  (reason 45, qualification = the vector, trap-like) if the vector's
  EOI-exit-bitmap bit is 1; SELF IPI (83FH) is self-IPI virtualization (a
  vector below 16: APIC-write exit, reason 56, qualification 3F0H); RDMSR
  with APIC-register virtualization reads the virtual-APIC page; TPR (808H)
  with bits 63:8 set is #GP(0).
* Posted-interrupt processing: an external interrupt whose vector is the
  notification vector, under "process posted interrupts", causes no exit: ON
  is cleared, the local APIC's EOI register is written with 0, PIR is ORed
  into VIRR and cleared, RVI = max(RVI, highest PIR vector), and pending
  virtual interrupts are evaluated.  Any other vector is an external-interrupt
  exit (reason 1).
* A write of the APIC-access page that is virtualized goes to the virtual-APIC
  page; APIC-write emulation then causes an APIC-write exit (reason 56,
  trap-like, qualification = the page offset) for an offset without its own
  emulation (an LVT entry); a read of an offset APIC-register virtualization
  does not list (current count, 390H) is an APIC-access exit (reason 44).
"""
import pytest

from devirt_emu.testing.vmx_case import CODE_BASE, CaseRunner

from case_asserts import assert_exit

PIN, PROC, PROC2 = "PIN_BASED_VM_EXEC_CONTROL", "CPU_BASED_VM_EXEC_CONTROL", \
    "SECONDARY_VM_EXEC_CONTROL"
EXT_INTR_EXITING, POSTED = 1 << 0, 1 << 7
INTR_WINDOW, TPR_SHADOW, MSR_BITMAPS, SECONDARY = 1 << 2, 1 << 21, 1 << 28, 1 << 31
S_APIC_ACCESSES, S_X2APIC, S_APICRV, S_VID = 1 << 0, 1 << 4, 1 << 8, 1 << 9
ACK_INTR_ON_EXIT, HOST_64 = 1 << 15, 1 << 9
CPUID, EXTERNAL_INTERRUPT, EXCEPTION = 10, 1, 0
INTERRUPT_WINDOW, APIC_ACCESS, EOI_INDUCED, APIC_WRITE = 7, 44, 45, 56

VAPIC, PID, APIC_PAGE = 0x600000, 0x601000, 0x500000
IDT_BASE = 0x12000
STACK = 0x9F000


@pytest.fixture(scope="module")
def runner():
    return CaseRunner()


def gate(handler):
    """A 64-bit interrupt gate (SDM "64-Bit IDT Gate Descriptors"): selector 08H, type 0EH, P."""
    lo = (handler & 0xFFFF) | 0x08 << 16 | 0xE << 40 | 1 << 47 | ((handler >> 16) & 0xFFFF) << 48
    return (lo | (handler >> 32) << 64).to_bytes(16, "little")


def reg32(value):
    return (value & 0xFFFFFFFF).to_bytes(4, "little")


def fields(*, sec=S_VID | S_X2APIC, pin=EXT_INTR_EXITING, proc=0, status=0, **more):
    f = {PIN: pin, PROC: TPR_SHADOW | SECONDARY | MSR_BITMAPS | proc, PROC2: sec,
         "VIRTUAL_APIC_PAGE_ADDR": VAPIC, "TPR_THRESHOLD": 0, "VM_EXIT_CONTROLS": HOST_64
         | ACK_INTR_ON_EXIT}
    if sec & S_VID:
        f["GUEST_INTR_STATUS"] = status
    if sec & S_APIC_ACCESSES:
        f["APIC_ACCESS_ADDR"] = APIC_PAGE
    f.update(more)
    return f


def run(runner, code, vmcs, *, handlers=(), memory=None, rflags=0x2, **kw):
    """Assemble once for the labels, then run with IDT gates for ``handlers``
    (vector -> label) and the virtual-APIC page contents in ``memory``."""
    sym = runner.run(code, vmcs={}, max_steps=1).symbols
    mem = {IDT_BASE + 16 * vec: gate(sym[label]) for vec, label in dict(handlers).items()}
    vapic = bytearray(4096)             # a fresh virtual-APIC page every case
    for addr, data in (memory or {}).items():
        if VAPIC <= addr < VAPIC + 4096:
            vapic[addr - VAPIC:addr - VAPIC + len(data)] = data
        else:
            mem[addr] = data
    mem[VAPIC] = bytes(vapic)
    r = runner.run(code, vmcs=vmcs, legal=True, memory=mem, regs={"rflags": rflags}, **kw)
    return r, sym


def page(runner, offset, n=4):
    return int.from_bytes(runner.machine.mem.read(VAPIC + offset, n), "little")


def vector_set(runner, base):
    return {32 * n + b for n in range(8) for b in range(32)
            if page(runner, base + 0x10 * n) >> b & 1}


# ---------------------------------------------------------------- delivery at VM entry
HANDLER = "nop\nnop\nnop\ncpuid\nhandler: cpuid"


def test_pending_virtual_interrupt_is_delivered_after_entry_without_exit(runner):
    r, sym = run(runner, HANDLER, fields(status=0x0050), handlers={0x50: "handler"},
                 memory={VAPIC + 0x200 + 0x10 * 2: reg32(1 << 0x10)},   # VIRR[50H]
                 rflags=0x202)
    e = assert_exit(r, CPUID, 0, sym["handler"])        # through the IDT, no exit before
    assert r.steps == 0                                 # delivered before the first instruction
    assert vector_set(runner, 0x100) == {0x50}          # VISR[50H]
    assert vector_set(runner, 0x200) == set()           # VIRR[50H] cleared
    assert page(runner, 0xA0) == 0x50                   # VPPR = 50H & F0H
    assert r.vmcs["GUEST_INTR_STATUS"] == 0x5000        # SVI = 50H, RVI = 0
    assert e.regs["rsp"] == STACK - 5 * 8               # an interrupt frame, no error code


def test_rvi_next_highest_after_delivery(runner):
    r, sym = run(runner, HANDLER, fields(status=0x0071), handlers={0x71: "handler"},
                 memory={VAPIC + 0x230: reg32(1 << 0x11 | 1 << 0x02)},  # VIRR[71H], VIRR[62H]
                 rflags=0x202)
    assert_exit(r, CPUID, 0, sym["handler"])
    assert r.vmcs["GUEST_INTR_STATUS"] == 0x7162       # SVI = 71H, RVI = 62H


def test_not_delivered_with_if_clear(runner):
    r, _ = run(runner, HANDLER, fields(status=0x0050), handlers={0x50: "handler"},
               memory={VAPIC + 0x220: reg32(1 << 0x10)}, rflags=0x2)
    assert_exit(r, CPUID, 0, CODE_BASE + 3)
    assert vector_set(runner, 0x200) == {0x50} and r.vmcs["GUEST_INTR_STATUS"] == 0x0050


def test_vtpr_masks_the_same_class(runner):
    # VTPR 50H: VPPR = 50H; RVI 5FH has class 5, not above: not recognized
    r, _ = run(runner, HANDLER, fields(status=0x005F), handlers={0x5F: "handler"},
               memory={VAPIC + 0x80: reg32(0x50), VAPIC + 0x220: reg32(1 << 0x1F)},
               rflags=0x202)
    assert_exit(r, CPUID, 0, CODE_BASE + 3)
    assert page(runner, 0xA0) == 0x50                   # PPR virtualization at VM entry


def test_interrupt_window_exiting_blocks_recognition(runner):
    r, _ = run(runner, HANDLER, fields(status=0x0050, proc=INTR_WINDOW),
               handlers={0x50: "handler"}, memory={VAPIC + 0x220: reg32(1 << 0x10)},
               rflags=0x202)
    assert_exit(r, INTERRUPT_WINDOW, 0, CODE_BASE)      # the window exit, not the delivery
    assert vector_set(runner, 0x100) == set()


def test_sti_shadow_then_delivery(runner):
    code = "sti\nnop\nafter: nop\ncpuid\nhandler: cpuid"
    r, sym = run(runner, code, fields(status=0x0050), handlers={0x50: "handler"},
                 memory={VAPIC + 0x220: reg32(1 << 0x10)}, rflags=0x2)
    e = assert_exit(r, CPUID, 0, sym["handler"])
    # delivered after the instruction in the STI shadow: the frame returns to `after`
    frame = int.from_bytes(runner.machine.mem.read(e.regs["rsp"], 8), "little")
    assert frame == sym["after"]


def test_mov_to_cr8_lowering_vtpr_delivers(runner):
    # VTPR 60H masks RVI 50H; MOV CR8 <- 0 (TPR virtualization with VID: PPR
    # virtualization and evaluation) makes it deliverable at the next boundary
    code = "xor eax, eax\nmov cr8, rax\nafter: nop\ncpuid\nhandler: cpuid"
    r, sym = run(runner, code, fields(status=0x0050), handlers={0x50: "handler"},
                 memory={VAPIC + 0x80: reg32(0x60), VAPIC + 0x220: reg32(1 << 0x10)},
                 rflags=0x202)
    e = assert_exit(r, CPUID, 0, sym["handler"])
    assert int.from_bytes(runner.machine.mem.read(e.regs["rsp"], 8), "little") == sym["after"]


# ---------------------------------------------------------------- x2APIC virtualization
def wrmsr(msr, value):
    return f"mov ecx, {msr:#x}\nmov eax, {value & 0xFFFFFFFF:#x}\nmov edx, {value >> 32:#x}\nwrmsr\n"


def test_x2apic_eoi_virtualization(runner):
    code = wrmsr(0x80B, 0) + "done: cpuid"
    r, sym = run(runner, code, fields(status=0x5000),
                 memory={VAPIC + 0x120: reg32(1 << 0x10 | 1 << 0x01)})   # VISR[50H], [41H]
    assert_exit(r, CPUID, 0, sym["done"])
    assert vector_set(runner, 0x100) == {0x41}          # VISR[SVI] cleared
    assert r.vmcs["GUEST_INTR_STATUS"] == 0x4100        # SVI = next highest
    assert page(runner, 0xA0) == 0x40                   # PPR virtualization


def test_x2apic_eoi_with_the_exit_bitmap_bit_is_eoi_induced(runner):
    code = wrmsr(0x80B, 0) + "done: cpuid"
    r, sym = run(runner, code, fields(status=0x5000, EOI_EXIT_BITMAP1=1 << (0x50 - 64)),
                 memory={VAPIC + 0x120: reg32(1 << 0x10)})
    e = assert_exit(r, EOI_INDUCED, 0x50, sym["done"])  # trap-like: after the WRMSR
    assert e.instruction_length is None
    assert r.vmcs["GUEST_INTR_STATUS"] == 0             # the virtual EOI happened first


def test_x2apic_eoi_nonzero_is_gp(runner):
    r, _ = run(runner, wrmsr(0x80B, 1) + "cpuid", fields(status=0x5000, EXCEPTION_BITMAP=1 << 13))
    e = assert_exit(r, EXCEPTION, 0, CODE_BASE + 15)
    assert e.interruption_info & 0xFF == 13 and e.error_code == 0


def test_x2apic_tpr_reserved_bits_gp_and_write(runner):
    r, _ = run(runner, wrmsr(0x808, 0x100) + "cpuid", fields(EXCEPTION_BITMAP=1 << 13))
    assert r.exit.reason == EXCEPTION and r.exit.interruption_info & 0xFF == 13
    r, sym = run(runner, wrmsr(0x808, 0x35) + "done: cpuid", fields())
    assert_exit(r, CPUID, 0, sym["done"])
    assert page(runner, 0x80) == 0x35


def test_x2apic_self_ipi_virtualization(runner):
    code = wrmsr(0x83F, 0x66) + "after: nop\ncpuid\nhandler: cpuid"
    r, sym = run(runner, code, fields(), handlers={0x66: "handler"}, rflags=0x202)
    e = assert_exit(r, CPUID, 0, sym["handler"])        # VIRR, RVI, evaluation, delivery
    assert int.from_bytes(runner.machine.mem.read(e.regs["rsp"], 8), "little") == sym["after"]
    assert vector_set(runner, 0x100) == {0x66}


def test_x2apic_self_ipi_below_16_is_an_apic_write_exit(runner):
    code = wrmsr(0x83F, 0x0E) + "done: cpuid"
    r, sym = run(runner, code, fields())
    assert_exit(r, APIC_WRITE, 0x3F0, sym["done"])
    assert page(runner, 0x3F0) == 0x0E


def test_x2apic_reads_with_apic_register_virtualization(runner):
    code = "mov ecx, 0x802\nrdmsr\nmov ebx, eax\nmov ecx, 0x830\nrdmsr\ncpuid"
    r, _ = run(runner, code, fields(sec=S_VID | S_X2APIC | S_APICRV),
               memory={VAPIC + 0x20: reg32(7), VAPIC + 0x300: reg32(0x4_00FD),
                       VAPIC + 0x310: reg32(3)})
    assert r.exit.reason == CPUID
    assert r.exit.regs["rbx"] == 7                      # APIC ID from the page
    assert r.exit.regs["rax"] == 0x4_00FD and r.exit.regs["rdx"] == 3   # ICR, 64 bits


# ---------------------------------------------------------------- posted interrupts
def posted_fields(**more):
    return fields(pin=EXT_INTR_EXITING | POSTED, POSTED_INTR_NV=0xF2, POSTED_INTR_DESC_ADDR=PID,
                  **more)


# IA32_APIC_BASE: EN | EXTD (x2APIC mode); SVR: APIC software-enabled (not virtualized: the
# MSR bitmap intercepts nothing and "virtualize x2APIC mode" leaves 80FH writes alone)
X2APIC_ON = "mov ecx, 0x1b\nrdmsr\nor eax, 0xc00\nwrmsr\n" + \
    "mov ecx, 0x80f\nmov eax, 0x1ff\nxor edx, edx\nwrmsr\n"


def test_posted_interrupt_processing_without_exit(runner):
    # the guest sends itself the notification vector on the physical x2APIC (ICR
    # writes are not virtualized); the descriptor requests 70H and 31H
    code = X2APIC_ON + wrmsr(0x830, 0x4_00F2) + "after: nop\ncpuid\nhandler: cpuid"
    desc = (1 << 0x70 | 1 << 0x31).to_bytes(32, "little") + bytes([0b11]) + bytes(31)  # ON, SN
    r, sym = run(runner, code, posted_fields(), handlers={0x70: "handler"},
                 memory={PID: desc}, rflags=0x202)
    assert_exit(r, CPUID, 0, sym["handler"])            # no exit for F2H; 70H delivered
    raw = runner.machine.mem.read(PID, 64)
    assert raw[:32] == bytes(32)                        # PIR cleared
    assert raw[32] == 0b10                              # ON cleared, SN untouched
    assert vector_set(runner, 0x200) == {0x31}          # the rest of PIR in VIRR
    assert r.vmcs["GUEST_INTR_STATUS"] == 0x7031        # SVI 70H, RVI 31H
    lapic = runner.core.lapic
    assert lapic.pending_vector() is None and lapic.rdmsr(0x810 + 0xF2 // 32) == 0   # EOI'd


def test_other_vector_is_an_external_interrupt_exit(runner):
    code = X2APIC_ON + wrmsr(0x830, 0x4_00E5) + "cpuid"
    r, _ = run(runner, code, posted_fields(), memory={PID: bytes(64)}, rflags=0x202)
    assert r.exit.reason == EXTERNAL_INTERRUPT
    assert r.exit.interruption_info == 0x8000_00E5      # valid, external interrupt, E5H


# ---------------------------------------------------------------- the APIC-access page
def test_mmio_lvt_write_is_an_apic_write_exit(runner):
    code = f"mov dword ptr [{APIC_PAGE + 0x320:#x}], 0x100ec\ndone: cpuid"
    r, sym = run(runner, code, fields(sec=S_APIC_ACCESSES | S_APICRV | S_VID))
    assert_exit(r, APIC_WRITE, 0x320, sym["done"])      # trap-like: after the MOV
    assert page(runner, 0x320) == 0x100EC               # the write went to the page


def test_mmio_read_virtualized_and_not(runner):
    code = f"mov eax, dword ptr [{APIC_PAGE + 0x20:#x}]\nmov ebx, eax\n" \
           f"at: mov eax, dword ptr [{APIC_PAGE + 0x390:#x}]\ncpuid"
    r, sym = run(runner, code, fields(sec=S_APIC_ACCESSES | S_APICRV | S_VID),
                 memory={VAPIC + 0x20: reg32(0x0300_0000)})
    e = assert_exit(r, APIC_ACCESS, 0x390, sym["at"])   # current count: fault-like, type 0
    assert e.regs["rbx"] == 0x0300_0000                 # the ID read from the virtual page


def test_mmio_eoi_with_vid(runner):
    code = f"mov dword ptr [{APIC_PAGE + 0xB0:#x}], 0\ndone: cpuid"
    r, sym = run(runner, code, fields(sec=S_APIC_ACCESSES | S_VID, status=0x5000,
                                      EOI_EXIT_BITMAP1=1 << (0x50 - 64)),
                 memory={VAPIC + 0x120: reg32(1 << 0x10)})
    assert_exit(r, EOI_INDUCED, 0x50, sym["done"])
    assert vector_set(runner, 0x100) == set()


def test_virtual_interrupt_wakes_hlt(runner):
    # a self-IPI virtualized with IF = 0 stays pending; STI; HLT (in the STI shadow)
    # halts, then the recognized virtual interrupt wakes the core and is delivered:
    # the frame returns past the HLT
    code = wrmsr(0x83F, 0x66) + "sti\nhlt\nafter: nop\ncpuid\nhandler: cpuid"
    r, sym = run(runner, code, fields(), handlers={0x66: "handler"}, rflags=0x2)
    e = assert_exit(r, CPUID, 0, sym["handler"])
    assert int.from_bytes(runner.machine.mem.read(e.regs["rsp"], 8), "little") == sym["after"]
