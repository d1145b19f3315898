"""The VMX capability MSRs, as functions of a CPU model.

SDM Vol. 3D, Appendix A ("VMX Capability Reporting Facility").  MSR names and
numbers are Linux's (``arch/x86/include/asm/msr-index.h``).

What a processor advertises is data: its :class:`~devirt_emu.cpumodels.CpuModel`
(``devirt_emu/cpumodels/``, one module per model) holds the MSR values.
Every function here takes the model (``model=``: a CpuModel, a spec string
such as ``"nehalem"``, or None for the default ``skylake-server``) and reads
the allowed settings, the MSRs that exist and the VMCS fields that exist
from it: :func:`allowed_settings`, :func:`is_allowed`, :func:`make_legal`,
:func:`may_be_1`, :func:`supported_fields`, :func:`is_field_supported`,
:func:`capability_msrs`.

The module-level values (:data:`VMX_CAPABILITY_MSRS`, :data:`SUPPORTED_FIELDS`,
:data:`CR4_FIXED1`, ...) are those of the default model, kept for callers that
have no machine; code that has one asks its model.

Since IA32_VMX_BASIC bit 55 is 1 on every modelled part, VM entry checks
controls against the TRUE MSRs (SDM 26.2.1.1), and so do
:func:`allowed_settings`, :func:`is_allowed` and :func:`make_legal` by
default.  A control word whose capability MSR does not exist (VMFUNC,
PROCBASED_CTLS3, EXIT_CTLS2 on the modelled parts) has no allowed 1-setting.

CR0/CR4 FIXED MSRs report what hardware reports; the relaxation of CR0.PE
and CR0.PG for unrestricted guests is a VM-entry check (SDM 26.3.1.1), not
an MSR value.
"""
from __future__ import annotations

from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping, Union

from devirt_emu import cpumodels as _cm
from devirt_emu.cpumodels import get_model
from devirt_emu.vmx import controls as c
from devirt_emu.vmx import fields as f

if TYPE_CHECKING:
    from devirt_emu.cpumodels import CpuModel

# --------------------------------------------------------------------------
# MSR numbers (msr-index.h)
# --------------------------------------------------------------------------
MSR_IA32_VMX_BASIC = 0x480
MSR_IA32_VMX_PINBASED_CTLS = 0x481
MSR_IA32_VMX_PROCBASED_CTLS = 0x482
MSR_IA32_VMX_EXIT_CTLS = 0x483
MSR_IA32_VMX_ENTRY_CTLS = 0x484
MSR_IA32_VMX_MISC = 0x485
MSR_IA32_VMX_CR0_FIXED0 = 0x486
MSR_IA32_VMX_CR0_FIXED1 = 0x487
MSR_IA32_VMX_CR4_FIXED0 = 0x488
MSR_IA32_VMX_CR4_FIXED1 = 0x489
MSR_IA32_VMX_VMCS_ENUM = 0x48A
MSR_IA32_VMX_PROCBASED_CTLS2 = 0x48B
MSR_IA32_VMX_EPT_VPID_CAP = 0x48C
MSR_IA32_VMX_TRUE_PINBASED_CTLS = 0x48D
MSR_IA32_VMX_TRUE_PROCBASED_CTLS = 0x48E
MSR_IA32_VMX_TRUE_EXIT_CTLS = 0x48F
MSR_IA32_VMX_TRUE_ENTRY_CTLS = 0x490
MSR_IA32_VMX_VMFUNC = 0x491
MSR_IA32_VMX_PROCBASED_CTLS3 = 0x492
MSR_IA32_VMX_EXIT_CTLS2 = 0x493

#: Every VMX capability MSR number the SDM defines, by name (present or not).
VMX_MSR_NAMES: Mapping[int, str] = _cm.VMX_MSR_NAMES

# --------------------------------------------------------------------------
# The default model's values
# --------------------------------------------------------------------------
ModelSpec = Union[str, "CpuModel", None]


def model_of(model: ModelSpec = None) -> "CpuModel":
    """The CpuModel of a spec (None: the default model)."""
    return get_model(model)


DEFAULT_MODEL = get_model(None)

