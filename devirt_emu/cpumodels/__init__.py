"""CPU models as data: what the modelled processor reports and allows.

A :class:`CpuModel` is one table per part: its CPUID leaves, the MSRs it has
(with their reset values), its VMX capability MSRs (Intel; an AMD model has
none), MAXPHYADDR, the linear-address width, the VMX-preemption timer rate,
the TSC frequency, and the set of features those tables advertise.  Every
part of devirt-emu that depends on the processor reads it from the model the
machine was built with (``Machine(cpu=...)``), never from a module constant.

The models live one per module in this package (``skylake_server``, the
default; ``icelake_server``; ``sapphire_rapids``; ``westmere``; ``nehalem``),
each with the vendor documentation it follows in ``sources``.  A model
advertises only what devirt-emu implements: where the part has a feature the
emulator does not give semantics to, the module says so and leaves the bit
clear (the part's table minus the unimplemented features, never a feature the
part lacks).

Choosing a model::

    get_model("skylake-server")                       # a registered model
    get_model("icelake-server,-pcid,+monitor")        # QEMU -cpu syntax
    CpuModel.from_vmx_msrs({0x480: ..., ...})         # a user's MSR dump

Feature names are Linux's: a CPUID feature by its ``/proc/cpuinfo`` flag
(``pcid``, ``x2apic``, ``pdpe1gb``), a VMX capability by its ``vmx.h`` /
``msr-index.h`` constant (``SECONDARY_EXEC_UNRESTRICTED_GUEST``,
``VMX_EPT_AD_BIT``, ``VMX_MISC_ZERO_LEN_INS``; case-insensitive), or by the
``/proc/cpuinfo`` "vmx flags" name where Linux's ``vmxfeatures.h`` gives one
(``unrestricted_guest``, ``ept_ad``, ``ept_x_only``, ``vnmi``, ...).
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Iterable, Mapping, Optional, Union

from devirt_emu.vmx import controls as c
from devirt_emu.vmx import fields as f

__all__ = [
    "CpuModel", "CpuModelError", "Feature", "FEATURES", "VMX_MSR_NAMES", "DEFAULT_MODEL",
    "get_model", "model_names", "register", "intel_vmx_msrs", "cpuid_table",
    "parse_vmx_msrs", "load_vmx_msrs", "IMPLEMENTED_VMX", "intel_cpuid", "bits",
    "may_be_1_of", "models", "feature",
]

DEFAULT_MODEL = "skylake-server"
VENDORS = ("intel", "amd")
_MASK32 = 0xFFFFFFFF


class CpuModelError(ValueError):
    """A model name, feature or MSR dump that cannot be used; the message is one line."""


# --------------------------------------------------------------------------
# The VMX capability MSRs (SDM Vol. 3D, Appendix A; names as msr-index.h)
# --------------------------------------------------------------------------
VMX_MSR_NAMES: Mapping[int, str] = MappingProxyType({
    0x480: "MSR_IA32_VMX_BASIC", 0x481: "MSR_IA32_VMX_PINBASED_CTLS",
    0x482: "MSR_IA32_VMX_PROCBASED_CTLS", 0x483: "MSR_IA32_VMX_EXIT_CTLS",
    0x484: "MSR_IA32_VMX_ENTRY_CTLS", 0x485: "MSR_IA32_VMX_MISC",
    0x486: "MSR_IA32_VMX_CR0_FIXED0", 0x487: "MSR_IA32_VMX_CR0_FIXED1",
    0x488: "MSR_IA32_VMX_CR4_FIXED0", 0x489: "MSR_IA32_VMX_CR4_FIXED1",
    0x48A: "MSR_IA32_VMX_VMCS_ENUM", 0x48B: "MSR_IA32_VMX_PROCBASED_CTLS2",
    0x48C: "MSR_IA32_VMX_EPT_VPID_CAP", 0x48D: "MSR_IA32_VMX_TRUE_PINBASED_CTLS",
    0x48E: "MSR_IA32_VMX_TRUE_PROCBASED_CTLS", 0x48F: "MSR_IA32_VMX_TRUE_EXIT_CTLS",
    0x490: "MSR_IA32_VMX_TRUE_ENTRY_CTLS", 0x491: "MSR_IA32_VMX_VMFUNC",
    0x492: "MSR_IA32_VMX_PROCBASED_CTLS3", 0x493: "MSR_IA32_VMX_EXIT_CTLS2",
})
_BASIC, _MISC, _ENUM, _PROC2, _EPTVPID = 0x480, 0x485, 0x48A, 0x48B, 0x48C
_VMFUNC, _PROC3, _EXIT2 = 0x491, 0x492, 0x493

#: Control word -> (plain MSR, TRUE MSR) for the four words with a default1 class.
CONTROL_MSRS: Mapping[str, tuple[int, int]] = MappingProxyType({
    "PINBASED": (0x481, 0x48D), "PROCBASED": (0x482, 0x48E),
    "EXIT": (0x483, 0x48F), "ENTRY": (0x484, 0x490),
})
#: Control words whose MSR holds allowed-0 (31:0) and allowed-1 (63:32): PROCBASED2.
#: Control words whose MSR is a 64-bit allowed-1 mask.
ALLOWED1_ONLY_MSRS: Mapping[str, int] = MappingProxyType({
    "PROCBASED3": _PROC3, "EXIT2": _EXIT2, "VMFUNC": _VMFUNC,
})

#: The default1 class of each control word that has one (SDM Appendix A.2-A.5).
DEFAULT1: Mapping[str, int] = MappingProxyType({
    "PINBASED": c.PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR,
    "PROCBASED": c.CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR,
    "EXIT": c.VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR,
    "ENTRY": c.VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR,
})

#: What devirt-emu gives semantics to: the allowed-1 settings (beyond default1)
#: a model may advertise, per control word, and the IA32_VMX_MISC and
#: IA32_VMX_EPT_VPID_CAP bits.  A model (or a user's MSR dump) never
#: advertises more: :meth:`CpuModel.from_vmx_msrs` clears the rest.
IMPLEMENTED_VMX: Mapping[str, int] = MappingProxyType({
    "PINBASED": (c.PIN_BASED_EXT_INTR_MASK | c.PIN_BASED_NMI_EXITING | c.PIN_BASED_VIRTUAL_NMIS
                 | c.PIN_BASED_VMX_PREEMPTION_TIMER | c.PIN_BASED_POSTED_INTR),
    "PROCBASED": (c.CPU_BASED_INTR_WINDOW_EXITING | c.CPU_BASED_USE_TSC_OFFSETTING
                  | c.CPU_BASED_HLT_EXITING | c.CPU_BASED_INVLPG_EXITING | c.CPU_BASED_MWAIT_EXITING
                  | c.CPU_BASED_RDPMC_EXITING | c.CPU_BASED_RDTSC_EXITING
                  | c.CPU_BASED_CR3_LOAD_EXITING | c.CPU_BASED_CR3_STORE_EXITING
                  | c.CPU_BASED_CR8_LOAD_EXITING | c.CPU_BASED_CR8_STORE_EXITING
                  | c.CPU_BASED_TPR_SHADOW | c.CPU_BASED_NMI_WINDOW_EXITING
                  | c.CPU_BASED_MOV_DR_EXITING | c.CPU_BASED_UNCOND_IO_EXITING
                  | c.CPU_BASED_USE_IO_BITMAPS | c.CPU_BASED_MONITOR_TRAP_FLAG
                  | c.CPU_BASED_USE_MSR_BITMAPS | c.CPU_BASED_MONITOR_EXITING
                  | c.CPU_BASED_PAUSE_EXITING | c.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS),
    "PROCBASED2": (c.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES | c.SECONDARY_EXEC_ENABLE_EPT
                   | c.SECONDARY_EXEC_DESC | c.SECONDARY_EXEC_ENABLE_RDTSCP
                   | c.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE
                   | c.SECONDARY_EXEC_ENABLE_VPID | c.SECONDARY_EXEC_WBINVD_EXITING
                   | c.SECONDARY_EXEC_UNRESTRICTED_GUEST | c.SECONDARY_EXEC_APIC_REGISTER_VIRT
                   | c.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY | c.SECONDARY_EXEC_PAUSE_LOOP_EXITING
                   | c.SECONDARY_EXEC_RDRAND_EXITING | c.SECONDARY_EXEC_ENABLE_INVPCID
                   | c.SECONDARY_EXEC_RDSEED_EXITING | c.SECONDARY_EXEC_ENABLE_XSAVES
                   | c.SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE),
    "PROCBASED3": 0,
    "EXIT": (c.VM_EXIT_SAVE_DEBUG_CONTROLS | c.VM_EXIT_HOST_ADDR_SPACE_SIZE
             | c.VM_EXIT_ACK_INTR_ON_EXIT | c.VM_EXIT_SAVE_IA32_PAT | c.VM_EXIT_LOAD_IA32_PAT
             | c.VM_EXIT_SAVE_IA32_EFER | c.VM_EXIT_LOAD_IA32_EFER
             | c.VM_EXIT_SAVE_VMX_PREEMPTION_TIMER),
    "EXIT2": 0,
    "ENTRY": (c.VM_ENTRY_LOAD_DEBUG_CONTROLS | c.VM_ENTRY_IA32E_MODE | c.VM_ENTRY_LOAD_IA32_PAT
              | c.VM_ENTRY_LOAD_IA32_EFER),
    "VMFUNC": 0,
    "MISC": (c.VMX_MISC_PREEMPTION_TIMER_RATE_MASK | c.VMX_MISC_SAVE_EFER_LMA
             | c.VMX_MISC_ACTIVITY_HLT | c.VMX_MISC_ACTIVITY_SHUTDOWN
             | c.VMX_MISC_ACTIVITY_WAIT_SIPI | c.VMX_MISC_CR3_COUNT_MASK | c.VMX_MISC_MAX_MSR_MASK
             | c.VMX_MISC_ZERO_LEN_INS),
    "EPT_VPID_CAP": (c.VMX_EPT_EXECUTE_ONLY_BIT | c.VMX_EPT_PAGE_WALK_4_BIT | c.VMX_EPTP_UC_BIT
                     | c.VMX_EPTP_WB_BIT
                     | c.VMX_EPT_2MB_PAGE_BIT | c.VMX_EPT_1GB_PAGE_BIT | c.VMX_EPT_INVEPT_BIT
                     | c.VMX_EPT_AD_BIT | c.VMX_EPT_EXTENT_CONTEXT_BIT | c.VMX_EPT_EXTENT_GLOBAL_BIT
                     | ((c.VMX_VPID_INVVPID_BIT | c.VMX_VPID_EXTENT_INDIVIDUAL_ADDR_BIT
                         | c.VMX_VPID_EXTENT_SINGLE_CONTEXT_BIT
                         | c.VMX_VPID_EXTENT_GLOBAL_CONTEXT_BIT
                         | c.VMX_VPID_EXTENT_SINGLE_NON_GLOBAL_BIT)
                        << c.VMX_EPT_VPID_CAP_VPID_SHIFT)),
})

#: The VMCS region size every model reports (IA32_VMX_BASIC bits 44:32): the
#: region layout is devirt-emu's own and needs 4 KiB.
VMCS_SIZE = 4096
#: The VMCS revision identifier of devirt-emu's region layout (our choice: a
#: real part's identifier names that part's layout, which this is not).
VMCS_REVISION_ID = 0x0DE71001

#: CR0 bits fixed to 1 in VMX operation: PE, NE, PG (SDM A.7); bits allowed 1: 31:0.
CR0_FIXED0, CR0_FIXED1 = 0x80000021, 0xFFFFFFFF
#: CR4 bits fixed to 1 in VMX operation: VMXE (SDM A.8).
CR4_FIXED0 = 1 << 13


def _ctls(allowed0: int, allowed1: int) -> int:
    return allowed0 | (allowed1 << 32)


def intel_vmx_msrs(allowed1: Mapping[str, int], *, misc: int, ept_vpid_cap: int,
                   cr4_fixed1: int, true_clearable: Optional[Mapping[str, int]] = None,
                   basic_flags: int = c.VMX_BASIC_INOUT | c.VMX_BASIC_TRUE_CTLS,
                   revision_id: int = VMCS_REVISION_ID, cr0_fixed0: int = CR0_FIXED0,
                   cr0_fixed1: int = CR0_FIXED1, cr4_fixed0: int = CR4_FIXED0) -> dict[int, int]:
    """The capability MSRs 0x480-0x493 of an Intel part, from its features.

    ``allowed1`` maps each control word ("PINBASED", "PROCBASED",
    "PROCBASED2", "PROCBASED3", "EXIT", "EXIT2", "ENTRY", "VMFUNC"; missing
    ones: none) to the controls that may be 1 beyond its default1 class.
    ``true_clearable`` maps the four default1 words to the default1 bits the
    TRUE MSRs report as allowed to be 0.  Which optional MSRs exist follows
    the SDM (Appendix A): TRUE_* iff BASIC bit 55; PROCBASED_CTLS2 iff
    "activate secondary controls" may be 1; EPT_VPID_CAP iff "enable EPT" or
    "enable VPID" may be 1; VMFUNC, PROCBASED_CTLS3, EXIT_CTLS2 iff their
    enabling control may be 1.  VMCS_ENUM reports the highest index of the
    VMCS fields that exist with these controls.
    """
    true_clearable = true_clearable or {}
    may1 = {t: DEFAULT1.get(t, 0) | allowed1.get(t, 0)
            for t in ("PINBASED", "PROCBASED", "PROCBASED2", "PROCBASED3", "EXIT", "EXIT2",
                      "ENTRY", "VMFUNC")}
    basic = c.vmx_basic_encode(revision_id, VMCS_SIZE, c.MEMTYPE_WB, basic_flags)
    msrs = {_BASIC: basic, _MISC: misc, 0x486: cr0_fixed0, 0x487: cr0_fixed1,
            0x488: cr4_fixed0, 0x489: cr4_fixed1}
    for table, (plain, true) in CONTROL_MSRS.items():
        d1 = DEFAULT1[table]
        msrs[plain] = _ctls(d1, may1[table])
        if basic & c.VMX_BASIC_TRUE_CTLS:
            msrs[true] = _ctls(d1 & ~true_clearable.get(table, 0), may1[table])
    if may1["PROCBASED"] & c.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS:
        msrs[_PROC2] = _ctls(0, may1["PROCBASED2"])
        if may1["PROCBASED2"] & (c.SECONDARY_EXEC_ENABLE_EPT | c.SECONDARY_EXEC_ENABLE_VPID):
            msrs[_EPTVPID] = ept_vpid_cap
        if may1["PROCBASED2"] & c.SECONDARY_EXEC_ENABLE_VMFUNC:
            msrs[_VMFUNC] = may1["VMFUNC"]
    if may1["PROCBASED"] & c.CPU_BASED_ACTIVATE_TERTIARY_CONTROLS:
        msrs[_PROC3] = may1["PROCBASED3"]
    if may1["EXIT"] & c.VM_EXIT_ACTIVATE_SECONDARY_CONTROLS:
        msrs[_EXIT2] = may1["EXIT2"]
    msrs[_ENUM] = _highest_field_index(may_be_1_of(msrs)) << 1
    return dict(sorted(msrs.items()))


def may_be_1_of(msrs: Mapping[int, int]) -> dict[str, int]:
    """Allowed-1 settings of every control word, read from capability MSRs as
    VM entry reads them (the TRUE MSRs when BASIC bit 55 is 1)."""
    use_true = bool(msrs.get(_BASIC, 0) & c.VMX_BASIC_TRUE_CTLS)
    out = {}
    for table, (plain, true) in CONTROL_MSRS.items():
        out[table] = msrs.get(true if use_true else plain, 0) >> 32
    out["PROCBASED2"] = msrs.get(_PROC2, 0) >> 32
    for table, index in ALLOWED1_ONLY_MSRS.items():
        out[table] = msrs.get(index, 0)
    return out


def _highest_field_index(may1: Mapping[str, int]) -> int:
    return max(f.field_index(info.encoding) for info in f.ALL_FIELDS
               if f.field_supported(info, may1))


# --------------------------------------------------------------------------
# Features: one row per name, where its bit lives
# --------------------------------------------------------------------------
_REGS = ("eax", "ebx", "ecx", "edx")


@dataclass(frozen=True)
class Feature:
    """A named feature bit.  ``kind`` "cpuid": bit ``bit`` of register ``reg``
    (0-3: EAX, EBX, ECX, EDX) of leaf ``leaf``.``subleaf``.  ``kind`` "vmx":
    an allowed-1 control of control word ``word`` (bit ``bit`` of the word),
    or bit ``bit`` of the 64-bit MSR ``msr`` (MISC, EPT_VPID_CAP)."""

    name: str
    kind: str
    bit: int
    leaf: int = 0
    subleaf: int = 0
    reg: int = 0
    word: str = ""
    msr: int = 0
    alias: str = ""

    def where(self) -> str:
        if self.kind == "cpuid":
            return f"CPUID.{self.leaf:#x}.{self.subleaf}:{_REGS[self.reg].upper()}[{self.bit}]"
        if self.word:
            return f"{self.word} control bit {self.bit}"
        return f"{VMX_MSR_NAMES[self.msr]}[{self.bit}]"


def _cpuid_features() -> list[Feature]:
    # /proc/cpuinfo names (Linux arch/x86/include/asm/cpufeatures.h).
    rows = {
        (1, 0, 3): ["fpu", "vme", "de", "pse", "tsc", "msr", "pae", "mce", "cx8", "apic", None,
                    "sep", "mtrr", "pge", "mca", "cmov", "pat", "pse36", "pn", "clflush", None,
                    "dts", "acpi", "mmx", "fxsr", "sse", "sse2", "ss", "ht", "tm", "ia64", "pbe"],
        (1, 0, 2): ["pni", "pclmulqdq", "dtes64", "monitor", "ds_cpl", "vmx", "smx", "est",
                    "tm2", "ssse3", "cid", "sdbg", "fma", "cx16", "xtpr", "pdcm", None, "pcid",
                    "dca", "sse4_1", "sse4_2", "x2apic", "movbe", "popcnt", "tsc_deadline_timer",
                    "aes", "xsave", None, "avx", "f16c", "rdrand", "hypervisor"],
        (7, 0, 1): ["fsgsbase", "tsc_adjust", "sgx", "bmi1", "hle", "avx2", None, "smep", "bmi2",
                    "erms", "invpcid", "rtm", "cqm", None, "mpx", "rdt_a", "avx512f", "avx512dq",
                    "rdseed", "adx", "smap", "avx512ifma", None, "clflushopt", "clwb",
                    "intel_pt", "avx512pf", "avx512er", "avx512cd", "sha_ni", "avx512bw",
                    "avx512vl"],
        (7, 0, 2): [None, "avx512vbmi", "umip", "pku", "ospke", "waitpkg", "avx512_vbmi2", None,
                    "gfni", "vaes", "vpclmulqdq", "avx512_vnni", "avx512_bitalg", None,
                    "avx512_vpopcntdq", None, "la57", None, None, None, None, None, "rdpid",
                    None, None, "cldemote", None, "movdiri", "movdir64b", None, None, None],
        (0x80000001, 0, 2): ["lahf_lm", None, None, None, None, "abm", None, None,
                             "3dnowprefetch"],
        (0x80000001, 0, 3): [None] * 11 + ["syscall"] + [None] * 8 + ["nx"] + [None] * 5
        + ["pdpe1gb", "rdtscp", None, "lm"],
    }
    out = []
    for (leaf, sub, reg), names in rows.items():
        for bit, name in enumerate(names):
            if name:
                out.append(Feature(name, "cpuid", bit, leaf=leaf, subleaf=sub, reg=reg))
    out.append(Feature("arch_perfmon", "cpuid", 0, leaf=0xA, reg=0))   # EAX[7:0] version != 0
    return out


# /proc/cpuinfo "vmx flags" names (Linux arch/x86/include/asm/vmxfeatures.h) of
# the controls that have one.
_VMX_ALIASES = {
    "PIN_BASED_VIRTUAL_NMIS": "vnmi", "PIN_BASED_VMX_PREEMPTION_TIMER": "preemption_timer",
    "PIN_BASED_POSTED_INTR": "posted_intr", "CPU_BASED_USE_TSC_OFFSETTING": "tsc_offset",
    "CPU_BASED_TPR_SHADOW": "vtpr", "CPU_BASED_MONITOR_TRAP_FLAG": "mtf",
    "SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES": "virtapic", "SECONDARY_EXEC_ENABLE_EPT": "ept",
    "SECONDARY_EXEC_ENABLE_VPID": "vpid", "SECONDARY_EXEC_UNRESTRICTED_GUEST": "unrestricted_guest",
    "SECONDARY_EXEC_PAUSE_LOOP_EXITING": "ple", "SECONDARY_EXEC_SHADOW_VMCS": "shadow_vmcs",
    "SECONDARY_EXEC_ENABLE_PML": "pml", "SECONDARY_EXEC_MODE_BASED_EPT_EXEC": "ept_mode_based_exec",
    "SECONDARY_EXEC_TSC_SCALING": "tsc_scaling", "SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE": "usr_wait_pause",
    "VMX_EPT_EXECUTE_ONLY_BIT": "ept_x_only", "VMX_EPT_AD_BIT": "ept_ad",
    "VMX_EPT_1GB_PAGE_BIT": "ept_1gb", "VMX_EPT_PAGE_WALK_5_BIT": "ept_5level",
}


def _vmx_features() -> list[Feature]:
    out = []
    for word, table in (("PINBASED", c.PINBASED), ("PROCBASED", c.PROCBASED),
                        ("PROCBASED2", c.PROCBASED2), ("PROCBASED3", c.PROCBASED3),
                        ("EXIT", c.EXIT), ("ENTRY", c.ENTRY), ("VMFUNC", c.VMFUNC)):
        for name, mask in table.items():
            if word in DEFAULT1 and mask & DEFAULT1[word]:
                continue        # a default1 control is not a feature
            out.append(Feature(name, "vmx", mask.bit_length() - 1, word=word,
                               alias=_VMX_ALIASES.get(name, "")))
    for name, mask in c.VMX_MISC.items():
        out.append(Feature(name, "vmx", mask.bit_length() - 1, msr=_MISC))
    for name, mask in c.EPT_VPID_CAP.items():
        out.append(Feature(name, "vmx", mask.bit_length() - 1, msr=_EPTVPID,
                           alias=_VMX_ALIASES.get(name, "")))
    return out


#: Every feature name a model can have, by name.
FEATURES: Mapping[str, Feature] = MappingProxyType(
    {ft.name: ft for ft in _cpuid_features() + _vmx_features()})
_ALIASES = {ft.alias: ft.name for ft in FEATURES.values() if ft.alias}
_UPPER = {name.upper(): name for name in FEATURES if name.isupper()}


def feature(name: str) -> Feature:
    """The feature of a name (cpuinfo flag, vmx.h constant or vmx flag); CpuModelError if none."""
    if name in FEATURES:
        return FEATURES[name]
    if name in _ALIASES:
        return FEATURES[_ALIASES[name]]
    if name.upper() in _UPPER:
        return FEATURES[_UPPER[name.upper()]]
    raise CpuModelError(f"unknown CPU feature {name!r} (a /proc/cpuinfo flag such as 'pcid' or a "
                        "vmx.h name such as 'SECONDARY_EXEC_UNRESTRICTED_GUEST'; "
                        "'devirt-emu cpus NAME' lists a model's)")


def _has(ft: Feature, cpuid: Mapping, vmx: Mapping[int, int]) -> bool:
    if ft.kind == "cpuid":
        if ft.name == "arch_perfmon":
            return bool(cpuid.get((0xA, 0), (0, 0, 0, 0))[0] & 0xFF)
        regs = cpuid.get((ft.leaf, ft.subleaf))
        return bool(regs and regs[ft.reg] >> ft.bit & 1)
    if ft.word:
        return bool(may_be_1_of(vmx).get(ft.word, 0) >> ft.bit & 1)
    return bool(vmx.get(ft.msr, 0) >> ft.bit & 1)


def cpuid_table(leaves: Mapping[tuple[int, int], tuple[int, int, int, int]]):
    """A read-only CPUID table (keys (leaf, subleaf), values (EAX, EBX, ECX, EDX))."""
    for key, regs in leaves.items():
        if len(key) != 2 or len(regs) != 4 or any(not 0 <= r <= _MASK32 for r in regs):
            raise CpuModelError(f"CPUID table entry {key!r}: {regs!r} is not four 32-bit values")
    return MappingProxyType(dict(sorted(leaves.items())))


_GENUINE_INTEL = (0x756E6547, 0x6C65746E, 0x49656E69)   # "Genu", "ntel", "ineI" as EBX, ECX, EDX


def intel_cpuid(*, max_leaf: int, signature: int, ecx1: int, edx1: int, ext_ecx: int,
                ext_edx: int, maxphyaddr: int, linear_bits: int,
                extra: Optional[Mapping[tuple[int, int], tuple[int, int, int, int]]] = None
                ) -> dict[tuple[int, int], tuple[int, int, int, int]]:
    """The CPUID leaves of an Intel part: leaf 0 (maximum leaf, "GenuineIntel"),
    leaf 1 (``signature`` in EAX, CLFLUSH line size 64 in EBX[15:8], ``ecx1``,
    ``edx1``), leaf 0xB when ``max_leaf`` reaches it (filled per core), the
    extended leaves up to 0x80000008 (``ext_ecx``/``ext_edx`` in 0x80000001,
    the address widths in 0x80000008), and ``extra`` leaves as given."""
    leaves = {(0, 0): (max_leaf, *_GENUINE_INTEL),
              (1, 0): (signature, 8 << 8, ecx1, edx1),
              (0x80000000, 0): (0x80000008, 0, 0, 0),
              (0x80000001, 0): (0, 0, ext_ecx, ext_edx),
              (0x80000008, 0): (linear_bits << 8 | maxphyaddr, 0, 0, 0)}
    if max_leaf >= 0xB:
        leaves[(0xB, 0)] = (0, 0, 0, 0)
    leaves.update(extra or {})
    return leaves


def bits(*names: str, table: str) -> int:
    """The mask of CPUID feature names that live in one register, ``table``
    "1.ecx", "1.edx", "7.ebx", "7.ecx", "ext.ecx" or "ext.edx"."""
    where = {"1.ecx": (1, 2), "1.edx": (1, 3), "7.ebx": (7, 1), "7.ecx": (7, 2),
             "ext.ecx": (0x80000001, 2), "ext.edx": (0x80000001, 3)}[table]
    mask = 0
    for n in names:
        ft = FEATURES.get(n)
        if ft is None or ft.kind != "cpuid" or (ft.leaf, ft.reg) != where:
            raise CpuModelError(f"{n!r} is not a CPUID feature of {table}")
        mask |= 1 << ft.bit
    return mask


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class CpuModel:
    """One processor model (see the module docstring).

    ``cpuid``: {(leaf, subleaf): (EAX, EBX, ECX, EDX)}; the per-core fields
    (initial APIC ID and logical-processor count in leaf 1 EBX, the x2APIC
    topology of leaves 0xB/0x1F) are filled in by :meth:`cpuid_for`.
    ``msrs``: the model-specific reset values of platform MSRs (index ->
    value); ``absent_msrs``: platform MSRs this part does not have (RDMSR and
    WRMSR #GP).  ``vmx_msrs``: the VMX capability MSRs the part has (index ->
    value; absent ones #GP); empty for AMD.  ``features`` is derived from the
    tables and cannot disagree with them.
    """

    name: str
    vendor: str
    description: str
    sources: tuple[str, ...]
    cpuid: Mapping[tuple[int, int], tuple[int, int, int, int]]
    vmx_msrs: Mapping[int, int]
    maxphyaddr: int
    linear_bits: int
    msrs: Mapping[int, int] = field(default_factory=lambda: MappingProxyType({}))
    absent_msrs: frozenset = frozenset()
    tsc_khz: int = 1_000_000
    notes: tuple[str, ...] = ()
    features: frozenset = field(init=False)

    def __post_init__(self):
        if self.vendor not in VENDORS:
            raise CpuModelError(f"model {self.name}: vendor is one of {VENDORS}, not {self.vendor!r}")
        if not 36 <= self.maxphyaddr <= 52:
            raise CpuModelError(f"model {self.name}: MAXPHYADDR must be 36..52, not {self.maxphyaddr}")
        if self.linear_bits not in (48, 57):
            raise CpuModelError(f"model {self.name}: linear-address width is 48 or 57")
        if self.tsc_khz <= 0:
            raise CpuModelError(f"model {self.name}: the TSC frequency must be positive")
        object.__setattr__(self, "cpuid", cpuid_table(self.cpuid))
        object.__setattr__(self, "vmx_msrs", MappingProxyType(dict(sorted(self.vmx_msrs.items()))))
        object.__setattr__(self, "msrs", MappingProxyType(dict(self.msrs)))
        object.__setattr__(self, "absent_msrs", frozenset(self.absent_msrs))
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "notes", tuple(self.notes))
        bad = [i for i in self.vmx_msrs if i not in VMX_MSR_NAMES]
        if bad:
            raise CpuModelError(f"model {self.name}: {bad[0]:#x} is not a VMX capability MSR")
        if self.vendor == "intel" and self.vmx_msrs and _BASIC not in self.vmx_msrs:
            raise CpuModelError(f"model {self.name}: VMX capability MSRs without IA32_VMX_BASIC")
        object.__setattr__(self, "features", frozenset(
            ft.name for ft in FEATURES.values() if _has(ft, self.cpuid, self.vmx_msrs)))
        object.__setattr__(self, "_hash", hash(self._key()))

    # -- identity ----------------------------------------------------------
    def _key(self):
        return (self.name, self.vendor, tuple(self.cpuid.items()), tuple(self.vmx_msrs.items()),
                self.maxphyaddr, self.linear_bits, tuple(sorted(self.msrs.items())),
                tuple(sorted(self.absent_msrs)), self.tsc_khz)

    def __eq__(self, other):
        return self is other or (isinstance(other, CpuModel) and self._hash == other._hash
                                 and self._key() == other._key())

    def __hash__(self):
        return self._hash

    def __repr__(self):
        return f"CpuModel({self.name!r})"

    # -- derived facts -----------------------------------------------------
    @property
    def has_vmx(self) -> bool:
        return bool(self.vmx_msrs)

    @property
    def preemption_timer_rate(self) -> int:
        """The VMX-preemption timer counts down every 2^rate TSC ticks (IA32_VMX_MISC[4:0])."""
        return c.vmx_misc_preemption_timer_rate(self.vmx_msrs.get(_MISC, 0))

    @property
    def family_model_stepping(self) -> tuple[int, int, int]:
        """Display family, model and stepping from CPUID.1:EAX."""
        eax = self.cpuid.get((1, 0), (0, 0, 0, 0))[0]
        fam = (eax >> 8) & 0xF
        model = (eax >> 4) & 0xF
        if fam in (6, 0xF):
            model |= ((eax >> 16) & 0xF) << 4
        if fam == 0xF:
            fam += (eax >> 20) & 0xFF
        return fam, model, eax & 0xF

    def has(self, name: str) -> bool:
        """Does the model advertise the feature (any accepted spelling of its name)?"""
        return feature(name).name in self.features

    def cpuid_for(self, leaf: int, subleaf: int, apic_id: int, ncores: int) -> tuple[int, int, int, int]:
        """CPUID.leaf.subleaf on the core with ``apic_id`` in a machine of ``ncores``.

        A leaf above the maximum basic (extended) leaf, or one the table does
        not list, returns zeros; the subleaf is ignored for leaves whose table
        has only subleaf 0 (except the topology leaves)."""
        leaf &= _MASK32
        subleaf &= _MASK32
        if leaf in (0xB, 0x1F) and (leaf, 0) in self.cpuid:
            shift = max(1, (ncores - 1).bit_length())
            if subleaf == 0:            # SMT level: one thread per core
                return (0, 1, 0x100, apic_id)
            if subleaf == 1:            # core level
                return (shift, ncores, 0x201, apic_id)
            return (0, 0, subleaf & 0xFF, apic_id)
        regs = self.cpuid.get((leaf, subleaf))
        if regs is None:
            regs = self.cpuid.get((leaf, 0), (0, 0, 0, 0)) if not self._has_subleaves(leaf) else (0, 0, 0, 0)
        if leaf == 1:
            eax, ebx, ecx, edx = regs
            ebx = (ebx & 0xFFFF) | (min(ncores, 255) << 16) | ((apic_id & 0xFF) << 24)
            return (eax, ebx, ecx, edx)
        return regs

    def _has_subleaves(self, leaf: int) -> bool:
        return any(k[0] == leaf and k[1] for k in self.cpuid)

    # -- variants ----------------------------------------------------------
    def with_features(self, plus: Iterable[str] = (), minus: Iterable[str] = (),
                      name: Optional[str] = None) -> "CpuModel":
        """This model with features added (``plus``) and removed (``minus``).

        Raises CpuModelError for an unknown name, for adding a VMX feature to a
        part without VMX, a feature devirt-emu does not implement, or a VMX
        control whose capability MSR the part does not have."""
        cpuid = {k: list(v) for k, v in self.cpuid.items()}
        vmx = dict(self.vmx_msrs)
        for names, on in ((plus, True), (minus, False)):
            for n in names:
                ft = feature(n)
                if ft.kind == "cpuid":
                    _toggle_cpuid(self.name, cpuid, ft, on)
                else:
                    _toggle_vmx(self.name, vmx, ft, on)
        if vmx:
            _fix_optional_msrs(vmx)
        spec = name or self.name
        model = replace(self, name=spec, cpuid={k: tuple(v) for k, v in cpuid.items()},
                        vmx_msrs=vmx)
        if vmx:
            _check_vmx_consistency(model)
        return model

    @classmethod
    def from_vmx_msrs(cls, msrs: Mapping[Union[int, str], Union[int, str]], *,
                      base: Union[str, "CpuModel"] = DEFAULT_MODEL,
                      name: Optional[str] = None) -> "CpuModel":
        """A model with the VMX capability MSRs of a user's dump.

        ``msrs`` maps MSR numbers (ints or strings such as "0x480") to values
        (ints or hex strings).  Everything but the VMX MSRs comes from ``base``.
        The MSRs that must exist for the dumped controls (SDM Appendix A) must
        all be given.  Two values are adjusted, and :attr:`notes` says so: the
        VMCS size (bits 44:32 of IA32_VMX_BASIC) becomes 4096, the size of
        devirt-emu's VMCS layout, and allowed-1 settings (and MISC/EPT_VPID_CAP
        bits) of features devirt-emu does not implement are cleared (then the
        optional MSRs only those features implied are dropped and
        IA32_VMX_VMCS_ENUM is recomputed).
        """
        base_model = get_model(base) if not isinstance(base, CpuModel) else base
        if base_model.vendor != "intel":
            raise CpuModelError("VMX capability MSRs need an Intel base model")
        given = {}
        for k, v in msrs.items():
            index, value = _number(k, "MSR number"), _number(v, f"value of MSR {k}")
            if index not in VMX_MSR_NAMES:
                raise CpuModelError(f"{index:#x} is not a VMX capability MSR (0x480-0x493)")
            if not 0 <= value < 1 << 64:
                raise CpuModelError(f"value of MSR {index:#x} does not fit 64 bits")
            given[index] = value
        for required in range(0x480, 0x48B):
            if required not in given:
                raise CpuModelError(f"the dump lacks {VMX_MSR_NAMES[required]} ({required:#x}), "
                                    "which every VMX processor has")
        notes = [f"VMX capability MSRs from a dump; other tables from {base_model.name}"]
        basic = given[_BASIC]
        if c.vmx_basic_vmcs_size(basic) != VMCS_SIZE:
            notes.append(f"VMCS size {c.vmx_basic_vmcs_size(basic)} reported as {VMCS_SIZE}, "
                         "the size of devirt-emu's VMCS layout")
            given[_BASIC] = (basic & ~c.VMX_BASIC_VMCS_SIZE_MASK) | (VMCS_SIZE << 32)
        dropped = _mask_unimplemented(given)
        if dropped:
            _fix_optional_msrs(given)
            notes.append("not implemented by devirt-emu, cleared: " + ", ".join(dropped)
                         + " (the MSRs those controls implied dropped, IA32_VMX_VMCS_ENUM "
                           "recomputed)")
        for index, why in _required_msrs(given):
            if index not in given:
                raise CpuModelError(f"the dump lacks {VMX_MSR_NAMES[index]} ({index:#x}), "
                                    f"which exists because {why}")
        model = replace(base_model, name=name or f"{base_model.name}+vmx-msrs", vmx_msrs=given,
                        description=f"{base_model.description} (VMX capabilities from a dump)",
                        notes=base_model.notes + tuple(notes))
        _check_vmx_consistency(model)
        return model


def _number(v, what: str) -> int:
    if isinstance(v, bool):
        raise CpuModelError(f"{what}: {v!r} is not a number")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v.strip(), 16)
        except ValueError:
            pass
    raise CpuModelError(f"{what}: {v!r} is not a hexadecimal number")


def _toggle_cpuid(model: str, cpuid: dict, ft: Feature, on: bool) -> None:
    if ft.name == "arch_perfmon":
        raise CpuModelError(f"{model}: the architectural PMU is a whole leaf (0xA), not one bit")
    key = (ft.leaf, ft.subleaf)
    if key not in cpuid:
        if not on:
            return
        cpuid[key] = [0, 0, 0, 0]
    regs = cpuid[key]
    regs[ft.reg] = (regs[ft.reg] | (1 << ft.bit)) if on else (regs[ft.reg] & ~(1 << ft.bit))


def _toggle_vmx(model: str, vmx: dict, ft: Feature, on: bool) -> None:
    if not vmx:
        raise CpuModelError(f"{model} has no VMX: {ft.name} cannot be changed")
    implemented = IMPLEMENTED_VMX.get(ft.word) if ft.word else IMPLEMENTED_VMX[
        "MISC" if ft.msr == _MISC else "EPT_VPID_CAP"]
    if on and not implemented >> ft.bit & 1:
        raise CpuModelError(f"{ft.name} is not implemented by devirt-emu and cannot be advertised")
    bit = 1 << ft.bit
    if ft.word in CONTROL_MSRS:
        indices, bit = CONTROL_MSRS[ft.word], bit << 32
    elif ft.word == "PROCBASED2":
        indices, bit = (_PROC2,), bit << 32
    elif ft.word:
        indices = (ALLOWED1_ONLY_MSRS[ft.word],)
    else:
        indices = (ft.msr,)
    for index in indices:
        if index not in vmx:
            if not on:
                continue
            raise CpuModelError(f"{model}: {ft.name} needs {VMX_MSR_NAMES[index]}, which this "
                                "model does not have")
        vmx[index] = (vmx[index] | bit) if on else (vmx[index] & ~bit)


def _fix_optional_msrs(vmx: dict) -> None:
    """After a control changed: drop the optional MSRs that no longer exist
    (SDM Appendix A) and recompute IA32_VMX_VMCS_ENUM."""
    may1 = may_be_1_of(vmx)
    if not may1["PROCBASED"] & c.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS:
        vmx.pop(_PROC2, None)
    if not may1["PROCBASED"] & c.CPU_BASED_ACTIVATE_TERTIARY_CONTROLS:
        vmx.pop(_PROC3, None)
    if not may1["EXIT"] & c.VM_EXIT_ACTIVATE_SECONDARY_CONTROLS:
        vmx.pop(_EXIT2, None)
    sec = vmx.get(_PROC2, 0) >> 32
    if not sec & (c.SECONDARY_EXEC_ENABLE_EPT | c.SECONDARY_EXEC_ENABLE_VPID):
        vmx.pop(_EPTVPID, None)
    if not sec & c.SECONDARY_EXEC_ENABLE_VMFUNC:
        vmx.pop(_VMFUNC, None)
    vmx[_ENUM] = _highest_field_index(may_be_1_of(vmx)) << 1


def _mask_unimplemented(msrs: dict) -> list[str]:
    """Clear in place what devirt-emu does not implement; return the names cleared."""
    dropped = []
    for ft in FEATURES.values():
        if ft.kind != "vmx" or not _has(ft, {}, msrs):
            continue
        impl = IMPLEMENTED_VMX.get(ft.word) if ft.word else IMPLEMENTED_VMX[
            "MISC" if ft.msr == _MISC else "EPT_VPID_CAP"]
        if not impl >> ft.bit & 1:
            _toggle_vmx("dump", msrs, ft, False)
            dropped.append(ft.name)
    return dropped


def _required_msrs(msrs: Mapping[int, int]):
    if msrs[_BASIC] & c.VMX_BASIC_TRUE_CTLS:
        for plain, true in CONTROL_MSRS.values():
            yield true, "IA32_VMX_BASIC bit 55 is 1"
    proc1 = msrs[0x482] >> 32
    if proc1 & c.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS:
        yield _PROC2, "\"activate secondary controls\" may be 1"
        sec = msrs.get(_PROC2, 0) >> 32
        if sec & (c.SECONDARY_EXEC_ENABLE_EPT | c.SECONDARY_EXEC_ENABLE_VPID):
            yield _EPTVPID, "\"enable EPT\" or \"enable VPID\" may be 1"


def _check_vmx_consistency(model: CpuModel) -> None:
    """The SDM's rules among capability MSRs that the rest of devirt-emu relies on."""
    v = model.vmx_msrs
    for table, (plain, true) in CONTROL_MSRS.items():
        for index in (plain, true):
            if index in v and (v[index] & _MASK32) & ~(v[index] >> 32):
                raise CpuModelError(f"{model.name}: {VMX_MSR_NAMES[index]} has a control that "
                                    "must be 1 but may not be 1")
    if v[0x486] & ~v[0x487] or v[0x488] & ~v[0x489]:
        raise CpuModelError(f"{model.name}: a CR FIXED0 bit is not allowed by FIXED1")


