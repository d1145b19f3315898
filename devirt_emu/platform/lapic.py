"""The local APIC of one core, and the APIC bus that carries IPIs between them.

Modelled after the Intel SDM vol. 3A, chapter "Advanced Programmable Interrupt
Controller (APIC)".  Pure Python: the cores (``platform/core.py``) call into it.

Time
----
* The TSC runs at 1 GHz: one TSC tick per virtual nanosecond, so a core's TSC
  equals its virtual time in ns (the ``now`` clock given to :class:`LocalApic`).
  IA32_TSC_DEADLINE is compared against that value.
* The APIC timer's input clock is also 1 GHz; it is divided by the divide
  configuration register (TDCR): with divide-by-``d`` the current count
  register (TMCCT) decrements once every ``d`` ns.

Interfaces
----------
* x2APIC MSRs 0x800-0x8FF through :meth:`LocalApic.rdmsr` /
  :meth:`LocalApic.wrmsr` (which also serve IA32_APIC_BASE 0x1B and
  IA32_TSC_DEADLINE 0x6E0), and xAPIC MMIO through :meth:`LocalApic.mmio_read`
  / :meth:`LocalApic.mmio_write` (offset = (MSR index - 0x800) * 16).
  :data:`APIC_REGISTERS` is the one table of registers both interfaces (and
  ``platform/msrs.py``) read.
* In x2APIC mode, as on hardware, RDMSR/WRMSR of a non-existent register, a
  write to a read-only one, a read of a write-only one (EOI, SELF IPI), a
  reserved bit set (EOI and ESR: any non-zero value) raise
  :class:`GeneralProtection`; so does any x2APIC MSR access while the APIC is
  not in x2APIC mode.  In xAPIC mode reserved bits are dropped, read-only
  registers ignore writes, and an access to an address that holds no register
  sets the ESR's "illegal register address" bit (SDM: an APIC error).

Model choices (where the SDM leaves a choice to the implementation)
-----------------------------------------------------------------
* Version register: 0x01060014: version 0x14 (integrated APIC), Max LVT Entry
  6 (seven LVT entries: CMCI, timer, thermal, performance counter, LINT0,
  LINT1, error), bit 24 set: EOI-broadcast suppression is supported, so SVR
  bit 12 is writable.  There is no I/O APIC, so no EOI message is ever
  broadcast either way.
* SVR bit 9 (focus processor checking) is reserved, as on Pentium 4 and later.
* The xAPIC ID register is read-only (the SDM allows read/write on some
  models); the ID is the one given at construction.
* PPR when TPR[7:4] == ISRV[7:4]: PPR[3:0] = TPR[3:0] (the SDM lets this be
  either TPR[3:0] or 0).
* APR (xAPIC only): the SDM's formula, with its class read as
  max(TPR[7:4], ISRV[7:4], IRRV[7:4]).
* Lowest-priority delivery is supported and delivered as fixed to the target
  with the lowest APIC ID among the destinations (no arbitration on TPR).
* ICR delivery is instantaneous: the xAPIC delivery-status bit always reads 0
  (idle), and in x2APIC mode bit 12 is ignored on writes (Intel behaviour).
* IPIs are always issued edge-triggered (SDM table "Valid combinations": a
  level trigger bit is overridden to edge).  The INIT level de-assert message
  (INIT, level 0, trigger 1) is ignored.  Combinations the SDM calls invalid
  (shorthand self or all-including-self with anything but fixed delivery),
  SMI (no SMM is modelled) and the reserved delivery modes send nothing.
* A fixed or lowest-priority IPI with a vector below 16 sets the sender's
  "send illegal vector" ESR bit and is not sent; an interrupt accepted with
  such a vector (a local LVT source, or :meth:`LocalApic.accept`) sets the
  receiver's "receive illegal vector" bit and is dropped.
* An LVT timer mode of 11b (reserved): #GP in x2APIC mode; in xAPIC mode the
  whole LVT write is ignored.
* Any write to the LVT timer that changes the timer mode disarms the timer
  (TMICT := 0, IA32_TSC_DEADLINE := 0), as SDM 10.5.4.1 says.
* In a mixed system, an IPI's destination is read in the sender's format:
  an x2APIC sender's logical destination is matched against each target's
  x2APIC logical ID (derived from its APIC ID), an xAPIC sender's against each
  target's LDR/DFR.  Physical destinations compare with the APIC ID.
* While the APIC is hardware-disabled (IA32_APIC_BASE.EN = 0) it receives
  nothing (no fixed, NMI, INIT or SIPI message); while software-disabled
  (SVR bit 8 = 0) it drops fixed interrupts but receives NMI, INIT and SIPI,
  and interrupts already in IRR/ISR stay deliverable.
* MMIO when the xAPIC interface is off (x2APIC mode or disabled): reads
  return all ones (nothing answers on the bus), writes are ignored.  MMIO
  writes take effect only as aligned 32-bit stores at the start of a 16-byte
  register slot (SDM: registers are accessed with 128-bit aligned 32-bit
  loads and stores); other writes are ignored.  Reads of 1, 2, 4 or 8 bytes
  return the bytes of the slots they cover (each slot is the 32-bit register
  followed by 12 zero bytes).
* INIT: :meth:`LocalApic.take_init` only consumes the pending flag; the core
  calls :meth:`LocalApic.init_reset` when it performs the INIT (under VMX an
  INIT may cause a VM exit instead).  A SIPI that arrived before the INIT is
  acted on is kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from ..x86 import MSR_IA32_APICBASE, MSR_IA32_TSC_DEADLINE

__all__ = [
    "GeneralProtection", "ApicRegister", "APIC_REGISTERS", "APIC_REGISTERS_BY_OFFSET",
    "APIC_REGISTERS_BY_MSR", "LocalApic", "ApicBus", "apic_base_write_check",
    "timer_divider", "MAXPHYADDR",
]


class GeneralProtection(Exception):
    """An access the hardware answers with #GP(0).  The core injects #GP."""

    error_code = 0


