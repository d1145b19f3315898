"""APIC virtualization and virtual interrupts: the processor's algorithms, as pure functions.

Source: Intel SDM Vol. 3C, chapter "APIC Virtualization and Virtual
Interrupts": "Virtual-APIC State" (VTPR, VPPR, VEOI, VISR, VIRR, VICR; the
guest-interrupt status RVI/SVI), "Evaluation and Delivery of Virtual
Interrupts", "Virtualizing Memory-Mapped APIC Accesses" (which reads and writes
of the APIC-access page are virtualized, APIC-write emulation), "Virtualizing
MSR-Based APIC Accesses" (virtualize x2APIC mode), and "Posted-Interrupt
Processing"; the posted-interrupt descriptor's SN, NV and NDST fields are
Intel VT-d's (the SDM leaves bits 511:257 to software and other agents).

Everything here works on a :class:`Page` (the virtual-APIC page: 32-bit reads and
writes at an offset) and the 16-bit guest-interrupt status (RVI in bits 7:0,
SVI in bits 15:8), and returns what happened; the vCPU (``vcpu.py``) applies it
to the core (an interrupt delivered through the guest IDT, a trap-like VM exit).
``kvm.py`` uses :func:`post_interrupt` as KVM's ``vmx_deliver_posted_interrupt``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol

from . import exit_reasons as er

# Virtual-APIC page offsets (the local APIC's register layout).
APIC_ID, APIC_LVR, APIC_TASKPRI, APIC_PROCPRI, APIC_EOI = 0x20, 0x30, 0x80, 0xA0, 0xB0
APIC_LDR, APIC_DFR, APIC_SPIV, APIC_ISR, APIC_TMR, APIC_IRR = 0xD0, 0xE0, 0xF0, 0x100, 0x180, 0x200
APIC_ESR, APIC_ICR, APIC_ICR2, APIC_LVTT, APIC_TMICT, APIC_TDCR = 0x280, 0x300, 0x310, 0x320, 0x380, 0x3E0
APIC_SELF_IPI = 0x3F0               # x2APIC mode only (MSR 83FH)

#: Offsets (of 16-byte registers) whose reads of at most 32 bits, entirely in
#: bytes 0-3 of the register, are virtualized with APIC-register virtualization
#: (SDM "Virtualizing Reads from the APIC-Access Page"): ID, version, TPR, EOI,
#: LDR, DFR, SVR, ISR, TMR, IRR, ESR, ICR low and high, the six LVT entries,
#: initial count, divide configuration.  PPR, APR and current count are not.
READ_VIRTUALIZED = frozenset(
    (APIC_ID, APIC_LVR, APIC_TASKPRI, APIC_EOI, APIC_LDR, APIC_DFR, APIC_SPIV, APIC_ESR,
     APIC_ICR, APIC_ICR2, APIC_TMICT, APIC_TDCR)
    + tuple(range(APIC_ISR, APIC_IRR + 0x80, 0x10)) + tuple(range(APIC_LVTT, 0x380, 0x10)))

#: Offsets whose writes are virtualized with APIC-register virtualization
#: (SDM "Determining Whether a Write Access is Virtualized"), beside TPR (with
#: the TPR shadow) and EOI and ICR low (with virtual-interrupt delivery too).
WRITE_VIRTUALIZED_APICRV = frozenset(
    (APIC_ID, APIC_TASKPRI, APIC_EOI, APIC_LDR, APIC_DFR, APIC_SPIV, APIC_ESR, APIC_ICR,
     APIC_ICR2, APIC_TMICT, APIC_TDCR) + tuple(range(APIC_LVTT, 0x380, 0x10)))
WRITE_VIRTUALIZED_VID = frozenset((APIC_TASKPRI, APIC_EOI, APIC_ICR))

#: x2APIC MSRs whose RDMSR is virtualized with "virtualize x2APIC mode" and
#: APIC-register virtualization (SDM "Virtualizing MSR-Based APIC Accesses"):
#: ID, version, TPR, PPR, LDR, SVR, ISR, TMR, IRR, ESR, ICR (64 bits), LVTs,
#: initial count, divide configuration.  Not: EOI (write-only), current count,
#: self IPI.
X2APIC_READ_VIRTUALIZED = frozenset(
    (0x802, 0x803, 0x808, 0x80A, 0x80D, 0x80F, 0x828, 0x830, 0x838, 0x83E)
    + tuple(range(0x810, 0x828)) + tuple(range(0x832, 0x838)))

# Posted-interrupt descriptor (64 bytes): PIR bits 255:0, ON bit 256 (SDM);
# SN bit 257, NV bits 279:272, NDST bits 319:288 (VT-d).
PID_SIZE = 64
PID_ON, PID_SN = 1 << 0, 1 << 1          # in byte 32
_PID_CONTROL, _PID_NV, _PID_NDST = 32, 34, 36


class Page(Protocol):
    """The virtual-APIC page: 32-bit little-endian registers at byte offsets."""

    def get32(self, offset: int) -> int: ...

    def set32(self, offset: int, value: int) -> None: ...


class BytesPage:
    """A :class:`Page` in a bytearray (tests, and a scratch copy)."""

    def __init__(self, data: Optional[bytearray] = None):
        self.data = data if data is not None else bytearray(4096)

    def get32(self, offset: int) -> int:
        return int.from_bytes(self.data[offset:offset + 4], "little")

    def set32(self, offset: int, value: int) -> None:
        self.data[offset:offset + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")


# ----------------------------------------------------------------- status and vectors
def rvi(status: int) -> int:
    return status & 0xFF


def svi(status: int) -> int:
    return status >> 8 & 0xFF


def make_status(rvi_: int, svi_: int) -> int:
    return (svi_ & 0xFF) << 8 | (rvi_ & 0xFF)


def _vector_bit(page: Page, base: int, vector: int) -> bool:
    return bool(page.get32(base + 0x10 * (vector >> 5)) >> (vector & 31) & 1)


def _set_vector(page: Page, base: int, vector: int, on: bool) -> None:
    off = base + 0x10 * (vector >> 5)
    word = page.get32(off)
    bit = 1 << (vector & 31)
    page.set32(off, word | bit if on else word & ~bit)


def highest(page: Page, base: int) -> int:
    """The highest vector set in the 256-bit array at ``base`` (VIRR, VISR), 0 if none."""
    for n in range(7, -1, -1):
        word = page.get32(base + 0x10 * n)
        if word:
            return 32 * n + word.bit_length() - 1
    return 0


# ----------------------------------------------------------------- the SDM's algorithms
def ppr_virtualization(page: Page, status: int) -> int:
    """SDM "PPR Virtualization": VPPR = VTPR if VTPR[7:4] >= SVI[7:4], else
    SVI & F0H; bits 31:8 of VPPR cleared.  Returns VPPR."""
    vtpr = page.get32(APIC_TASKPRI) & 0xFF
    s = svi(status)
    vppr = vtpr if vtpr >> 4 >= s >> 4 else s & 0xF0
    page.set32(APIC_PROCPRI, vppr)
    return vppr


def pending_virtual_interrupt(page: Page, status: int, interrupt_window_exiting: bool) -> bool:
    """SDM "Evaluation of Pending Virtual Interrupts": a virtual interrupt is
    recognized if "interrupt-window exiting" is 0 and RVI[7:4] > VPPR[7:4]."""
    if interrupt_window_exiting:
        return False
    return rvi(status) >> 4 > (page.get32(APIC_PROCPRI) & 0xFF) >> 4


def deliver_virtual_interrupt(page: Page, status: int) -> tuple[int, int]:
    """SDM "Virtual-Interrupt Delivery": Vector = RVI; VISR[Vector] = 1;
    SVI = Vector; VPPR = Vector & F0H; VIRR[Vector] = 0; RVI = the highest
    vector left in VIRR (0 if none).  Returns (vector, new status); the caller
    delivers the vector through the guest IDT as an external interrupt."""
    vector = rvi(status)
    _set_vector(page, APIC_ISR, vector, True)
    page.set32(APIC_PROCPRI, vector & 0xF0)
    _set_vector(page, APIC_IRR, vector, False)
    return vector, make_status(highest(page, APIC_IRR), vector)


class EoiResult(NamedTuple):
    status: int
    #: the vector whose EOI-exit bitmap bit is set: an EOI-induced VM exit with it as
    #: the qualification (trap-like); None: pending virtual interrupts are evaluated
    eoi_exit_vector: Optional[int]


def eoi_virtualization(page: Page, status: int, eoi_exit_bitmap: int) -> EoiResult:
    """SDM "EOI Virtualization": Vector = SVI; VISR[Vector] = 0; SVI = the
    highest vector left in VISR (0 if none); PPR virtualization; then if
    EOI_exit_bitmap[Vector] is 1 an EOI-induced VM exit (qualification =
    Vector), else evaluation of pending virtual interrupts.  ``eoi_exit_bitmap``
    is EOI_EXIT_BITMAP0-3 as one 256-bit number (bit n: vector n).  VEOI
    (offset 0B0H) is left as written (0 for a legal x2APIC write)."""
    vector = svi(status)
    _set_vector(page, APIC_ISR, vector, False)
    status = make_status(rvi(status), highest(page, APIC_ISR))
    ppr_virtualization(page, status)
    if eoi_exit_bitmap >> vector & 1:
        return EoiResult(status, vector)
    return EoiResult(status, None)


def self_ipi_virtualization(page: Page, status: int, vector: int) -> int:
    """SDM "Self-IPI Virtualization": VIRR[Vector] = 1; RVI = max(RVI, Vector).
    (Then the caller evaluates pending virtual interrupts.)"""
    _set_vector(page, APIC_IRR, vector, True)
    return make_status(max(rvi(status), vector), svi(status))


def tpr_below_threshold(page: Page, tpr_threshold: int) -> bool:
    """SDM "TPR Virtualization" with virtual-interrupt delivery 0: a trap-like
    TPR-below-threshold exit if VTPR[7:4] < TPR_THRESHOLD[3:0].  (With
    virtual-interrupt delivery 1 it is PPR virtualization then evaluation.)"""
    return (page.get32(APIC_TASKPRI) & 0xFF) >> 4 < (tpr_threshold & 0xF)


# ----------------------------------------------------------------- memory-mapped accesses
def read_virtualized(offset: int, size: int, *, tpr_shadow: bool, apic_register_virt: bool) -> bool:
    """Is a linear read of ``size`` bytes at APIC-access page ``offset`` virtualized
    (it reads the virtual-APIC page; else an APIC-access exit)?  With the TPR
    shadow, accesses of at most 32 bits within one register's bytes 3:0:
    with APIC-register virtualization, those of :data:`READ_VIRTUALIZED`; without it
    only the TPR (offset 080H; also with virtual-interrupt delivery)."""
    if not tpr_shadow or size > 4 or offset >> 2 != (offset + size - 1) >> 2 or offset >= 0x400 \
            or offset & 0xF >= 4:
        return False
    reg = offset & ~0xF
    if apic_register_virt:
        return reg in READ_VIRTUALIZED
    return reg == APIC_TASKPRI


def write_virtualized(offset: int, size: int, *, tpr_shadow: bool, apic_register_virt: bool,
                      virtual_intr_delivery: bool) -> bool:
    """Is a linear write of ``size`` bytes at ``offset`` virtualized (it writes the
    virtual-APIC page, then APIC-write emulation; else an APIC-access exit)?"""
    if not tpr_shadow or size > 4 or offset >> 2 != (offset + size - 1) >> 2 or offset >= 0x400 \
            or offset & 0xF >= 4:
        return False
    reg = offset & ~0xF
    if reg == APIC_TASKPRI:
        return True
    if apic_register_virt and reg in WRITE_VIRTUALIZED_APICRV:
        return True
    return virtual_intr_delivery and reg in WRITE_VIRTUALIZED_VID


class WriteEffect(NamedTuple):
    """What APIC-write emulation (or a virtualized x2APIC WRMSR) did."""

    status: int
    #: the trap-like VM exit that follows, as (basic reason, qualification), or None
    exit: Optional[tuple[int, int]] = None
    #: evaluate pending virtual interrupts (virtual-interrupt delivery)
    evaluate: bool = False
    #: a TPR write was virtualized (the caller runs TPR virtualization)
    tpr: bool = False


def self_ipi_icr(icr_low: int) -> bool:
    """Is an ICR-low value a self-IPI that virtual-interrupt delivery virtualizes
    (SDM "APIC-Write Emulation", offset 300H): reserved bits 31:20, 17:16 and 13
    clear, delivery status (12) 0, trigger mode (15) edge, delivery mode (10:8)
    fixed, destination shorthand (19:18) self, vector bits 7:4 not 0000b."""
    reserved = (0xFFF << 20) | (3 << 16) | (1 << 13) | (1 << 12) | (1 << 15) | (7 << 8)
    return not icr_low & reserved and (icr_low >> 18) & 3 == 1 and icr_low & 0xF0 != 0


def apic_write_emulation(page: Page, status: int, offset: int, *, virtual_intr_delivery: bool,
                         eoi_exit_bitmap: int = 0) -> WriteEffect:
    """SDM "APIC-Write Emulation" after a virtualized write at ``offset``: TPR:
    bytes 3:1 of VTPR cleared, TPR virtualization; EOI with virtual-interrupt
    delivery: EOI virtualization; ICR low with virtual-interrupt delivery and a
    self-IPI value: self-IPI virtualization; ICR high: bits 23:0 of VICR_HI
    cleared, nothing else; anything else: an APIC-write VM exit (trap-like,
    qualification = the page offset)."""
    reg = offset & ~0xF
    if reg == APIC_TASKPRI:
        page.set32(APIC_TASKPRI, page.get32(APIC_TASKPRI) & 0xFF)
        return WriteEffect(status, tpr=True)
    if reg == APIC_EOI and virtual_intr_delivery:
        res = eoi_virtualization(page, status, eoi_exit_bitmap)
        if res.eoi_exit_vector is not None:
            return WriteEffect(res.status, exit=(er.EOI_INDUCED, res.eoi_exit_vector))
        return WriteEffect(res.status, evaluate=True)
    if reg == APIC_ICR and virtual_intr_delivery:
        icr = page.get32(APIC_ICR)
        if self_ipi_icr(icr):
            return WriteEffect(self_ipi_virtualization(page, status, icr & 0xFF), evaluate=True)
    if reg == APIC_ICR2:
        page.set32(APIC_ICR2, page.get32(APIC_ICR2) & 0xFF000000)
        return WriteEffect(status)
    return WriteEffect(status, exit=(er.APIC_WRITE, offset & 0xFFF))


# ----------------------------------------------------------------- x2APIC (MSR) accesses
def x2apic_offset(msr: int) -> int:
    """The virtual-APIC page offset of x2APIC MSR ``msr`` (800H-8FFH)."""
    return (msr & 0xFF) << 4


def x2apic_read(page: Page, msr: int, *, apic_register_virt: bool) -> Optional[int]:
    """RDMSR of x2APIC MSR ``msr`` that did not exit, with "virtualize x2APIC
    mode": the 64-bit value from the virtual-APIC page when virtualized (TPR
    always; with APIC-register virtualization those of
    :data:`X2APIC_READ_VIRTUALIZED`, ICR as 64 bits from 300H and 310H), None
    when the instruction operates normally (on the physical x2APIC)."""
    if msr != 0x808 and not (apic_register_virt and msr in X2APIC_READ_VIRTUALIZED):
        return None
    off = x2apic_offset(msr)
    value = page.get32(off)
    if msr == 0x830:
        value |= page.get32(APIC_ICR2) << 32
    return value


class X2apicWrite(NamedTuple):
    """A WRMSR to an x2APIC MSR that did not exit, with "virtualize x2APIC mode"."""

    #: #GP(0) (reserved bits set in a virtualized write)
    fault: bool = False
    #: the write was virtualized (else it operates normally, on the physical x2APIC)
    virtualized: bool = False
    effect: Optional[WriteEffect] = None


def x2apic_write(page: Page, status: int, msr: int, value: int, *, virtual_intr_delivery: bool,
                 eoi_exit_bitmap: int = 0) -> X2apicWrite:
    """SDM "Virtualizing MSR-Based APIC Accesses", WRMSR: TPR (808H): #GP(0)
    if bits 63:8 are set, else VTPR = value (bits 31:8 cleared) and TPR
    virtualization; with virtual-interrupt delivery, EOI (80BH): #GP(0) unless
    the value is 0, else EOI virtualization; SELF IPI (83FH): #GP(0) if bits
    63:8 are set, else a vector below 16 is written to offset 3F0H and causes
    an APIC-write exit (qualification 3F0H), any other vector self-IPI
    virtualization.  Every other MSR operates normally."""
    if msr == 0x808:
        if value >> 8:
            return X2apicWrite(fault=True)
        page.set32(APIC_TASKPRI, value & 0xFF)
        return X2apicWrite(virtualized=True, effect=WriteEffect(status, tpr=True))
    if virtual_intr_delivery and msr == 0x80B:
        if value:
            return X2apicWrite(fault=True)
        page.set32(APIC_EOI, 0)
        res = eoi_virtualization(page, status, eoi_exit_bitmap)
        if res.eoi_exit_vector is not None:
            eff = WriteEffect(res.status, exit=(er.EOI_INDUCED, res.eoi_exit_vector))
        else:
            eff = WriteEffect(res.status, evaluate=True)
        return X2apicWrite(virtualized=True, effect=eff)
    if virtual_intr_delivery and msr == 0x83F:
        if value >> 8:
            return X2apicWrite(fault=True)
        vector = value & 0xFF
        if vector < 16:
            page.set32(APIC_SELF_IPI, vector)
            return X2apicWrite(virtualized=True,
                               effect=WriteEffect(status, exit=(er.APIC_WRITE, APIC_SELF_IPI)))
        return X2apicWrite(virtualized=True,
                           effect=WriteEffect(self_ipi_virtualization(page, status, vector),
                                              evaluate=True))
    return X2apicWrite()


# ----------------------------------------------------------------- posted interrupts
class PostedDescriptor(NamedTuple):
    """A posted-interrupt descriptor, decoded."""

    pir: int            # 256 bits: bit n requests vector n
    on: bool            # outstanding notification
    sn: bool            # suppress notification (VT-d)
    nv: int             # notification vector (VT-d)
    ndst: int           # notification destination, an APIC ID (VT-d)

    @classmethod
    def decode(cls, raw: bytes) -> "PostedDescriptor":
        if len(raw) != PID_SIZE:
            raise ValueError(f"a posted-interrupt descriptor is {PID_SIZE} bytes, not {len(raw)}")
        ctl = raw[_PID_CONTROL]
        return cls(int.from_bytes(raw[:32], "little"), bool(ctl & PID_ON), bool(ctl & PID_SN),
                   raw[_PID_NV], int.from_bytes(raw[_PID_NDST:_PID_NDST + 4], "little"))

    def encode(self, raw: bytes = bytes(PID_SIZE)) -> bytes:
        """These fields over ``raw`` (bits this model does not name are kept)."""
        out = bytearray(raw)
        out[:32] = self.pir.to_bytes(32, "little")
        out[_PID_CONTROL] = (out[_PID_CONTROL] & ~(PID_ON | PID_SN)) | (PID_ON if self.on else 0) \
            | (PID_SN if self.sn else 0)
        out[_PID_NV] = self.nv
        out[_PID_NDST:_PID_NDST + 4] = self.ndst.to_bytes(4, "little")
        return bytes(out)


def posted_interrupt_processing(raw_descriptor: bytes, page: Page, status: int) -> tuple[bytes, int]:
    """SDM "Posted-Interrupt Processing", after the local APIC has been
    acknowledged with the notification vector (the caller writes 0 to the
    physical EOI register, step 3): step 2, ON is cleared; step 4, PIR is ORed
    into VIRR and cleared; step 5, RVI = max(RVI, PIRV), PIRV the highest vector
    in PIR (RVI unchanged when PIR is empty); step 6 (the caller) evaluates
    pending virtual interrupts.  SN, NV, NDST are not read by the processor.
    Returns (new descriptor bytes, new status)."""
    d = PostedDescriptor.decode(raw_descriptor)
    pir = d.pir
    for n in range(8):
        word = pir >> (32 * n) & 0xFFFFFFFF
        if word:
            off = APIC_IRR + 0x10 * n
            page.set32(off, page.get32(off) | word)
    new = d._replace(pir=0, on=False).encode(raw_descriptor)
    if pir:
        status = make_status(max(rvi(status), pir.bit_length() - 1), svi(status))
    return new, status


def post_interrupt(raw_descriptor: bytes, vector: int, *, honour_sn: bool = False) -> tuple[bytes, bool]:
    """The poster's side (KVM's ``vmx_deliver_posted_interrupt``; an IOMMU's with
    ``honour_sn``): set PIR[vector]; if it was set already, nothing else; set
    ON, and if ON was clear the poster must notify (send NV to the vCPU's
    processor if it is in non-root operation, else wake the vCPU).  With
    ``honour_sn`` (VT-d), SN=1 leaves ON clear and sends nothing.  Returns (new
    descriptor bytes, notify)."""
    if not 0 <= vector <= 255:
        raise ValueError(f"vector {vector} is not 0..255")
    d = PostedDescriptor.decode(raw_descriptor)
    bit = 1 << vector
    if d.pir & bit:
        return raw_descriptor, False
    d = d._replace(pir=d.pir | bit)
    if d.on or (honour_sn and d.sn):
        return d.encode(raw_descriptor), False
    return d._replace(on=True).encode(raw_descriptor), True


def eoi_exit_bitmap(fields: tuple[int, int, int, int]) -> int:
    """EOI_EXIT_BITMAP0-3 (vectors 0-63, 64-127, 128-191, 192-255) as one 256-bit number."""
    return sum((f & (1 << 64) - 1) << (64 * n) for n, f in enumerate(fields))