#: The default model's capability MSRs, by MSR number (read-only).  An MSR
#: number of :data:`VMX_MSR_NAMES` missing here does not exist (#GP).
VMX_CAPABILITY_MSRS: Mapping[int, int] = DEFAULT_MODEL.vmx_msrs
IA32_VMX_BASIC = VMX_CAPABILITY_MSRS[MSR_IA32_VMX_BASIC]
#: VMCS revision identifier (bits 30:0 of IA32_VMX_BASIC) of the default model.
VMCS_REVISION_ID = c.vmx_basic_revision_id(IA32_VMX_BASIC)
VMCS_SIZE = c.vmx_basic_vmcs_size(IA32_VMX_BASIC)
CR0_FIXED0 = VMX_CAPABILITY_MSRS[MSR_IA32_VMX_CR0_FIXED0]
CR0_FIXED1 = VMX_CAPABILITY_MSRS[MSR_IA32_VMX_CR0_FIXED1]
CR4_FIXED0 = VMX_CAPABILITY_MSRS[MSR_IA32_VMX_CR4_FIXED0]
CR4_FIXED1 = VMX_CAPABILITY_MSRS[MSR_IA32_VMX_CR4_FIXED1]

#: The default1 class of each control word that has one (SDM Appendix A.2-A.5).
DEFAULT1: Mapping[str, int] = _cm.DEFAULT1

#: Control word name -> its VMCS field and its bit table.
CONTROL_FIELDS: Mapping[str, int] = MappingProxyType({
    "PINBASED": f.VmcsField.PIN_BASED_VM_EXEC_CONTROL,
    "PROCBASED": f.VmcsField.CPU_BASED_VM_EXEC_CONTROL,
    "PROCBASED2": f.VmcsField.SECONDARY_VM_EXEC_CONTROL,
    "PROCBASED3": f.VmcsField.TERTIARY_VM_EXEC_CONTROL,
    "EXIT": f.VmcsField.VM_EXIT_CONTROLS,
    "EXIT2": f.VmcsField.SECONDARY_VM_EXIT_CONTROLS,
    "ENTRY": f.VmcsField.VM_ENTRY_CONTROLS,
    "VMFUNC": f.VmcsField.VM_FUNCTION_CONTROL,
})
CONTROL_TABLES: Mapping[str, Mapping[str, int]] = MappingProxyType({
    "PINBASED": c.PINBASED, "PROCBASED": c.PROCBASED, "PROCBASED2": c.PROCBASED2,
    "PROCBASED3": c.PROCBASED3, "EXIT": c.EXIT, "EXIT2": c.EXIT2, "ENTRY": c.ENTRY,
    "VMFUNC": c.VMFUNC,
})


@lru_cache(maxsize=64)
def _may_be_1(model: "CpuModel") -> Mapping[str, int]:
    return MappingProxyType(_cm.may_be_1_of(model.vmx_msrs))


@lru_cache(maxsize=64)
def _supported(model: "CpuModel") -> frozenset:
    may1 = _may_be_1(model)
    return frozenset(info.encoding for info in f.ALL_FIELDS if f.field_supported(info, may1))


def supported_fields(model: ModelSpec = None) -> frozenset:
    """Encodings (full and high) of every VMCS field the model supports."""
    return _supported(model_of(model))


def capability_msrs(model: ModelSpec = None) -> Mapping[int, int]:
    """The capability MSRs the model has (absent ones #GP)."""
    return model_of(model).vmx_msrs


#: Encodings (full and high) of every VMCS field the default model supports.
SUPPORTED_FIELDS: frozenset[int] = supported_fields()

#: Highest index (bits 9:1 of an encoding) of any field the default model supports.
HIGHEST_FIELD_INDEX = max(f.field_index(e) for e in SUPPORTED_FIELDS)


# --------------------------------------------------------------------------
# Allowed settings
# --------------------------------------------------------------------------
_PLAIN_MSR = {"PINBASED": MSR_IA32_VMX_PINBASED_CTLS, "PROCBASED": MSR_IA32_VMX_PROCBASED_CTLS,
              "EXIT": MSR_IA32_VMX_EXIT_CTLS, "ENTRY": MSR_IA32_VMX_ENTRY_CTLS}