# --------------------------------------------------------------------------
# Architectural constants (names as Linux's apicdef.h / msr-index.h)
# --------------------------------------------------------------------------

#: Physical-address width of the modelled CPU (CPUID.80000008H:EAX[7:0] must
#: report the same): bits at and above it are reserved in IA32_APIC_BASE.
MAXPHYADDR = 46

APIC_BASE_MSR = 0x800           # first x2APIC MSR
X2APIC_MSR_LAST = 0x8FF

MSR_IA32_APICBASE_BSP = 1 << 8
MSR_IA32_APICBASE_EXTD = 1 << 10
MSR_IA32_APICBASE_ENABLE = 1 << 11
APIC_DEFAULT_PHYS_BASE = 0xFEE00000

APIC_VERSION_VALUE = 0x14 | (6 << 16) | (1 << 24)

APIC_SPIV_APIC_ENABLED = 1 << 8
APIC_SPIV_DIRECTED_EOI = 1 << 12

APIC_LVT_MASKED = 1 << 16
APIC_LVT_TIMER_MODE_SHIFT = 17
APIC_LVT_TIMER_MODE_MASK = 3 << 17
TIMER_ONESHOT, TIMER_PERIODIC, TIMER_TSCDEADLINE, TIMER_RESERVED = 0, 1, 2, 3

# ICR fields
APIC_VECTOR_MASK = 0xFF
APIC_DM_SHIFT = 8
APIC_DM_FIXED, APIC_DM_LOWEST, APIC_DM_SMI = 0, 1, 2
APIC_DM_NMI, APIC_DM_INIT, APIC_DM_STARTUP = 4, 5, 6
APIC_DEST_LOGICAL = 1 << 11
APIC_ICR_BUSY = 1 << 12
APIC_INT_ASSERT = 1 << 14
APIC_INT_LEVELTRIG = 1 << 15
APIC_SHORT_SHIFT = 18
APIC_DEST_NOSHORT, APIC_DEST_SELF, APIC_DEST_ALLINC, APIC_DEST_ALLBUT = 0, 1, 2, 3
X2APIC_BROADCAST = 0xFFFFFFFF
XAPIC_BROADCAST = 0xFF

# ESR bits
APIC_ESR_SEND_ILLEGAL = 1 << 5
APIC_ESR_RECV_ILLEGAL = 1 << 6
APIC_ESR_ILLEGAL_REGISTER = 1 << 7

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------------
# The register table
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class ApicRegister:
    """One LAPIC register.

    ``name`` follows Linux's apicdef.h (APIC_TASKPRI, APIC_LVTT, ...; the
    256-bit ISR/TMR/IRR are split into their eight 32-bit words ISR0..ISR7).
    ``offset`` is the xAPIC MMIO offset; in x2APIC mode the register is MSR
    0x800 + offset / 16 (:attr:`msr`), named :attr:`x2apic_name`.
    ``access`` is "r", "w" or "rw" in xAPIC mode, ``x2apic_access`` in x2APIC
    mode.  ``writable`` holds the bits software may set (x2APIC: any other bit
    set raises #GP; xAPIC: other bits are dropped); ``ignored`` holds
    read-only bits inside a writable register, accepted and not stored.
    """

    name: str
    offset: int
    access: str
    writable: int = 0
    ignored: int = 0
    xapic: bool = True
    x2apic: bool = True
    x2apic_access: Optional[str] = None

    @property
    def msr(self) -> Optional[int]:
        return APIC_BASE_MSR + (self.offset >> 4) if self.x2apic else None

    @property
    def x2apic_name(self) -> Optional[str]:
        return "X2APIC_" + self.name[len("APIC_"):] if self.x2apic else None

    @property
    def msr_access(self) -> str:
        return self.x2apic_access or self.access


_LVT_COMMON = 0xFF | (7 << 8) | APIC_LVT_MASKED          # vector, delivery mode, mask
_LVT_LINT = _LVT_COMMON | (1 << 13) | (1 << 15)          # + polarity, trigger mode
_DELIVERY_STATUS = 1 << 12
_REMOTE_IRR = 1 << 14