# --------------------------------------------------------------------------
# Registry and specs
# --------------------------------------------------------------------------
_MODULES = ("skylake_server", "icelake_server", "sapphire_rapids", "westmere", "nehalem")
_REGISTRY: dict[str, CpuModel] = {}
_loaded = False


def register(model: CpuModel) -> CpuModel:
    """Add a model to the registry (its name must be new); return it."""
    if model.name in _REGISTRY and _REGISTRY[model.name] is not model:
        raise CpuModelError(f"a CPU model named {model.name!r} is already registered")
    _REGISTRY[model.name] = model
    return model


def _load() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in _MODULES:
            importlib.import_module(f"{__name__}.{mod}")


def models() -> Mapping[str, CpuModel]:
    """Every registered model by name."""
    _load()
    return MappingProxyType(dict(_REGISTRY))


def model_names() -> list[str]:
    _load()
    return list(_REGISTRY)


def get_model(spec: Union[str, CpuModel, None] = None) -> CpuModel:
    """The model of a spec: a CpuModel (returned as is), None (the default,
    ``skylake-server``), or ``NAME[,+feature,-feature,feature=on|off...]``."""
    if spec is None:
        spec = DEFAULT_MODEL
    if isinstance(spec, CpuModel):
        return spec
    if not isinstance(spec, str):
        raise CpuModelError(f"a CPU model is a name or a CpuModel, not {type(spec).__name__}")
    _load()
    parts = [p.strip() for p in spec.split(",")]
    base = parts[0]
    if base not in _REGISTRY:
        raise CpuModelError(f"unknown CPU model {base!r} (have: {', '.join(_REGISTRY)})")
    plus, minus = [], []
    for p in parts[1:]:
        if p.startswith("+"):
            plus.append(p[1:])
        elif p.startswith("-"):
            minus.append(p[1:])
        elif p.endswith("=on"):
            plus.append(p[:-3])
        elif p.endswith("=off"):
            minus.append(p[:-4])
        else:
            raise CpuModelError(f"CPU spec {spec!r}: {p!r} is not +FEATURE, -FEATURE, "
                                "FEATURE=on or FEATURE=off")
        if not (plus + minus)[-1]:
            raise CpuModelError(f"CPU spec {spec!r}: an empty feature name")
    model = _REGISTRY[base]
    if not plus and not minus:
        return model
    return model.with_features(plus, minus, name=spec)