_TRUE_MSR = {"PINBASED": MSR_IA32_VMX_TRUE_PINBASED_CTLS,
             "PROCBASED": MSR_IA32_VMX_TRUE_PROCBASED_CTLS,
             "EXIT": MSR_IA32_VMX_TRUE_EXIT_CTLS, "ENTRY": MSR_IA32_VMX_TRUE_ENTRY_CTLS}
_ALLOWED1_ONLY_MSR = {"PROCBASED3": MSR_IA32_VMX_PROCBASED_CTLS3,
                      "EXIT2": MSR_IA32_VMX_EXIT_CTLS2, "VMFUNC": MSR_IA32_VMX_VMFUNC}
_BY_FIELD = {int(enc): name for name, enc in CONTROL_FIELDS.items()}


def control_name(ctl: Union[str, int]) -> str:
    """Normalise a control word given by table name or by its VMCS field encoding."""
    if isinstance(ctl, str):
        if ctl in CONTROL_FIELDS:
            return ctl
        raise KeyError(f"unknown control word {ctl!r}; one of {', '.join(CONTROL_FIELDS)}")
    try:
        return _BY_FIELD[int(ctl)]
    except KeyError:
        raise KeyError(f"VMCS field {int(ctl):#x} is not a VMX control word") from None


def allowed_settings(ctl: Union[str, int], use_true: bool = True,
                     model: ModelSpec = None) -> tuple[int, int]:
    """(must_be_1, may_be_1) for a control word, as VM entry checks it.

    ``ctl`` is a table name ("PINBASED", "PROCBASED", "PROCBASED2",
    "PROCBASED3", "EXIT", "EXIT2", "ENTRY", "VMFUNC") or the control's VMCS
    field encoding.  With ``use_true`` (the default, and what VM entry does
    on this CPU because IA32_VMX_BASIC bit 55 is 1) the TRUE MSRs are used
    for the four controls that have them; ``use_true=False`` reads the plain
    MSRs.  A control word whose capability MSR does not exist has no allowed
    1-settings: (0, 0).  ``model``: whose MSRs (None: the default model).
    """
    name = control_name(ctl)
    msrs = model_of(model).vmx_msrs
    if name in _PLAIN_MSR:
        true = msrs.get(MSR_IA32_VMX_BASIC, 0) & c.VMX_BASIC_TRUE_CTLS
        v = msrs.get((_TRUE_MSR if use_true and true else _PLAIN_MSR)[name], 0)
        return v & 0xFFFFFFFF, v >> 32
    if name == "PROCBASED2":
        v = msrs.get(MSR_IA32_VMX_PROCBASED_CTLS2, 0)
        return v & 0xFFFFFFFF, v >> 32
    return 0, msrs.get(_ALLOWED1_ONLY_MSR[name], 0)


def is_allowed(ctl: Union[str, int], value: int, use_true: bool = True,
               model: ModelSpec = None) -> list[int]:
    """Bit numbers of ``value`` that violate the control word's allowed settings.

    A bit offends if it must be 1 and is 0, or is 1 and may not be 1.  An
    empty list means the value passes the SDM's allowed-settings check
    (26.2.1.1) for this word.
    """
    if value < 0:
        raise ValueError(f"a control word is non-negative, not {value}")
    must1, may1 = allowed_settings(ctl, use_true, model)
    bad = (must1 & ~value) | (value & ~may1)
    return [n for n in range(bad.bit_length()) if (bad >> n) & 1]


def make_legal(ctl: Union[str, int], requested: int, use_true: bool = True,
               model: ModelSpec = None) -> int:
    """``requested`` with must-be-1 bits set and not-allowed-1 bits cleared."""
    if requested < 0:
        raise ValueError(f"a control word is non-negative, not {requested}")
    must1, may1 = allowed_settings(ctl, use_true, model)
    return (requested | must1) & may1


def may_be_1(model: ModelSpec = None) -> Mapping[str, int]:
    """Allowed-1 settings of every control word (what :func:`fields.field_supported` takes)."""
    return _may_be_1(model_of(model))


def is_field_supported(field: Union[int, str], model: ModelSpec = None) -> bool:
    """Does the model have this VMCS field (by encoding, VmcsField or name)?"""
    fields = supported_fields(model)
    if isinstance(field, str):
        return field in f.VmcsField.__members__ and f.VmcsField[field] in fields
    return int(field) in fields