APIC_REGISTERS: tuple = (
    ApicRegister("APIC_ID", 0x020, "r"),
    ApicRegister("APIC_LVR", 0x030, "r"),
    ApicRegister("APIC_TASKPRI", 0x080, "rw", writable=0xFF),
    ApicRegister("APIC_ARBPRI", 0x090, "r", x2apic=False),
    ApicRegister("APIC_PROCPRI", 0x0A0, "r"),
    ApicRegister("APIC_EOI", 0x0B0, "w"),
    ApicRegister("APIC_LDR", 0x0D0, "rw", writable=0xFF000000, x2apic_access="r"),
    ApicRegister("APIC_DFR", 0x0E0, "rw", writable=0xF0000000, x2apic=False),
    ApicRegister("APIC_SPIV", 0x0F0, "rw",
                 writable=0xFF | APIC_SPIV_APIC_ENABLED | APIC_SPIV_DIRECTED_EOI),
    *(ApicRegister(f"APIC_ISR{i}", 0x100 + 0x10 * i, "r") for i in range(8)),
    *(ApicRegister(f"APIC_TMR{i}", 0x180 + 0x10 * i, "r") for i in range(8)),
    *(ApicRegister(f"APIC_IRR{i}", 0x200 + 0x10 * i, "r") for i in range(8)),
    ApicRegister("APIC_ESR", 0x280, "rw"),
    ApicRegister("APIC_LVTCMCI", 0x2F0, "rw", writable=_LVT_COMMON, ignored=_DELIVERY_STATUS),
    ApicRegister("APIC_ICR", 0x300, "rw",
                 writable=(_MASK32 << 32) | 0xFF | (7 << 8) | APIC_DEST_LOGICAL
                 | APIC_INT_ASSERT | APIC_INT_LEVELTRIG | (3 << APIC_SHORT_SHIFT),
                 ignored=APIC_ICR_BUSY),
    ApicRegister("APIC_ICR2", 0x310, "rw", writable=0xFF000000, x2apic=False),
    ApicRegister("APIC_LVTT", 0x320, "rw",
                 writable=0xFF | APIC_LVT_MASKED | APIC_LVT_TIMER_MODE_MASK,
                 ignored=_DELIVERY_STATUS),
    ApicRegister("APIC_LVTTHMR", 0x330, "rw", writable=_LVT_COMMON, ignored=_DELIVERY_STATUS),
    ApicRegister("APIC_LVTPC", 0x340, "rw", writable=_LVT_COMMON, ignored=_DELIVERY_STATUS),
    ApicRegister("APIC_LVT0", 0x350, "rw", writable=_LVT_LINT,
                 ignored=_DELIVERY_STATUS | _REMOTE_IRR),
    ApicRegister("APIC_LVT1", 0x360, "rw", writable=_LVT_LINT,
                 ignored=_DELIVERY_STATUS | _REMOTE_IRR),
    ApicRegister("APIC_LVTERR", 0x370, "rw", writable=0xFF | APIC_LVT_MASKED,
                 ignored=_DELIVERY_STATUS),
    ApicRegister("APIC_TMICT", 0x380, "rw", writable=_MASK32),
    ApicRegister("APIC_TMCCT", 0x390, "r"),
    ApicRegister("APIC_TDCR", 0x3E0, "rw", writable=0b1011),
    ApicRegister("APIC_SELF_IPI", 0x3F0, "w", writable=0xFF, xapic=False),
)

#: xAPIC-mode registers by MMIO offset.
APIC_REGISTERS_BY_OFFSET: Dict[int, ApicRegister] = {
    r.offset: r for r in APIC_REGISTERS if r.xapic}
#: x2APIC-mode registers by MSR index.
APIC_REGISTERS_BY_MSR: Dict[int, ApicRegister] = {
    r.msr: r for r in APIC_REGISTERS if r.x2apic}

_LVT_NAMES = ("APIC_LVTCMCI", "APIC_LVTT", "APIC_LVTTHMR", "APIC_LVTPC",
              "APIC_LVT0", "APIC_LVT1", "APIC_LVTERR")


# --------------------------------------------------------------------------
# Small pure rules
# --------------------------------------------------------------------------

def timer_divider(tdcr: int) -> int:
    """The APIC timer divisor encoded by TDCR bits 3, 1:0 (SDM figure
    "Divide Configuration Register"): 000b=2, 001b=4, 010b=8, 011b=16,
    100b=32, 101b=64, 110b=128, 111b=1."""
    code = (tdcr & 0b11) | ((tdcr >> 1) & 0b100)
    return 1 << ((code + 1) & 7)


def priority_class(vector: int) -> int:
    return vector >> 4


def compute_ppr(tpr: int, isrv: int) -> int:
    """PPR from TPR and the highest in-service vector (0 if none)."""
    if priority_class(tpr) >= priority_class(isrv):
        return tpr & 0xFF
    return isrv & 0xF0


def compute_apr(tpr: int, isrv: int, irrv: int) -> int:
    """APR (xAPIC only), see the module docstring for the reading used."""
    t = priority_class(tpr)
    if t >= priority_class(irrv) and t > priority_class(isrv):
        return tpr & 0xFF
    return max(t, priority_class(isrv), priority_class(irrv)) << 4


def x2apic_logical_id(apic_id: int) -> int:
    """x2APIC LDR derived from the x2APIC ID: cluster ID[19:4] in bits 31:16,
    and bit ID[3:0] set in bits 15:0."""
    return ((apic_id >> 4) & 0xFFFF) << 16 | (1 << (apic_id & 0xF))


def apic_base_write_check(old: int, new: int, maxphyaddr: int = MAXPHYADDR) -> None:
    """Raise GeneralProtection if writing ``new`` to IA32_APIC_BASE holding
    ``old`` is illegal: reserved bits (0-7, 9, MAXPHYADDR and up), the invalid
    state EN=0/EXTD=1, x2APIC -> xAPIC directly, disabled -> x2APIC directly.
    The BSP flag (bit 8) is read-only: its written value is ignored."""
    if not 0 <= new <= _MASK64:
        raise ValueError(f"IA32_APIC_BASE value out of 64-bit range: {new:#x}")
    allowed = (MSR_IA32_APICBASE_BSP | MSR_IA32_APICBASE_EXTD | MSR_IA32_APICBASE_ENABLE
               | (((1 << maxphyaddr) - 1) & ~0xFFF))
    if new & ~allowed:
        raise GeneralProtection(
            f"IA32_APIC_BASE: reserved bits set in {new:#x} (reserved mask {~allowed & _MASK64:#x})")
    old_state = _apic_state(old)
    new_state = _apic_state(new)
    if new_state == "invalid":
        raise GeneralProtection("IA32_APIC_BASE: EXTD=1 with EN=0 is an invalid state")
    if old_state == "x2apic" and new_state == "xapic":
        raise GeneralProtection("IA32_APIC_BASE: x2APIC -> xAPIC directly is illegal "
                                "(go through disabled)")
    if old_state == "disabled" and new_state == "x2apic":
        raise GeneralProtection("IA32_APIC_BASE: disabled -> x2APIC directly is illegal "
                                "(enable xAPIC first)")


