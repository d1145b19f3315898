"""The platform MSR table: every MSR the modelled machine implements.

One row per MSR (:class:`MsrInfo`): number, name as in Linux's
``arch/x86/include/asm/msr-index.h`` (the x2APIC registers as ``X2APIC_<reg>``
after apicdef.h's ``APIC_<reg>``, e.g. X2APIC_EOI 0x80B, X2APIC_IRR0 0x820,
X2APIC_ICR 0x830, X2APIC_TMICT 0x838; they come from
:data:`devirt_emu.platform.lapic.APIC_REGISTERS`), its owner, its reset value
and its writable bits.

Owners: how the platform implements the MSR.

* ``"cpu"``: Unicorn holds it, with its side effects (EFER, PAT, FS/GS base,
  the SYSCALL and SYSENTER MSRs, TSC_AUX);
* ``"lapic"``: the core's :class:`~devirt_emu.platform.lapic.LocalApic`
  (``rdmsr``/``wrmsr``): IA32_APIC_BASE, IA32_TSC_DEADLINE, the x2APIC range;
* ``"tsc"``: the virtual time stamp counter (1 GHz: TSC == virtual ns);
* ``"store"``: plain storage, no side effect (MTRRs, MISC_ENABLE,
  FEATURE_CONTROL);
* ``"vmx"``: the VMX capability MSRs, read-only; their values come from the
  CPU model (:func:`read_vmx_capability`; the model also decides whether an
  optional one, such as PROCBASED_CTLS3 or VMFUNC, exists).  This table holds
  their number and name only (``reset`` is None).

With a CPU model given (``check_read(index, model)``), an MSR the model does
not have (``CpuModel.absent_msrs``, a VMX capability MSR it does not list)
raises #GP too; :func:`reset_value` applies the model's reset values.

:func:`msr_info` returns None for an MSR the machine does not implement: the
core raises #GP, as hardware does (Unicorn alone would read 0).  The
paravirtual KVM MSRs (0x4B564D00-0x4B564DFF, :data:`MSR_RANGES`) are not
implemented by the physical machine either: under a hypervisor they always
exit to the L0 model, which owns them; natively they #GP.

:func:`check_write` applies the value rules of a WRMSR (reserved bits,
canonical addresses, memory types, the IA32_APIC_BASE transitions and the
IA32_FEATURE_CONTROL lock when the current value is given) and raises
:class:`~devirt_emu.platform.lapic.GeneralProtection`.  For the x2APIC range
it checks the value only: whether the APIC is in x2APIC mode is state the
LocalApic checks itself on ``wrmsr``.

The modelled CPU is an Intel one with 48-bit linear addresses (no LA57) and
MAXPHYADDR = :data:`~devirt_emu.platform.lapic.MAXPHYADDR`; EFER.SVME is
reserved; SMX is not modelled (IA32_FEATURE_CONTROL bit 1 is reserved).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from devirt_emu.x86 import EFER_LMA, EFER_LME, EFER_NX, EFER_SCE, MSR_EFER
from devirt_emu.platform.lapic import (
    APIC_REGISTERS, APIC_VERSION_VALUE, MAXPHYADDR, GeneralProtection, apic_base_write_check,
)

__all__ = ["MsrInfo", "MsrRange", "MSR_TABLE", "MSRS_BY_INDEX", "MSRS_BY_NAME",
           "MSR_RANGES", "msr_info", "msr_index", "msr_range", "check_write",
           "check_read", "is_canonical", "GeneralProtection", "reset_value", "read_vmx_capability"]

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
_PHYS_PAGE_BITS = ((1 << MAXPHYADDR) - 1) & ~0xFFF   # bits 12 .. MAXPHYADDR-1

Rule = Callable[[int], Optional[str]]


@dataclass(frozen=True)
class MsrInfo:
    """One MSR of the modelled machine.

    ``writable``: bits a WRMSR may set (any other bit set raises #GP);
    ``ignored``: read-only bits a WRMSR may carry, which keep their value;
    ``access``: "rw", "r" (any WRMSR raises #GP) or "w" (RDMSR raises #GP);
    ``reset``: value after RESET (None: per core, or modelled elsewhere);
    ``rule``: further value check, returning an error text or None.
    """

    index: int
    name: str
    owner: str
    reset: Optional[int]
    writable: int
    access: str = "rw"
    ignored: int = 0
    rule: Optional[Rule] = None


@dataclass(frozen=True)
class MsrRange:
    """A named range of MSR numbers with one owner."""

    name: str
    first: int
    last: int
    owner: str

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and self.first <= index <= self.last


# --------------------------------------------------------------------------
# Value rules (small pure functions)
# --------------------------------------------------------------------------

def is_canonical(address: int) -> bool:
    """48-bit canonical form: bits 63:47 all equal."""
    top = address >> 47
    return top == 0 or top == (1 << 17) - 1


def _canonical(value: int) -> Optional[str]:
    return None if is_canonical(value) else f"{value:#x} is not a canonical address"


_PAT_TYPES = frozenset({0, 1, 4, 5, 6, 7})      # UC, WC, WT, WP, WB, UC-
_MTRR_TYPES = frozenset({0, 1, 4, 5, 6})        # UC, WC, WT, WP, WB


def _bytes_of(value: int, count: int = 8):
    return [(value >> (8 * i)) & 0xFF for i in range(count)]


def _pat_types(value: int) -> Optional[str]:
    bad = [i for i, t in enumerate(_bytes_of(value)) if t not in _PAT_TYPES]
    return f"PAT entries {bad} hold an invalid memory type" if bad else None


def _mtrr_fixed_types(value: int) -> Optional[str]:
    bad = [i for i, t in enumerate(_bytes_of(value)) if t not in _MTRR_TYPES]
    return f"fixed-range MTRR fields {bad} hold an invalid memory type" if bad else None


def _mtrr_type_byte(value: int) -> Optional[str]:
    t = value & 0xFF
    return None if t in _MTRR_TYPES else f"memory type {t} is invalid for an MTRR"


# --------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------

FEATURE_CONTROL_LOCKED = 1 << 0
FEATURE_CONTROL_VMXON_OUTSIDE_SMX = 1 << 2

MISC_ENABLE_FAST_STRING = 1 << 0
MISC_ENABLE_EMON = 1 << 7
MISC_ENABLE_BTS_UNAVAIL = 1 << 11
MISC_ENABLE_PEBS_UNAVAIL = 1 << 12
MISC_ENABLE_MWAIT = 1 << 18
MISC_ENABLE_LIMIT_CPUID = 1 << 22
MISC_ENABLE_XTPR_DISABLE = 1 << 23
MISC_ENABLE_XD_DISABLE = 1 << 34

PAT_RESET = 0x0007040600070406
MTRRCAP_VALUE = 8 | (1 << 8) | (1 << 10)          # VCNT = 8, fixed ranges, WC


def _core_msrs() -> Tuple[MsrInfo, ...]:
    rows = [
        MsrInfo(0x10, "MSR_IA32_TSC", "tsc", 0, _MASK64),
        MsrInfo(0x1B, "MSR_IA32_APICBASE", "lapic", 0xFEE00900,
                MSR_IA32_APICBASE_WRITABLE, ignored=1 << 8),
        MsrInfo(0x3A, "MSR_IA32_FEATURE_CONTROL", "store",
                FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMXON_OUTSIDE_SMX,
                FEATURE_CONTROL_LOCKED | FEATURE_CONTROL_VMXON_OUTSIDE_SMX),
        MsrInfo(0xFE, "MSR_MTRRcap", "store", MTRRCAP_VALUE, 0, access="r"),
        MsrInfo(0x174, "MSR_IA32_SYSENTER_CS", "cpu", 0, _MASK64),
        MsrInfo(0x175, "MSR_IA32_SYSENTER_ESP", "cpu", 0, _MASK64, rule=_canonical),
        MsrInfo(0x176, "MSR_IA32_SYSENTER_EIP", "cpu", 0, _MASK64, rule=_canonical),
        MsrInfo(0x1A0, "MSR_IA32_MISC_ENABLE", "store",
                MISC_ENABLE_FAST_STRING | MISC_ENABLE_BTS_UNAVAIL | MISC_ENABLE_PEBS_UNAVAIL,
                MISC_ENABLE_FAST_STRING | MISC_ENABLE_MWAIT | MISC_ENABLE_LIMIT_CPUID
                | MISC_ENABLE_XTPR_DISABLE | MISC_ENABLE_XD_DISABLE,
                ignored=MISC_ENABLE_EMON | MISC_ENABLE_BTS_UNAVAIL | MISC_ENABLE_PEBS_UNAVAIL),
        MsrInfo(0x277, "MSR_IA32_CR_PAT", "cpu", PAT_RESET, 0x0707070707070707,
                rule=_pat_types),
        MsrInfo(0x2FF, "MSR_MTRRdefType", "store", 0, 0xFF | (1 << 10) | (1 << 11),
                rule=_mtrr_type_byte),
        MsrInfo(0x6E0, "MSR_IA32_TSC_DEADLINE", "lapic", 0, _MASK64),
        MsrInfo(MSR_EFER, "MSR_EFER", "cpu", 0, EFER_SCE | EFER_LME | EFER_NX,
                ignored=EFER_LMA),
        MsrInfo(0xC0000081, "MSR_STAR", "cpu", 0, _MASK64),
        MsrInfo(0xC0000082, "MSR_LSTAR", "cpu", 0, _MASK64, rule=_canonical),
        MsrInfo(0xC0000083, "MSR_CSTAR", "cpu", 0, _MASK64, rule=_canonical),
        MsrInfo(0xC0000084, "MSR_SYSCALL_MASK", "cpu", 0, _MASK32),
        MsrInfo(0xC0000100, "MSR_FS_BASE", "cpu", 0, _MASK64, rule=_canonical),
        MsrInfo(0xC0000101, "MSR_GS_BASE", "cpu", 0, _MASK64, rule=_canonical),
        MsrInfo(0xC0000102, "MSR_KERNEL_GS_BASE", "cpu", 0, _MASK64, rule=_canonical),
        MsrInfo(0xC0000103, "MSR_TSC_AUX", "cpu", 0, _MASK32),
    ]
    for n in range(8):
        rows.append(MsrInfo(0x200 + 2 * n, f"MSR_MTRRphysBase{n}", "store", 0,
                            0xFF | _PHYS_PAGE_BITS, rule=_mtrr_type_byte))
        rows.append(MsrInfo(0x201 + 2 * n, f"MSR_MTRRphysMask{n}", "store", 0,
                            (1 << 11) | _PHYS_PAGE_BITS))
    fixed = [(0x250, "MSR_MTRRfix64K_00000"), (0x258, "MSR_MTRRfix16K_80000"),
             (0x259, "MSR_MTRRfix16K_A0000")]
    fixed += [(0x268 + i, f"MSR_MTRRfix4K_{0xC0000 + 0x8000 * i:05X}") for i in range(8)]
    for index, name in fixed:
        rows.append(MsrInfo(index, name, "store", 0, _MASK64, rule=_mtrr_fixed_types))
    return tuple(rows)


MSR_IA32_APICBASE_WRITABLE = (1 << 10) | (1 << 11) | _PHYS_PAGE_BITS

_VMX_CAPABILITY_NAMES = (
    "MSR_IA32_VMX_BASIC", "MSR_IA32_VMX_PINBASED_CTLS", "MSR_IA32_VMX_PROCBASED_CTLS",
    "MSR_IA32_VMX_EXIT_CTLS", "MSR_IA32_VMX_ENTRY_CTLS", "MSR_IA32_VMX_MISC",
    "MSR_IA32_VMX_CR0_FIXED0", "MSR_IA32_VMX_CR0_FIXED1", "MSR_IA32_VMX_CR4_FIXED0",
    "MSR_IA32_VMX_CR4_FIXED1", "MSR_IA32_VMX_VMCS_ENUM", "MSR_IA32_VMX_PROCBASED_CTLS2",
    "MSR_IA32_VMX_EPT_VPID_CAP", "MSR_IA32_VMX_TRUE_PINBASED_CTLS",
    "MSR_IA32_VMX_TRUE_PROCBASED_CTLS", "MSR_IA32_VMX_TRUE_EXIT_CTLS",
    "MSR_IA32_VMX_TRUE_ENTRY_CTLS", "MSR_IA32_VMX_VMFUNC", "MSR_IA32_VMX_PROCBASED_CTLS3",
)


def _vmx_msrs() -> Tuple[MsrInfo, ...]:
    return tuple(MsrInfo(0x480 + i, name, "vmx", None, 0, access="r")
                 for i, name in enumerate(_VMX_CAPABILITY_NAMES))


_X2APIC_RESET = {"APIC_LVR": APIC_VERSION_VALUE, "APIC_SPIV": 0xFF}


def _lvtt_mode(value: int) -> Optional[str]:
    return "timer mode 11b is reserved" if (value >> 17) & 3 == 3 else None


def _x2apic_msrs() -> Tuple[MsrInfo, ...]:
    rows = []
    for reg in APIC_REGISTERS:
        if not reg.x2apic:
            continue
        if reg.name in ("APIC_ID", "APIC_LDR"):
            reset: Optional[int] = None                   # per core: from the APIC ID
        elif reg.name.startswith("APIC_LVT"):
            reset = 1 << 16                               # masked
        else:
            reset = _X2APIC_RESET.get(reg.name, 0)
        access = reg.msr_access
        rows.append(MsrInfo(reg.msr, reg.x2apic_name, "lapic", reset,
                            reg.writable if "w" in access else 0,
                            access=access, ignored=reg.ignored,
                            rule=_lvtt_mode if reg.name == "APIC_LVTT" else None))
    return tuple(rows)


#: Every MSR of the modelled machine, ascending by number.
MSR_TABLE: Tuple[MsrInfo, ...] = tuple(sorted(_core_msrs() + _vmx_msrs() + _x2apic_msrs(),
                                              key=lambda m: m.index))
MSRS_BY_INDEX: Dict[int, MsrInfo] = {m.index: m for m in MSR_TABLE}
MSRS_BY_NAME: Dict[str, MsrInfo] = {m.name: m for m in MSR_TABLE}
assert len(MSRS_BY_INDEX) == len(MSR_TABLE) == len(MSRS_BY_NAME), "duplicate MSR rows"

#: Named ranges.  X2APIC: the registers inside are rows of MSR_TABLE (the
#: rest of the range #GPs).  KVM_PV: KVM's paravirtual MSRs ("KVM" in ASCII,
#: 0x4B564D..), owned by the hypervisor model, absent on the machine.
MSR_RANGES: Tuple[MsrRange, ...] = (
    MsrRange("X2APIC", 0x800, 0x8FF, "lapic"),
    MsrRange("KVM_PV", 0x4B564D00, 0x4B564DFF, "hypervisor"),
)


def msr_info(index: int) -> Optional[MsrInfo]:
    """The MSR's row, or None if the machine does not implement it (#GP)."""
    return MSRS_BY_INDEX.get(index)


def msr_index(name: str) -> int:
    """The number of an MSR by its name (``"X2APIC_EOI"`` -> 0x80B)."""
    try:
        return MSRS_BY_NAME[name].index
    except KeyError:
        raise KeyError(f"no MSR named {name!r} in the platform MSR table") from None


def msr_range(index: int) -> Optional[MsrRange]:
    """The named range holding ``index``, if any."""
    for rng in MSR_RANGES:
        if index in rng:
            return rng
    return None


#: MSRs that exist only with a CPUID feature (SDM Vol. 4, Table 2-2): the
#: TSC-deadline MSR with CPUID.01H:ECX[24], the x2APIC registers with ECX[21].
_CPUID_GATED = ((0x6E0, 0x6E0, "tsc_deadline_timer"), (0x800, 0x8FF, "x2apic"))


def _absent(index: int, model) -> bool:
    """Does the CPU model lack this platform MSR (its ``absent_msrs``, a VMX
    capability MSR its table does not list, an MSR of a CPUID feature it does
    not advertise)?"""
    if model is None:
        return False
    if 0x480 <= index <= 0x493:
        return index not in model.vmx_msrs
    for first, last, feature in _CPUID_GATED:
        if first <= index <= last:
            return feature not in model.features
    return index in model.absent_msrs


def reset_value(info: MsrInfo, model=None) -> Optional[int]:
    """The MSR's value after RESET on a CPU model (its ``msrs`` override the table)."""
    if model is not None and info.index in model.msrs:
        return model.msrs[info.index]
    return info.reset


def read_vmx_capability(index: int, model=None) -> int:
    """The value of VMX capability MSR ``index`` on a CPU model (a CpuModel, a
    spec string or None for the default); GeneralProtection if the model does
    not have it (SDM Vol. 3D, Appendix A: an optional MSR exists only with the
    controls that use it; RDMSR of a missing one raises #GP)."""
    from devirt_emu.cpumodels import get_model
    m = get_model(model)
    if index not in m.vmx_msrs:
        raise GeneralProtection(f"RDMSR of VMX capability MSR {index:#x}, which {m.name} "
                                "does not have")
    return m.vmx_msrs[index]


def check_read(index: int, model=None) -> MsrInfo:
    """RDMSR rules: raise GeneralProtection for a missing or write-only MSR
    (missing from the table, or from the CPU ``model`` when given); return its
    row otherwise."""
    info = MSRS_BY_INDEX.get(index)
    if info is None or _absent(index, model):
        raise GeneralProtection(f"RDMSR of unimplemented MSR {index:#x}")
    if "r" not in info.access:
        raise GeneralProtection(f"RDMSR of write-only MSR {info.name}")
    return info


def check_write(index: int, value: int, current: Optional[int] = None, model=None) -> MsrInfo:
    """WRMSR rules: raise GeneralProtection if writing ``value`` is refused
    (missing or read-only MSR, reserved bit set, value rule broken; with the
    ``current`` value given, also IA32_APIC_BASE's illegal transitions and a
    write to a locked IA32_FEATURE_CONTROL).  Return the row otherwise."""
    if not isinstance(value, int) or not 0 <= value <= _MASK64:
        raise ValueError(f"WRMSR value must be a 64-bit unsigned integer, got {value!r}")
    info = MSRS_BY_INDEX.get(index)
    if info is None or _absent(index, model):
        raise GeneralProtection(f"WRMSR to unimplemented MSR {index:#x}")
    if "w" not in info.access:
        raise GeneralProtection(f"WRMSR to read-only MSR {info.name}")
    reserved = value & ~(info.writable | info.ignored) & _MASK64
    if reserved:
        raise GeneralProtection(f"WRMSR {info.name} {value:#x}: reserved bits {reserved:#x} set")
    if info.rule is not None:
        problem = info.rule(value)
        if problem:
            raise GeneralProtection(f"WRMSR {info.name}: {problem}")
    if current is not None:
        if info.name == "MSR_IA32_APICBASE":
            apic_base_write_check(current, value)
        elif info.name == "MSR_IA32_FEATURE_CONTROL" and current & FEATURE_CONTROL_LOCKED:
            raise GeneralProtection("WRMSR MSR_IA32_FEATURE_CONTROL: the lock bit is set")
    return info


# Every MSR name as a module attribute (MSR_EFER, X2APIC_EOI, ...), from the table.
globals().update({m.name: m.index for m in MSR_TABLE})