# --------------------------------------------------------------------------
# Reading a user's dump (--vmx-msrs FILE)
# --------------------------------------------------------------------------
def parse_vmx_msrs(text: str) -> dict[int, int]:
    """VMX capability MSR values from a dump's text.

    Accepted: a JSON object ``{"0x480": "0x...", ...}`` (numbers or hex
    strings), or text with one MSR per line, either ``INDEX VALUE`` pairs
    (``0x480 0xda0400...``, also ``480: da0400...``) or bare values, the
    output of ``for m in $(seq 0x480 0x493); do rdmsr $m; done``: the n-th
    value line is MSR 0x480 + n, and a line ``-`` marks an MSR the processor
    does not have (rdmsr prints nothing for it).  Numbers in text are
    hexadecimal with or without 0x; ``#`` starts a comment.
    """
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise CpuModelError(f"VMX MSR dump: invalid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, dict):
            raise CpuModelError("VMX MSR dump: the JSON is not an object of MSR -> value")
        return {_number(k, "MSR number"): _number(v, f"value of MSR {k}") for k, v in data.items()}
    out: dict[int, int] = {}
    position = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.replace(":", " ").split()
        try:
            if len(words) == 1:
                if words[0] != "-":
                    out[0x480 + position] = int(words[0], 16)
                position += 1
            elif len(words) == 2:
                out[int(words[0], 16)] = int(words[1], 16)
            else:
                raise ValueError
        except ValueError:
            raise CpuModelError(f"VMX MSR dump line {lineno}: {line!r} is not 'VALUE' or "
                                "'INDEX VALUE' in hexadecimal") from None
    if not out:
        raise CpuModelError("VMX MSR dump: no MSR values")
    return out


def load_vmx_msrs(path: str) -> dict[int, int]:
    """:func:`parse_vmx_msrs` of a file; CpuModelError if it cannot be read."""
    try:
        with open(path, encoding="utf-8") as fh:
            return parse_vmx_msrs(fh.read())
    except OSError as e:
        raise CpuModelError(f"cannot read VMX MSR dump {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise CpuModelError(f"VMX MSR dump {path} is not text") from None