def _apic_state(value: int) -> str:
    en = bool(value & MSR_IA32_APICBASE_ENABLE)
    extd = bool(value & MSR_IA32_APICBASE_EXTD)
    if en:
        return "x2apic" if extd else "xapic"
    return "invalid" if extd else "disabled"


def _highest(bits: int) -> int:
    """Highest set bit number of a 256-bit register, 0 when empty."""
    return bits.bit_length() - 1 if bits else 0


# --------------------------------------------------------------------------
# The local APIC
# --------------------------------------------------------------------------

class LocalApic:
    """The local APIC of one core.

    ``apic_id`` is the (x2)APIC ID (0 .. 0xFFFFFFFE; the xAPIC ID is its low
    8 bits), ``now`` returns this core's virtual time in ns, ``bus`` is the
    :class:`ApicBus` the APIC attaches itself to.  ``bsp`` sets the BSP flag
    of IA32_APIC_BASE.  The APIC starts as after RESET: xAPIC mode
    (EN=1, EXTD=0) at base 0xFEE00000, software-disabled (SVR = 0xFF).
    """

    def __init__(self, apic_id: int, now: Callable[[], int], bus: "ApicBus",
                 *, bsp: bool = False, maxphyaddr: int = MAXPHYADDR):
        if not isinstance(apic_id, int) or not 0 <= apic_id < X2APIC_BROADCAST:
            raise ValueError(f"APIC ID must be in 0..0xFFFFFFFE, got {apic_id!r}")
        self.apic_id = apic_id
        self._now = now
        self.bus = bus
        self.maxphyaddr = maxphyaddr
        self._apic_base = (APIC_DEFAULT_PHYS_BASE | MSR_IA32_APICBASE_ENABLE
                           | (MSR_IA32_APICBASE_BSP if bsp else 0))
        self._nmi = False
        self._init = False
        self._sipi: Optional[int] = None
        self._last_update = now()
        self._reset_registers()
        bus.attach(self)

    def __repr__(self) -> str:
        mode = "x2apic" if self.x2apic_enabled else "xapic" if self.xapic_enabled else "disabled"
        return f"<LocalApic id={self.apic_id} {mode} irr={self._irr:#x} isr={self._isr:#x}>"

    # ----- state ---------------------------------------------------------

    def _reset_registers(self) -> None:
        """Every register but the ID and IA32_APIC_BASE to its power-up value."""
        self._tpr = 0
        self._ldr = 0
        self._dfr = _MASK32
        self._svr = 0xFF
        self._isr = 0
        self._tmr = 0
        self._irr = 0
        self._esr = 0
        self._esr_pending = 0
        self._icr = 0                     # x2APIC layout: destination in 63:32
        self._icr2 = 0                    # xAPIC ICR high (bits 31:24 = destination)
        self._lvt = {name: APIC_LVT_MASKED for name in _LVT_NAMES}
        self._tdcr = 0
        self._div = timer_divider(0)
        self._tmict = 0
        self._t_base = 0                  # timer: time of the last (re)base
        self._count_base = 0              # timer: count at _t_base
        self._next_fire: Optional[int] = None
        self._deadline = 0

    def reset(self) -> None:
        """RESET: back to xAPIC mode at the default base, all registers at
        their power-up values, nothing pending."""
        self._apic_base = (APIC_DEFAULT_PHYS_BASE | MSR_IA32_APICBASE_ENABLE
                           | (self._apic_base & MSR_IA32_APICBASE_BSP))
        self._nmi = self._init = False
        self._sipi = None
        self._reset_registers()

    def init_reset(self) -> None:
        """The APIC part of an INIT: every register but the ID is initialized;
        the mode (IA32_APIC_BASE) is unchanged (SDM "x2APIC State Transitions").
        A pending SIPI is kept (see the module docstring)."""
        self._reset_registers()

    @property
    def x2apic_enabled(self) -> bool:
        return _apic_state(self._apic_base) == "x2apic"

    @property
    def xapic_enabled(self) -> bool:
        return _apic_state(self._apic_base) == "xapic"

    @property
    def hw_enabled(self) -> bool:
        """IA32_APIC_BASE.EN."""
        return bool(self._apic_base & MSR_IA32_APICBASE_ENABLE)

    @property
    def sw_enabled(self) -> bool:
        """SVR bit 8 (APIC software enable)."""
        return bool(self._svr & APIC_SPIV_APIC_ENABLED)

    @property
    def mmio_base(self) -> int:
        """Physical address of the xAPIC register page (IA32_APIC_BASE[MAXPHYADDR-1:12])."""
        return self._apic_base & ~0xFFF & ((1 << self.maxphyaddr) - 1)

    @property
    def ldr(self) -> int:
        """The logical destination register as the current mode shows it."""
        return x2apic_logical_id(self.apic_id) if self.x2apic_enabled else self._ldr

    @property
    def dfr(self) -> int:
        return self._dfr

    @property
    def irr(self) -> int:
        """IRR as a 256-bit integer (bit n = vector n)."""
        return self._irr

    @property
    def isr(self) -> int:
        return self._isr

    @property
    def tpr(self) -> int:
        return self._tpr

    @tpr.setter
    def tpr(self, value: int) -> None:
        if not 0 <= value <= 0xFF:
            raise ValueError(f"TPR is 8 bits, got {value:#x}")
        self._tpr = value

    def exchange_tpr(self, value: int) -> int:
        """TPR := ``value`` (8 bits, not checked); returns the previous TPR."""
        old = self._tpr
        self._tpr = value
        return old

    @property
    def ppr(self) -> int:
        return compute_ppr(self._tpr, _highest(self._isr))

    def read_cr8(self) -> int:
        """CR8 = TPR[7:4] (SDM "Task Priority in IA-32e Mode")."""
        return self._tpr >> 4

    def write_cr8(self, value: int) -> None:
        """MOV to CR8: TPR[7:4] = value[3:0], TPR[3:0] = 0; bits 63:4 set -> #GP."""
        if not 0 <= value <= 0xF:
            raise GeneralProtection(f"MOV to CR8 with reserved bits set: {value:#x}")
        self._tpr = value << 4

    # ----- pending NMI / INIT / SIPI --------------------------------------

    @property
    def nmi_pending(self) -> bool:
        return self._nmi

    @property
    def init_pending(self) -> bool:
        return self._init

    @property
    def sipi_pending(self) -> Optional[int]:
        return self._sipi

    def take_nmi(self) -> bool:
        """Consume a pending NMI (NMIs received while one is pending merge)."""
        pending, self._nmi = self._nmi, False
        return pending

    def take_init(self) -> bool:
        pending, self._init = self._init, False
        return pending

    def take_sipi(self) -> Optional[int]:
        """Consume a pending start-up IPI: its vector (the 4 KiB page number
        of the start-up code), or None."""
        vector, self._sipi = self._sipi, None
        return vector

    # ----- interrupt acceptance and arbitration ---------------------------

    def accept(self, vector: int, level: bool = True, trigger_level: bool = False) -> bool:
        """Accept a fixed interrupt into IRR; TMR records its trigger mode.

        ``trigger_level`` False: edge; True: level-triggered, and then
        ``level`` False is a de-assert message, which sets nothing.
        Vectors 0-15 are illegal: the ESR's "receive illegal vector" bit is
        set and the interrupt is dropped.  A hardware- or software-disabled
        APIC drops it too.  Returns whether IRR was set.
        """
        if not 0 <= vector <= 0xFF:
            raise ValueError(f"interrupt vector must be 0..255, got {vector!r}")
        if not self.hw_enabled or not self.sw_enabled:
            return False
        if trigger_level and not level:
            return False
        if vector < 16:
            self._signal_error(APIC_ESR_RECV_ILLEGAL)
            return False
        self._set_irr(vector, trigger_level)
        return True

    def _set_irr(self, vector: int, trigger_level: bool) -> None:
        bit = 1 << vector
        self._irr |= bit
        if trigger_level:
            self._tmr |= bit
        else:
            self._tmr &= ~bit

    def pending_vector(self) -> Optional[int]:
        """The highest IRR vector if its priority class is above PPR's, else None."""
        if not self._irr or not self.hw_enabled:
            return None
        irrv = self._irr.bit_length() - 1
        if priority_class(irrv) > priority_class(self.ppr):
            return irrv
        return None

    def acknowledge(self) -> int:
        """The INTA cycle: move the pending vector from IRR to ISR and return
        it; with nothing deliverable, return the spurious vector (SVR[7:0])
        and leave ISR alone."""
        vector = self.pending_vector()
        if vector is None:
            return self._svr & 0xFF
        bit = 1 << vector
        self._irr &= ~bit
        self._isr |= bit
        return vector

    def eoi(self) -> None:
        """End of interrupt: clear the highest-priority ISR bit.  (A
        level-triggered one would broadcast an EOI message to I/O APICs,
        unless SVR bit 12 suppresses it; there are none here.)"""
        if self._isr:
            self._isr &= ~(1 << (self._isr.bit_length() - 1))

    def _signal_error(self, bits: int) -> None:
        """Record an APIC error and raise the LVT error interrupt if unmasked."""
        self._esr_pending |= bits
        lvt = self._lvt["APIC_LVTERR"]
        if lvt & APIC_LVT_MASKED:
            return
        vector = lvt & 0xFF
        if vector < 16:
            self._esr_pending |= APIC_ESR_RECV_ILLEGAL
            return
        self._set_irr(vector, False)

    def _deliver_local(self, lvt_name: str) -> bool:
        """A local source (timer) fires through its LVT entry (fixed delivery)."""
        lvt = self._lvt[lvt_name]
        if lvt & APIC_LVT_MASKED:
            return False
        vector = lvt & 0xFF
        if vector < 16:
            self._signal_error(APIC_ESR_RECV_ILLEGAL)
            return False
        self._set_irr(vector, False)
        return True

    # ----- timer ------------------------------------------------------------

    @property
    def timer_mode(self) -> int:
        """LVT timer bits 18:17: 0 one-shot, 1 periodic, 2 TSC-deadline."""
        return (self._lvt["APIC_LVTT"] >> APIC_LVT_TIMER_MODE_SHIFT) & 3

    def _timer_count(self, t: int) -> int:
        """TMCCT at time ``t`` (0 when stopped, expired one-shot, or TSC-deadline mode)."""
        mode = self.timer_mode
        if mode == TIMER_TSCDEADLINE or self._tmict == 0:
            return 0
        ticks = max(0, t - self._t_base) // self._div
        if ticks < self._count_base:
            return self._count_base - ticks
        if mode == TIMER_PERIODIC:
            return self._tmict - (ticks - self._count_base) % self._tmict
        return 0

    def _arm_count(self, t: int, count: int) -> None:
        self._t_base = t
        self._count_base = count
        self._next_fire = t + count * self._div if count else None

    def _disarm(self) -> None:
        self._tmict = 0
        self._count_base = 0
        self._next_fire = None
        self._deadline = 0

    def next_event_ns(self) -> Optional[int]:
        """Absolute virtual ns of the next timer expiry that would raise an
        interrupt (None: no armed, unmasked timer).  It may lie in the past
        if :meth:`update` has not been called since."""
        if not self.hw_enabled or self._lvt["APIC_LVTT"] & APIC_LVT_MASKED:
            return None
        if self.timer_mode == TIMER_TSCDEADLINE:
            return self._deadline or None
        return self._next_fire

    def update(self, now_ns: int) -> bool:
        """Fire the timers that expired by ``now_ns``: set IRR unless the LVT
        timer is masked; a periodic timer reloads on its original schedule
        (no drift; expiries missed since the last update merge into one IRR
        bit), a one-shot stops, a TSC deadline disarms and clears itself.
        Returns whether an interrupt was raised."""
        if now_ns < self._last_update:
            return False
        self._last_update = now_ns
        fired = False
        if self._next_fire is not None and now_ns >= self._next_fire:
            if self.timer_mode == TIMER_PERIODIC:
                period = self._tmict * self._div
                missed = (now_ns - self._next_fire) // period + 1
                self._next_fire += missed * period
            else:
                self._next_fire = None
            fired = self._deliver_local("APIC_LVTT")
        if (self._deadline and self.timer_mode == TIMER_TSCDEADLINE
                and now_ns >= self._deadline):
            self._deadline = 0
            fired = self._deliver_local("APIC_LVTT") or fired
        return fired

    def _sync(self) -> int:
        t = self._now()
        self.update(t)
        return t

    def read_tsc_deadline(self) -> int:
        """IA32_TSC_DEADLINE: the armed deadline, 0 if disarmed or not in
        TSC-deadline mode."""
        self._sync()
        return self._deadline if self.timer_mode == TIMER_TSCDEADLINE else 0

    def write_tsc_deadline(self, value: int) -> None:
        """Arm (non-zero) or disarm (0) the TSC-deadline timer; ignored
        outside TSC-deadline mode.  A deadline already passed fires at once."""
        if not 0 <= value <= _MASK64:
            raise ValueError(f"IA32_TSC_DEADLINE value out of 64-bit range: {value:#x}")
        self._sync()
        if self.timer_mode != TIMER_TSCDEADLINE or not self.hw_enabled:
            return
        self._deadline = value
        self.update(self._last_update)

    # ----- IA32_APIC_BASE -------------------------------------------------

    def write_apic_base(self, value: int) -> None:
        """WRMSR IA32_APIC_BASE with the SDM's transition rules."""
        apic_base_write_check(self._apic_base, value, self.maxphyaddr)
        self._sync()
        old_state = _apic_state(self._apic_base)
        new = (value & ~MSR_IA32_APICBASE_BSP) | (self._apic_base & MSR_IA32_APICBASE_BSP)
        new_state = _apic_state(new)
        self._apic_base = new
        if new_state == "disabled" and old_state != "disabled":
            # All APIC state but the ID is lost; back to power-up values.
            self._reset_registers()
            self._nmi = self._init = False
            self._sipi = None

    # ----- x2APIC MSR interface -------------------------------------------

    def rdmsr(self, index: int) -> int:
        """RDMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register."""
        if index == MSR_IA32_APICBASE:
            return self._apic_base
        if index == MSR_IA32_TSC_DEADLINE:
            return self.read_tsc_deadline()
        reg = self._x2apic_reg(index)
        if "r" not in reg.msr_access:
            raise GeneralProtection(f"RDMSR of write-only x2APIC register {reg.x2apic_name}")
        if reg.name == "APIC_ICR":
            return self._icr
        return self._read_reg(reg)

    def wrmsr(self, index: int, value: int) -> None:
        """WRMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register."""
        if not 0 <= value <= _MASK64:
            raise ValueError(f"MSR value out of 64-bit range: {value:#x}")
        if index == MSR_IA32_APICBASE:
            self.write_apic_base(value)
            return
        if index == MSR_IA32_TSC_DEADLINE:
            self.write_tsc_deadline(value)
            return
        reg = self._x2apic_reg(index)
        if "w" not in reg.msr_access:
            raise GeneralProtection(f"WRMSR to read-only x2APIC register {reg.x2apic_name}")
        reserved = value & ~(reg.writable | reg.ignored) & _MASK64
        if reserved:
            raise GeneralProtection(
                f"WRMSR {reg.x2apic_name} {value:#x}: reserved bits {reserved:#x} set")
        if reg.name == "APIC_LVTT" and (value & APIC_LVT_TIMER_MODE_MASK) == APIC_LVT_TIMER_MODE_MASK:
            raise GeneralProtection(f"WRMSR {reg.x2apic_name} {value:#x}: reserved timer mode 11b")
        if reg.name == "APIC_ICR":
            self._icr = value & ~APIC_ICR_BUSY
            self.bus.send(self, self._icr)
            return
        self._write_reg(reg, value & reg.writable)

    def _x2apic_reg(self, index: int) -> ApicRegister:
        if not APIC_BASE_MSR <= index <= X2APIC_MSR_LAST:
            raise ValueError(f"MSR {index:#x} is not a local APIC MSR")
        if not self.x2apic_enabled:
            raise GeneralProtection(f"x2APIC MSR {index:#x} accessed while not in x2APIC mode")
        reg = APIC_REGISTERS_BY_MSR.get(index)
        if reg is None:
            raise GeneralProtection(f"x2APIC MSR {index:#x} is reserved")
        return reg

    # ----- xAPIC MMIO interface -------------------------------------------

    def mmio_read(self, offset: int, size: int) -> int:
        """Read ``size`` (1, 2, 4, 8) bytes at ``offset`` in the 4 KiB xAPIC page."""
        self._check_mmio(offset, size)
        if not self.xapic_enabled:
            return (1 << (8 * size)) - 1
        result = 0
        pos = 0
        while pos < size:
            addr = offset + pos
            slot, within = addr & ~0xF, addr & 0xF
            take = min(size - pos, 16 - within)
            reg = APIC_REGISTERS_BY_OFFSET.get(slot)
            if reg is None:
                self._signal_error(APIC_ESR_ILLEGAL_REGISTER)
                word = 0
            elif "r" not in reg.access:
                word = 0
            else:
                word = self._read_reg(reg) if reg.name != "APIC_ICR" else self._icr & _MASK32
            chunk = (word.to_bytes(4, "little") + bytes(12))[within:within + take]
            result |= int.from_bytes(chunk, "little") << (8 * pos)
            pos += take
        return result

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """Write ``size`` bytes at ``offset`` in the xAPIC page (only aligned
        32-bit stores to a register slot take effect)."""
        self._check_mmio(offset, size)
        if not 0 <= value < (1 << (8 * size)):
            raise ValueError(f"value {value:#x} does not fit in {size} bytes")
        if not self.xapic_enabled or size != 4 or offset & 0xF:
            return
        reg = APIC_REGISTERS_BY_OFFSET.get(offset)
        if reg is None:
            self._signal_error(APIC_ESR_ILLEGAL_REGISTER)
            return
        if "w" not in reg.access:
            return
        if reg.name == "APIC_LVTT" and (value & APIC_LVT_TIMER_MODE_MASK) == APIC_LVT_TIMER_MODE_MASK:
            return
        if reg.name == "APIC_ICR":
            low = value & reg.writable & _MASK32
            self._icr = (self._icr & ~_MASK32) | low
            # xAPIC layout of the message: destination in bits 63:56.
            self.bus.send(self, (self._icr2 << 32) | low)
            return
        if reg.name == "APIC_ICR2":
            self._icr2 = value & reg.writable
            self._icr = (self._icr & _MASK32) | (self._icr2 << 32)
            return
        self._write_reg(reg, value & reg.writable)

    @staticmethod
    def _check_mmio(offset: int, size: int) -> None:
        if size not in (1, 2, 4, 8):
            raise ValueError(f"xAPIC MMIO access size must be 1, 2, 4 or 8, got {size!r}")
        if offset < 0 or offset + size > 0x1000:
            raise ValueError(f"xAPIC MMIO access {offset:#x}+{size} outside the 4 KiB page")

    # ----- register semantics shared by both interfaces ---------------------

    def _read_reg(self, reg: ApicRegister) -> int:
        name = reg.name
        if name.startswith("APIC_IRR"):
            self._sync()
            return (self._irr >> (32 * int(name[-1]))) & _MASK32
        if name.startswith("APIC_ISR"):
            return (self._isr >> (32 * int(name[-1]))) & _MASK32
        if name.startswith("APIC_TMR"):
            return (self._tmr >> (32 * int(name[-1]))) & _MASK32
        if name in self._lvt:
            return self._lvt[name]
        if name == "APIC_TMCCT":
            return self._timer_count(self._sync())
        if name == "APIC_ID":
            return self.apic_id if self.x2apic_enabled else (self.apic_id & 0xFF) << 24
        if name == "APIC_LVR":
            return APIC_VERSION_VALUE
        if name == "APIC_TASKPRI":
            return self._tpr
        if name == "APIC_PROCPRI":
            return self.ppr
        if name == "APIC_ARBPRI":
            return compute_apr(self._tpr, _highest(self._isr), _highest(self._irr))
        if name == "APIC_LDR":
            return self.ldr
        if name == "APIC_DFR":
            return self._dfr
        if name == "APIC_SPIV":
            return self._svr
        if name == "APIC_ESR":
            return self._esr
        if name == "APIC_ICR2":
            return self._icr2
        if name == "APIC_TMICT":
            return self._tmict
        if name == "APIC_TDCR":
            return self._tdcr
        if name == "APIC_EOI":
            return 0
        raise AssertionError(f"unhandled APIC register read {name}")

    def _write_reg(self, reg: ApicRegister, value: int) -> None:
        name = reg.name
        if name == "APIC_EOI":
            self.eoi()
        elif name == "APIC_TASKPRI":
            self._tpr = value
        elif name in self._lvt:
            self._write_lvt(name, value)
        elif name == "APIC_TMICT":
            t = self._sync()
            if self.timer_mode in (TIMER_ONESHOT, TIMER_PERIODIC):
                self._tmict = value
                self._arm_count(t, value)
        elif name == "APIC_TDCR":
            self._write_tdcr(value)
        elif name == "APIC_SPIV":
            self._svr = value
            if not value & APIC_SPIV_APIC_ENABLED:
                self._sync()
                for lvt in self._lvt:
                    self._lvt[lvt] |= APIC_LVT_MASKED
        elif name == "APIC_ESR":
            self._esr = self._esr_pending
            self._esr_pending = 0
        elif name == "APIC_LDR":
            self._ldr = value
        elif name == "APIC_DFR":
            self._dfr = value | 0x0FFFFFFF
        elif name == "APIC_SELF_IPI":
            if value < 16:
                self._signal_error(APIC_ESR_SEND_ILLEGAL)
            else:
                self.accept(value)
        else:
            raise AssertionError(f"unhandled APIC register write {name}")

    def _write_lvt(self, name: str, value: int) -> None:
        self._sync()
        if not self.sw_enabled:
            value |= APIC_LVT_MASKED
        old = self._lvt[name]
        self._lvt[name] = value
        if name == "APIC_LVTT" and (old ^ value) & APIC_LVT_TIMER_MODE_MASK:
            self._disarm()

    def _write_tdcr(self, value: int) -> None:
        t = self._sync()
        new_div = timer_divider(value)
        if self._next_fire is not None and self.timer_mode in (TIMER_ONESHOT, TIMER_PERIODIC):
            # Keep the count reached so far; continue from the last tick at the new rate.
            ticks = max(0, t - self._t_base) // self._div
            boundary = self._t_base + ticks * self._div
            count = self._timer_count(t)
            self._tdcr = value
            self._div = new_div
            self._arm_count(boundary, count)
        else:
            self._tdcr = value
            self._div = new_div


