"""APIC virtualization and virtual interrupts (devirt_emu/vmx/apicv.py), step by
step, with the expectations of Intel SDM Vol. 3C, "APIC Virtualization and
Virtual Interrupts" (and VT-d for the descriptor's SN/NV/NDST)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devirt_emu.vmx import apicv as A
from devirt_emu.vmx import exit_reasons as er


def page(**regs):
    p = A.BytesPage()
    for off, val in regs.items():
        p.set32(int(off[1:], 16), val)
    return p


def set_bits(p, base, *vectors):
    for v in vectors:
        off = base + 0x10 * (v // 32)
        p.set32(off, p.get32(off) | 1 << (v % 32))


def bits(p, base):
    return {32 * n + b for n in range(8) for b in range(32) if p.get32(base + 0x10 * n) >> b & 1}


# ---------------------------------------------------------------- PPR virtualization
@pytest.mark.parametrize("vtpr, svi, want", [
    (0x00, 0x00, 0x00),
    (0x35, 0x20, 0x35),      # VTPR[7:4] 3 >= SVI[7:4] 2: VPPR = VTPR (low nibble kept)
    (0x35, 0x31, 0x35),      # equal classes: VTPR
    (0x35, 0x41, 0x40),      # SVI's class above: SVI & F0H
])
def test_ppr_virtualization(vtpr, svi, want):
    p = page(x080=vtpr, x0A0=0xFFFFFFFF)
    assert A.ppr_virtualization(p, A.make_status(0, svi)) == want
    assert p.get32(A.APIC_PROCPRI) == want       # bits 31:8 of VPPR cleared


# ---------------------------------------------------------------- evaluation
@pytest.mark.parametrize("rvi, vppr, window, want", [
    (0x51, 0x40, False, True),     # RVI[7:4] 5 > VPPR[7:4] 4
    (0x4F, 0x40, False, False),    # same class: not recognized
    (0x00, 0x00, False, False),    # nothing requested
    (0x51, 0x40, True, False),     # interrupt-window exiting 1: never recognized
])
def test_evaluation_of_pending_virtual_interrupts(rvi, vppr, window, want):
    p = page(x0A0=vppr)
    assert A.pending_virtual_interrupt(p, A.make_status(rvi, 0), window) is want


# ---------------------------------------------------------------- delivery
def test_virtual_interrupt_delivery_steps():
    p = A.BytesPage()
    set_bits(p, A.APIC_IRR, 0x31, 0x62, 0xE0)
    set_bits(p, A.APIC_ISR, 0x21)
    vector, status = A.deliver_virtual_interrupt(p, A.make_status(0xE0, 0x21))
    assert vector == 0xE0                        # Vector = RVI
    assert bits(p, A.APIC_ISR) == {0x21, 0xE0}   # VISR[Vector] = 1
    assert A.svi(status) == 0xE0                 # SVI = Vector
    assert p.get32(A.APIC_PROCPRI) == 0xE0       # VPPR = Vector & F0H
    assert bits(p, A.APIC_IRR) == {0x31, 0x62}   # VIRR[Vector] = 0
    assert A.rvi(status) == 0x62                 # RVI = highest index set in VIRR


def test_delivery_of_the_last_request_leaves_rvi_0():
    p = A.BytesPage()
    set_bits(p, A.APIC_IRR, 0x40)
    vector, status = A.deliver_virtual_interrupt(p, A.make_status(0x40, 0))
    assert vector == 0x40 and A.rvi(status) == 0 and not bits(p, A.APIC_IRR)


# ---------------------------------------------------------------- EOI virtualization
def test_eoi_virtualization_without_the_exit_bitmap_bit():
    p = page(x080=0x10)
    set_bits(p, A.APIC_ISR, 0x41, 0x80)
    res = A.eoi_virtualization(p, A.make_status(0x55, 0x80), eoi_exit_bitmap=1 << 0x41)
    assert bits(p, A.APIC_ISR) == {0x41}         # VISR[SVI] = 0
    assert A.svi(res.status) == 0x41             # SVI = highest left in VISR
    assert A.rvi(res.status) == 0x55             # RVI unchanged
    assert p.get32(A.APIC_PROCPRI) == 0x40       # PPR virtualization with the new SVI
    assert res.eoi_exit_vector is None           # no exit: evaluation follows


def test_eoi_virtualization_with_the_exit_bitmap_bit_is_an_eoi_induced_exit():
    p = A.BytesPage()
    set_bits(p, A.APIC_ISR, 0x80)
    res = A.eoi_virtualization(p, A.make_status(0, 0x80), eoi_exit_bitmap=1 << 0x80)
    assert res.eoi_exit_vector == 0x80           # qualification: the vector
    assert A.svi(res.status) == 0 and not bits(p, A.APIC_ISR)   # done before the exit


def test_eoi_exit_bitmap_fields():
    # EOI_EXIT_BITMAP1 bit 0 is vector 64; EOI_EXIT_BITMAP3 bit 63 vector 255
    assert A.eoi_exit_bitmap((0, 1, 0, 0)) == 1 << 64
    assert A.eoi_exit_bitmap((0, 0, 0, 1 << 63)) == 1 << 255


# ---------------------------------------------------------------- self-IPI
def test_self_ipi_virtualization():
    p = A.BytesPage()
    s = A.self_ipi_virtualization(p, A.make_status(0x30, 0x20), 0x90)
    assert bits(p, A.APIC_IRR) == {0x90} and A.rvi(s) == 0x90 and A.svi(s) == 0x20
    s = A.self_ipi_virtualization(p, s, 0x50)
    assert A.rvi(s) == 0x90                      # RVI = max(RVI, vector)


@pytest.mark.parametrize("icr, want", [
    (0x00040000 | 0x31, True),                   # shorthand self, fixed, edge, vector 31H
    (0x00040000 | 0x0F, False),                  # vector bits 7:4 zero
    (0x000C0000 | 0x31, False),                  # shorthand all-excluding-self
    (0x00040000 | 0x0400 | 0x31, False),         # delivery mode NMI
    (0x00040000 | 0x8000 | 0x31, False),         # level triggered
    (0x00040000 | 0x1000 | 0x31, False),         # delivery status set
    (0x00140000 | 0x31, False),                  # reserved bit 20
    (0x31, False),                               # no shorthand: destination field
])
def test_self_ipi_icr_values(icr, want):
    assert A.self_ipi_icr(icr) is want


# ---------------------------------------------------------------- TPR virtualization
def test_tpr_below_threshold_without_virtual_interrupt_delivery():
    assert A.tpr_below_threshold(page(x080=0x20), 3) is True      # 2 < 3
    assert A.tpr_below_threshold(page(x080=0x30), 3) is False


# ---------------------------------------------------------------- memory-mapped accesses
def test_reads_virtualized_with_apic_register_virtualization():
    yes = dict(tpr_shadow=True, apic_register_virt=True)
    for off in (0x020, 0x030, 0x080, 0x0B0, 0x0D0, 0x0E0, 0x0F0, 0x100, 0x170, 0x180, 0x1F0,
                0x200, 0x270, 0x280, 0x300, 0x310, 0x320, 0x370, 0x380, 0x3E0):
        assert A.read_virtualized(off, 4, **yes), hex(off)
    for off in (0x090, 0x0A0, 0x390, 0x3F0, 0x400, 0x0C0):   # APR, PPR, current count ...
        assert not A.read_virtualized(off, 4, **yes), hex(off)
    assert not A.read_virtualized(0x084, 4, **yes)           # bytes 7:4 of a register
    assert not A.read_virtualized(0x082, 4, **yes)           # crosses a 32-bit boundary
    assert not A.read_virtualized(0x080, 8, **yes)           # more than 32 bits
    assert not A.read_virtualized(0x080, 4, tpr_shadow=False, apic_register_virt=True)


def test_reads_without_apic_register_virtualization_only_tpr():
    no = dict(tpr_shadow=True, apic_register_virt=False)
    assert A.read_virtualized(0x080, 4, **no) and A.read_virtualized(0x081, 1, **no)
    assert not A.read_virtualized(0x020, 4, **no) and not A.read_virtualized(0x200, 4, **no)


def test_writes_virtualized():
    vid = dict(tpr_shadow=True, apic_register_virt=False, virtual_intr_delivery=True)
    assert {off for off in range(0, 0x400, 0x10) if A.write_virtualized(off, 4, **vid)} \
        == {0x080, 0x0B0, 0x300}
    none = dict(tpr_shadow=True, apic_register_virt=False, virtual_intr_delivery=False)
    assert {off for off in range(0, 0x400, 0x10) if A.write_virtualized(off, 4, **none)} \
        == {0x080}
    rv = dict(tpr_shadow=True, apic_register_virt=True, virtual_intr_delivery=False)
    got = {off for off in range(0, 0x400, 0x10) if A.write_virtualized(off, 4, **rv)}
    assert got == {0x020, 0x080, 0x0B0, 0x0D0, 0x0E0, 0x0F0, 0x280, 0x300, 0x310, 0x320, 0x330,
                   0x340, 0x350, 0x360, 0x370, 0x380, 0x3E0}
    assert 0x100 not in got and 0x200 not in got and 0x390 not in got    # ISR, IRR, current count


def test_apic_write_emulation():
    # TPR: bytes 3:1 cleared, then TPR virtualization
    p = page(x080=0xAABBCC50)
    eff = A.apic_write_emulation(p, 0, 0x080, virtual_intr_delivery=False)
    assert p.get32(0x080) == 0x50 and eff.tpr and eff.exit is None
    # EOI without virtual-interrupt delivery: APIC-write exit, qualification 0B0H
    eff = A.apic_write_emulation(page(), 0, 0x0B0, virtual_intr_delivery=False)
    assert eff.exit == (er.APIC_WRITE, 0x0B0)
    # EOI with it: EOI virtualization (exit only with the bitmap bit)
    p = A.BytesPage()
    set_bits(p, A.APIC_ISR, 0x60)
    eff = A.apic_write_emulation(p, A.make_status(0, 0x60), 0x0B0, virtual_intr_delivery=True)
    assert eff.exit is None and eff.evaluate and A.svi(eff.status) == 0
    set_bits(p, A.APIC_ISR, 0x60)
    eff = A.apic_write_emulation(p, A.make_status(0, 0x60), 0x0B0, virtual_intr_delivery=True,
                                 eoi_exit_bitmap=1 << 0x60)
    assert eff.exit == (er.EOI_INDUCED, 0x60)
    # ICR low: a self-IPI is virtualized, anything else is an APIC-write exit
    p = page(x300=0x00040000 | 0x45)
    eff = A.apic_write_emulation(p, 0, 0x300, virtual_intr_delivery=True)
    assert eff.exit is None and A.rvi(eff.status) == 0x45 and bits(p, A.APIC_IRR) == {0x45}
    p = page(x300=0x45)
    assert A.apic_write_emulation(p, 0, 0x300, virtual_intr_delivery=True).exit \
        == (er.APIC_WRITE, 0x300)
    # an LVT (APIC-register virtualization): APIC-write exit with the offset
    assert A.apic_write_emulation(page(), 0, 0x320, virtual_intr_delivery=True).exit \
        == (er.APIC_WRITE, 0x320)


# ---------------------------------------------------------------- x2APIC
def test_x2apic_reads():
    p = page(x080=0x20, x0A0=0x30, x020=7, x300=0x000400FD, x310=5)
    assert A.x2apic_read(p, 0x808, apic_register_virt=False) == 0x20     # TPR always
    assert A.x2apic_read(p, 0x802, apic_register_virt=False) is None      # operates normally
    assert A.x2apic_read(p, 0x802, apic_register_virt=True) == 7
    assert A.x2apic_read(p, 0x80A, apic_register_virt=True) == 0x30       # PPR
    assert A.x2apic_read(p, 0x830, apic_register_virt=True) == 5 << 32 | 0x000400FD
    for msr in (0x80B, 0x839, 0x83F):          # EOI, current count, self IPI: normally
        assert A.x2apic_read(p, msr, apic_register_virt=True) is None


def test_x2apic_writes():
    p = A.BytesPage()
    assert A.x2apic_write(p, 0, 0x808, 0x1FF, virtual_intr_delivery=True).fault   # 63:8
    w = A.x2apic_write(p, 0, 0x808, 0x70, virtual_intr_delivery=False)
    assert w.virtualized and w.effect.tpr and p.get32(0x080) == 0x70
    # EOI: virtualized only with virtual-interrupt delivery; a nonzero value #GP(0)
    assert not A.x2apic_write(p, 0, 0x80B, 0, virtual_intr_delivery=False).virtualized
    assert A.x2apic_write(p, 0, 0x80B, 1, virtual_intr_delivery=True).fault
    set_bits(p, A.APIC_ISR, 0x90)
    w = A.x2apic_write(p, A.make_status(0, 0x90), 0x80B, 0, virtual_intr_delivery=True,
                       eoi_exit_bitmap=1 << 0x90)
    assert w.effect.exit == (er.EOI_INDUCED, 0x90)
    # SELF IPI: a vector below 16 is an APIC-write exit at 3F0H, others virtualized
    w = A.x2apic_write(p, 0, 0x83F, 0x0E, virtual_intr_delivery=True)
    assert w.effect.exit == (er.APIC_WRITE, 0x3F0) and p.get32(0x3F0) == 0x0E
    w = A.x2apic_write(p, 0, 0x83F, 0xD1, virtual_intr_delivery=True)
    assert w.effect.exit is None and A.rvi(w.effect.status) == 0xD1
    assert A.x2apic_write(p, 0, 0x83F, 0x100, virtual_intr_delivery=True).fault
    # ICR and the rest operate normally
    assert not A.x2apic_write(p, 0, 0x830, 0x40031, virtual_intr_delivery=True).virtualized


# ---------------------------------------------------------------- posted interrupts
def descriptor(pir=0, on=False, sn=False, nv=0xF2, ndst=3):
    return A.PostedDescriptor(pir, on, sn, nv, ndst).encode()


def test_descriptor_layout():
    raw = descriptor(pir=1 << 0xFD | 1, on=True, sn=True, nv=0xF2, ndst=0x12345678)
    assert raw[31] == 0x20 and raw[0] == 1                 # PIR bit 253, bit 0
    assert raw[32] == 0b11                                 # ON bit 256, SN bit 257
    assert raw[34] == 0xF2                                 # NV bits 279:272
    assert raw[36:40] == (0x12345678).to_bytes(4, "little")   # NDST bits 319:288
    assert A.PostedDescriptor.decode(raw) == (1 << 0xFD | 1, True, True, 0xF2, 0x12345678)


def test_posted_interrupt_processing_steps():
    p = A.BytesPage()
    set_bits(p, A.APIC_IRR, 0x41)
    raw = descriptor(pir=1 << 0x92 | 1 << 0x51, on=True, sn=True)
    new, status = A.posted_interrupt_processing(raw, p, A.make_status(0x41, 0x30))
    d = A.PostedDescriptor.decode(new)
    assert not d.on                                        # step 2: ON cleared
    assert d.pir == 0                                      # step 4: PIR cleared ...
    assert bits(p, A.APIC_IRR) == {0x41, 0x51, 0x92}       # ... and ORed into VIRR
    assert A.rvi(status) == 0x92 and A.svi(status) == 0x30  # step 5: RVI = max(RVI, PIRV)
    assert d.sn and d.nv == 0xF2 and d.ndst == 3           # the rest untouched


def test_posted_interrupt_processing_keeps_a_higher_rvi():
    p = A.BytesPage()
    _, status = A.posted_interrupt_processing(descriptor(pir=1 << 0x30, on=True), p,
                                              A.make_status(0xE0, 0))
    assert A.rvi(status) == 0xE0
    _, status = A.posted_interrupt_processing(descriptor(pir=0, on=True), p,
                                              A.make_status(0x22, 0))
    assert A.rvi(status) == 0x22                           # empty PIR: RVI unchanged


def test_posting_side():
    raw, notify = A.post_interrupt(descriptor(), 0xFD)
    d = A.PostedDescriptor.decode(raw)
    assert notify and d.on and d.pir == 1 << 0xFD          # PIR set, ON set: notify
    raw2, notify = A.post_interrupt(raw, 0xEC)
    assert not notify and A.PostedDescriptor.decode(raw2).pir == 1 << 0xFD | 1 << 0xEC  # ON set
    raw3, notify = A.post_interrupt(raw2, 0xEC)
    assert not notify and raw3 == raw2                     # PIR bit already set: nothing
    # SN (VT-d): an IOMMU posting leaves ON clear and sends nothing; KVM's own path ignores it
    raw, notify = A.post_interrupt(descriptor(sn=True), 0x40, honour_sn=True)
    assert not notify and not A.PostedDescriptor.decode(raw).on
    assert A.PostedDescriptor.decode(raw).pir == 1 << 0x40
    _, notify = A.post_interrupt(descriptor(sn=True), 0x40)
    assert notify


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(16, 255), min_size=1, max_size=20))
def test_posted_then_delivered_in_priority_order(vectors):
    """Everything posted reaches VIRR once; delivery with EOIs in between takes
    the vectors highest first (RVI is always the highest VIRR vector)."""
    raw = descriptor()
    for v in vectors:
        raw, _ = A.post_interrupt(raw, v)
    p = page(x080=0)
    raw, status = A.posted_interrupt_processing(raw, p, 0)
    A.ppr_virtualization(p, status)
    got = []
    while A.pending_virtual_interrupt(p, status, False):
        vec, status = A.deliver_virtual_interrupt(p, status)
        got.append(vec)
        status = A.eoi_virtualization(p, status, 0).status
    assert got == sorted(set(vectors), reverse=True)
    assert not bits(p, A.APIC_IRR) and not bits(p, A.APIC_ISR)


# ---------------------------------------------------------------- the exit rules
from devirt_emu.events import Event, Insn, Kind  # noqa: E402
from devirt_emu.vmx import controls as C  # noqa: E402
from devirt_emu.vmx import rules  # noqa: E402
from devirt_emu.vmx.fields import VmcsField as F  # noqa: E402

APIC_PAGE = 0xFEE00000


class DictVmcs:
    def __init__(self, **fields):
        self.f = {int(F[k]): v for k, v in fields.items()}

    def vmread(self, field):
        return self.f.get(int(field), 0)


def apicv_vmcs(secondary, primary=C.CPU_BASED_TPR_SHADOW):
    return DictVmcs(CPU_BASED_VM_EXEC_CONTROL=primary | C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS,
                    SECONDARY_VM_EXEC_CONTROL=C.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES | secondary,
                    APIC_ACCESS_ADDR=APIC_PAGE, PIN_BASED_VM_EXEC_CONTROL=C.PIN_BASED_EXT_INTR_MASK)


def access(kind, offset, value=None, size=4, **extra):
    ex = {"gpa": APIC_PAGE + offset, "access": kind, "size": size, **extra}
    if value is not None:
        ex["value"] = value
    regs = {"cpl": 0, "mode": 64, "rflags": 2, "cr0": 0x80000031, "cr4": 0x20, "efer": 0xD00}
    return Event(Kind.APIC_ACCESS, 0, 0x401000, Insn(Kind.APIC_ACCESS, 6, "mov"),
                 linear=APIC_PAGE + offset, regs=regs, extra=ex)


def test_rule_apic_register_virtualization_reads():
    v = apicv_vmcs(C.SECONDARY_EXEC_APIC_REGISTER_VIRT)
    assert not rules.decide(access("read", 0x020), v, None).exit         # ID: virtualized
    d = rules.decide(access("read", 0x390), v, None)                     # current count
    assert d.exit and d.name == "APIC_ACCESS" and d.qualification == 0x390   # type 0: read
    d = rules.decide(access("write", 0x390, 5), v, None)
    assert d.exit and d.qualification == 1 << 12 | 0x390                 # type 1: write


def test_rule_virtual_interrupt_delivery_writes():
    v = apicv_vmcs(C.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY)
    for off in (0x080, 0x0B0, 0x300):                                    # TPR, EOI, ICR low
        assert not rules.decide(access("write", off, 0), v, None).exit, hex(off)
    d = rules.decide(access("write", 0x320, 0), v, None)                 # LVT: not with VID alone
    assert d.exit and d.name == "APIC_ACCESS" and d.qualification == 1 << 12 | 0x320
    d = rules.decide(access("read", 0x0B0), v, None)                     # reads: TPR only
    assert d.exit and d.qualification == 0x0B0
    # an access during event delivery is never virtualized (access type 3)
    d = rules.decide(access("write", 0x080, 0, during_delivery=True), v, None)
    assert d.exit and d.qualification >> 12 == 3


def test_rule_tpr_write_with_vid_has_no_threshold_exit():
    v = apicv_vmcs(C.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY)
    v.f[int(F.TPR_THRESHOLD)] = 0xF
    assert not rules.decide(access("write", 0x080, 0x10), v, None).exit


def test_rule_notification_vector_does_not_exit():
    v = DictVmcs(PIN_BASED_VM_EXEC_CONTROL=C.PIN_BASED_EXT_INTR_MASK | C.PIN_BASED_POSTED_INTR,
                 VM_EXIT_CONTROLS=C.VM_EXIT_ACK_INTR_ON_EXIT, POSTED_INTR_NV=0xF2)
    ev = lambda vec: Event(Kind.INTERRUPT, 0, 0x401000, vector=vec,  # noqa: E731
                           regs={"rflags": 0x202, "cpl": 0, "mode": 64})
    assert not rules.decide(ev(0xF2), v, None).exit
    d = rules.decide(ev(0xF3), v, None)
    assert d.exit and d.name == "EXTERNAL_INTERRUPT" and d.interruption_info == 0x800000F3