# --------------------------------------------------------------------------
# The APIC bus
# --------------------------------------------------------------------------

class ApicBus:
    """Every local APIC of the machine, by APIC ID, and IPI delivery.

    ``on_deliver`` (set by the machine; None by default) is called with the
    target's APIC ID after an IPI has been delivered to a core other than the
    sender, so the scheduler can wake it.
    """

    def __init__(self) -> None:
        self.apics: Dict[int, LocalApic] = {}
        self.on_deliver: Optional[Callable[[int], None]] = None

    def attach(self, apic: LocalApic) -> None:
        if apic.apic_id in self.apics:
            raise ValueError(f"APIC ID {apic.apic_id} is already on the bus")
        self.apics[apic.apic_id] = apic

    def __getitem__(self, apic_id: int) -> LocalApic:
        return self.apics[apic_id]

    def send(self, source: LocalApic, icr_value: int) -> None:
        """Send the IPI described by an ICR value written by ``source``.

        The destination is bits 63:32 if ``source`` is in x2APIC mode, bits
        63:56 otherwise (xAPIC).  See the module docstring for the modelled
        choices (lowest priority, invalid combinations, illegal vectors).
        """
        vector = icr_value & APIC_VECTOR_MASK
        mode = (icr_value >> APIC_DM_SHIFT) & 7
        shorthand = (icr_value >> APIC_SHORT_SHIFT) & 3
        if mode == APIC_DM_INIT and not icr_value & APIC_INT_ASSERT \
                and icr_value & APIC_INT_LEVELTRIG:
            return                                          # INIT level de-assert
        if mode not in (APIC_DM_FIXED, APIC_DM_LOWEST, APIC_DM_NMI, APIC_DM_INIT,
                        APIC_DM_STARTUP):
            return                                          # SMI, reserved modes
        if shorthand in (APIC_DEST_SELF, APIC_DEST_ALLINC) and mode != APIC_DM_FIXED:
            return                                          # invalid combination
        if mode in (APIC_DM_FIXED, APIC_DM_LOWEST) and vector < 16:
            source._signal_error(APIC_ESR_SEND_ILLEGAL)
            return
        targets = self._targets(source, icr_value, shorthand)
        if mode == APIC_DM_LOWEST:
            # Delivered as fixed to the lowest APIC ID that can accept it.
            targets = [t for t in targets if t.sw_enabled][:1]
        for target in targets:
            if mode in (APIC_DM_FIXED, APIC_DM_LOWEST):
                delivered = target.accept(vector)
            elif mode == APIC_DM_NMI:
                target._nmi = delivered = True
            elif mode == APIC_DM_INIT:
                target._init = delivered = True
            else:
                target._sipi = vector
                delivered = True
            if delivered and target is not source and self.on_deliver is not None:
                self.on_deliver(target.apic_id)

    def _targets(self, source: LocalApic, icr_value: int, shorthand: int) -> List[LocalApic]:
        """Destination APICs (hardware-enabled only), by ascending APIC ID."""
        if shorthand == APIC_DEST_SELF:
            candidates = [source]
        elif shorthand == APIC_DEST_ALLBUT:
            candidates = [a for a in self.apics.values() if a is not source]
        elif shorthand == APIC_DEST_ALLINC:
            candidates = list(self.apics.values())
        else:
            x2 = source.x2apic_enabled
            dest = (icr_value >> 32) & _MASK32 if x2 else (icr_value >> 56) & 0xFF
            logical = bool(icr_value & APIC_DEST_LOGICAL)
            candidates = [a for a in self.apics.values()
                          if _matches(a, dest, logical, x2)]
        return sorted((a for a in candidates if a.hw_enabled), key=lambda a: a.apic_id)


def _matches(target: LocalApic, dest: int, logical: bool, x2apic_format: bool) -> bool:
    """Whether ``target`` is a destination of ``dest`` in the sender's format."""
    if x2apic_format:
        if dest == X2APIC_BROADCAST:
            return True
        if not logical:
            return target.apic_id == dest
        ldr = x2apic_logical_id(target.apic_id)
        return (ldr >> 16) == (dest >> 16) and bool(ldr & dest & 0xFFFF)
    if dest == XAPIC_BROADCAST:
        return True
    if not logical:
        return target.apic_id == dest
    logical_id = (target.ldr >> 24) & 0xFF
    if (target.dfr >> 28) == 0xF:                           # flat model
        return bool(logical_id & dest)
    # cluster model: cluster in bits 7:4 (15 = all clusters), members in 3:0
    cluster_ok = (dest >> 4) == 0xF or (dest >> 4) == (logical_id >> 4)
    return cluster_ok and bool(logical_id & dest & 0xF)
