"""The VMCS: a 4 KiB region in physical memory with VMREAD/VMWRITE semantics.

The VMCS lives in guest/host physical memory, not in Python objects, so that
real hypervisor code running as a guest (VMPTRLD, VMREAD, VMWRITE, VMLAUNCH)
and the Python L0 model see the same bytes.  :class:`Vmcs` is a view of one
region; two views over the same memory see each other's writes.

Region layout (SDM Vol. 3C, Section 25.2: only the first 8 bytes are
architectural, the rest is implementation-specific and ours):

=============  ==============================================================
offset         contents
=============  ==============================================================
0x000 (u32)    bits 30:0 VMCS revision identifier, bit 31 shadow-VMCS indicator
0x004 (u32)    VMX-abort indicator
0x008 (u32)    launch state: 0 = clear, 1 = launched
0x00C (u32)    reserved, 0
0x010 ...      one 8-byte little-endian slot per field of ``fields.TABLE``, in
               table order: field *k* of the table at 0x10 + 8*k.  A 16- or
               32-bit field uses the low 2 or 4 bytes of its slot (the rest
               stay 0); a 64-bit field's high access (encoding | 1) reads
               and writes bytes 4..7 of the full field's slot.
=============  ==============================================================

Every field of the table has a slot (so the layout does not depend on the
capability choices) but only the fields the view's CPU model supports
(``Vmcs(mem, pa, model)``, :func:`field_access`; default: the default model)
can be accessed.

Access semantics (SDM Vol. 3C, VMREAD and VMWRITE in Chapter 31):

* :meth:`Vmcs.vmread` / :meth:`Vmcs.vmwrite` are the instructions' effect on
  the current VMCS.  An encoding that names no supported field (including
  any with bits 63:15 or bit 12 set) fails with VMfailValid(12,
  VMXERR_UNSUPPORTED_VMCS_COMPONENT).  VMWRITE to a VM-exit information
  field fails with VMfailValid(13, VMXERR_VMWRITE_READ_ONLY_VMCS_COMPONENT)
  unless the model's IA32_VMX_MISC bit 29 is 1 (it is 0 on every modelled
  part: devirt-emu does not advertise it).  A failure writes the error number into this VMCS's
  VM_INSTRUCTION_ERROR field, as VMfailValid does, then raises
  :class:`VmxInstructionError`; the caller sets RFLAGS (ZF=1, CF/PF/AF/SF/OF=0).
  VMfailInvalid (no current VMCS) is the caller's case: a Vmcs object is
  always a current VMCS.
* VMWRITE of a 16- or 32-bit field ignores the high bits of the source; a
  high access writes the low 32 bits of the source into bits 63:32; VMREAD
  zero-extends.  Natural-width fields are 64 bits (the model is a 64-bit
  processor).
* :meth:`Vmcs.get` / :meth:`Vmcs.set` are the processor's own accesses (VM
  exits writing exit information, VM entry reading guest state): no
  read-only check, and ``set`` rejects a value wider than the field instead
  of truncating it (such a write is a bug in the model).
* ``vmcs["GUEST_RIP"]`` reads like VMREAD and ``vmcs["GUEST_RIP"] = v``
  writes like VMWRITE; keys are names, :class:`VmcsField` members or
  encodings.

Accesses go straight to the memory buffer through precomputed offsets and
``struct`` when the memory object exposes a ``view`` memoryview (PhysMem does);
any other object with ``read(pa, n)`` / ``write(pa, data)`` works through
those methods.
"""
from __future__ import annotations

import enum
import struct
from functools import lru_cache
from types import MappingProxyType
from typing import Iterator, Mapping, Optional, Union

from devirt_emu.vmx import capabilities as caps
from devirt_emu.vmx import controls as c
from devirt_emu.vmx import fields as f

VMCS_REGION_SIZE = 4096
SHADOW_VMCS_INDICATOR = 1 << 31

OFF_REVISION = 0x000
OFF_ABORT = 0x004
OFF_LAUNCH_STATE = 0x008
OFF_FIELDS = 0x010
SLOT_SIZE = 8

LAUNCH_STATE_CLEAR = 0
LAUNCH_STATE_LAUNCHED = 1
_LAUNCH_NAMES = {LAUNCH_STATE_CLEAR: "clear", LAUNCH_STATE_LAUNCHED: "launched"}
_LAUNCH_VALUES = {v: k for k, v in _LAUNCH_NAMES.items()}


class VmInstructionErrorNumber(enum.IntEnum):
    """VM-instruction error numbers (SDM Vol. 3C, Section 31.4, Table 31-1),
    with Linux's ``enum vm_instruction_error_number`` names."""

    VMXERR_VMCALL_IN_VMX_ROOT_OPERATION = 1
    VMXERR_VMCLEAR_INVALID_ADDRESS = 2
    VMXERR_VMCLEAR_VMXON_POINTER = 3
    VMXERR_VMLAUNCH_NONCLEAR_VMCS = 4
    VMXERR_VMRESUME_NONLAUNCHED_VMCS = 5
    VMXERR_VMRESUME_AFTER_VMXOFF = 6
    VMXERR_ENTRY_INVALID_CONTROL_FIELD = 7
    VMXERR_ENTRY_INVALID_HOST_STATE_FIELD = 8
    VMXERR_VMPTRLD_INVALID_ADDRESS = 9
    VMXERR_VMPTRLD_VMXON_POINTER = 10
    VMXERR_VMPTRLD_INCORRECT_VMCS_REVISION_ID = 11
    VMXERR_UNSUPPORTED_VMCS_COMPONENT = 12
    VMXERR_VMWRITE_READ_ONLY_VMCS_COMPONENT = 13
    VMXERR_VMXON_IN_VMX_ROOT_OPERATION = 15
    VMXERR_ENTRY_INVALID_EXECUTIVE_VMCS_POINTER = 16
    VMXERR_ENTRY_NONLAUNCHED_EXECUTIVE_VMCS = 17
    VMXERR_ENTRY_EXECUTIVE_VMCS_POINTER_NOT_VMXON_POINTER = 18
    VMXERR_VMCALL_NONCLEAR_VMCS = 19
    VMXERR_VMCALL_INVALID_VM_EXIT_CONTROL_FIELDS = 20
    VMXERR_VMCALL_INCORRECT_MSEG_REVISION_ID = 22
    VMXERR_VMXOFF_UNDER_DUAL_MONITOR_TREATMENT_OF_SMIS_AND_SMM = 23
    VMXERR_VMCALL_INVALID_SMM_MONITOR_FEATURES = 24
    VMXERR_ENTRY_INVALID_VM_EXECUTION_CONTROL_FIELDS_IN_EXECUTIVE_VMCS = 25
    VMXERR_ENTRY_EVENTS_BLOCKED_BY_MOV_SS = 26
    VMXERR_INVALID_OPERAND_TO_INVEPT_INVVPID = 28


globals().update(VmInstructionErrorNumber.__members__)


class VmxInstructionError(Exception):
    """A VMX instruction ended in VMfailValid with this error number."""

    def __init__(self, errno: int, detail: str = ""):
        self.errno = VmInstructionErrorNumber(errno)
        self.detail = detail
        msg = f"VMfailValid({int(self.errno)}, {self.errno.name})"
        super().__init__(f"{msg}: {detail}" if detail else msg)


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_BY_SIZE = {2: _U16, 4: _U32, 8: _U64}
_MASK64 = (1 << 64) - 1


def _slot_offsets() -> Mapping[int, tuple[int, struct.Struct, int]]:
    """encoding -> (offset in the region, struct, value mask) for every encoding."""
    out: dict[int, tuple[int, struct.Struct, int]] = {}
    slot_of_full = {enc: OFF_FIELDS + SLOT_SIZE * k for k, (_, enc, _, _) in enumerate(f.TABLE)}
    if max(slot_of_full.values()) + SLOT_SIZE > VMCS_REGION_SIZE:
        raise AssertionError("the VMCS field slots do not fit in 4 KiB")
    for info in f.ALL_FIELDS:
        off = slot_of_full[info.full] + (4 if info.high else 0)
        out[info.encoding] = (off, _BY_SIZE[info.size], (1 << info.bits) - 1)
    return MappingProxyType(out)


#: Layout of every field encoding in the region (offset, struct, mask).
FIELD_SLOTS = _slot_offsets()
@lru_cache(maxsize=64)
def field_access(model=None) -> tuple[Mapping[int, tuple], Mapping[int, tuple]]:
    """The slots VMREAD may use and those VMWRITE may use on a CPU model (a
    CpuModel, a spec string or None for the default): the fields the model
    supports, and of those the read-only ones only if its IA32_VMX_MISC bit 29
    allows VMWRITE to them."""
    m = caps.model_of(model)
    readable = {e: FIELD_SLOTS[e] for e in caps.supported_fields(m)}
    vmwrite_any = bool(m.vmx_msrs.get(caps.MSR_IA32_VMX_MISC, 0)
                       & c.VMX_MISC_VMWRITE_SHADOW_RO_FIELDS)
    writable = {e: s for e, s in readable.items() if vmwrite_any or not f.field_info(e).read_only}
    return MappingProxyType(readable), MappingProxyType(writable)


#: The slots VMREAD may use / VMWRITE may use on the default CPU model.
_READABLE, _WRITABLE = field_access(None)
_ERR_FIELD = int(f.VmcsField.VM_INSTRUCTION_ERROR)

FieldKey = Union[int, str]


_ENC_BY_NAME = {info.name: info.encoding for info in f.ALL_FIELDS}


def _key(field: FieldKey) -> int:
    if isinstance(field, str):
        enc = _ENC_BY_NAME.get(field)
        return enc if enc is not None else f.field_by_name(field).encoding
    if isinstance(field, bool) or not isinstance(field, int):
        raise TypeError(f"a VMCS field is an encoding or a name, not {type(field).__name__}")
    if field < 0:
        raise ValueError(f"a VMCS field encoding is non-negative, not {field}")
    return field


def _check_value(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"a VMCS value is an int, not {type(value).__name__}")
    if not 0 <= value <= _MASK64:
        raise ValueError(f"VMWRITE source {value:#x} is not a 64-bit operand")
    return value


class Vmcs:
    """A view of the 4 KiB VMCS region at physical address ``pa`` of ``mem``.

    Creating a view does not change memory; :meth:`format` initialises a
    fresh region the way software does before VMPTRLD (zeroes, writes the
    revision identifier) and clears its launch state.
    """

    __slots__ = ("mem", "pa", "model", "_view", "_read", "_write", "_readable", "_writable")

    def __init__(self, mem, pa: int, model=None):
        if pa < 0 or pa & 0xFFF:
            raise ValueError(f"a VMCS region is 4 KiB aligned; {pa:#x} is not")
        contains = getattr(mem, "contains", None)
        if contains is not None and not contains(pa, VMCS_REGION_SIZE):
            raise ValueError(f"VMCS region {pa:#x}+4 KiB is outside memory")
        self.mem = mem
        self.pa = pa
        self.model = caps.model_of(model)     # whose fields exist (a CpuModel)
        self._readable, self._writable = field_access(self.model)
        view = getattr(mem, "view", None)
        self._view = view if isinstance(view, memoryview) and len(view) >= pa + VMCS_REGION_SIZE else None
        if self._view is not None:
            self._read = self._read_view
            self._write = self._write_view
        else:
            self._read = self._read_mem
            self._write = self._write_mem

    # -- raw byte access ---------------------------------------------------
    def _read_view(self, off: int, st: struct.Struct) -> int:
        return st.unpack_from(self._view, self.pa + off)[0]

    def _write_view(self, off: int, st: struct.Struct, value: int) -> None:
        st.pack_into(self._view, self.pa + off, value)

    def _read_mem(self, off: int, st: struct.Struct) -> int:
        return st.unpack(self.mem.read(self.pa + off, st.size))[0]

    def _write_mem(self, off: int, st: struct.Struct, value: int) -> None:
        self.mem.write(self.pa + off, st.pack(value))

    # -- construction ------------------------------------------------------
    @classmethod
    def format(cls, mem, pa: int, revision_id: Optional[int] = None, shadow: bool = False,
               model=None) -> "Vmcs":
        """Zero the region, write the revision identifier (default: the CPU
        model's, from IA32_VMX_BASIC) and the shadow-VMCS indicator, launch state clear."""
        vmcs = cls(mem, pa, model)
        if vmcs._view is not None:
            vmcs._view[pa:pa + VMCS_REGION_SIZE] = bytes(VMCS_REGION_SIZE)
        else:
            mem.write(pa, bytes(VMCS_REGION_SIZE))
        rev = (c.vmx_basic_revision_id(vmcs.model.vmx_msrs[caps.MSR_IA32_VMX_BASIC])
               if revision_id is None else revision_id)
        vmcs.revision_id = rev
        vmcs.shadow_indicator = shadow
        vmcs.clear()
        return vmcs

    # -- architectural header ------------------------------------------------
    @property
    def revision_id(self) -> int:
        """Bits 30:0 of the first dword."""
        return self._read(OFF_REVISION, _U32) & ~SHADOW_VMCS_INDICATOR

    @revision_id.setter
    def revision_id(self, value: int) -> None:
        if not 0 <= value < SHADOW_VMCS_INDICATOR:
            raise ValueError(f"VMCS revision identifier {value:#x} does not fit bits 30:0")
        old = self._read(OFF_REVISION, _U32)
        self._write(OFF_REVISION, _U32, (old & SHADOW_VMCS_INDICATOR) | value)

    @property
    def shadow_indicator(self) -> bool:
        """Bit 31 of the first dword: this region is a shadow VMCS."""
        return bool(self._read(OFF_REVISION, _U32) & SHADOW_VMCS_INDICATOR)

    @shadow_indicator.setter
    def shadow_indicator(self, value: bool) -> None:
        old = self._read(OFF_REVISION, _U32)
        self._write(OFF_REVISION, _U32,
                    (old | SHADOW_VMCS_INDICATOR) if value else (old & ~SHADOW_VMCS_INDICATOR))

    @property
    def abort_indicator(self) -> int:
        """The VMX-abort indicator (written by a VMX abort, SDM 28.7)."""
        return self._read(OFF_ABORT, _U32)

    @abort_indicator.setter
    def abort_indicator(self, value: int) -> None:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"VMX-abort indicator {value:#x} is not 32 bits")
        self._write(OFF_ABORT, _U32, value)

    @property
    def launch_state(self) -> str:
        """"clear" or "launched" (kept at offset 8 of the region)."""
        raw = self._read(OFF_LAUNCH_STATE, _U32)
        try:
            return _LAUNCH_NAMES[raw]
        except KeyError:
            raise ValueError(f"VMCS at {self.pa:#x} has a corrupt launch state {raw:#x}") from None

    @launch_state.setter
    def launch_state(self, value: str) -> None:
        try:
            raw = _LAUNCH_VALUES[value]
        except KeyError:
            raise ValueError(f"launch state is 'clear' or 'launched', not {value!r}") from None
        self._write(OFF_LAUNCH_STATE, _U32, raw)

    def clear(self) -> None:
        """VMCLEAR's effect on the region: launch state clear.

        VMCLEAR also writes any processor-cached VMCS data back to memory; this
        model keeps all VMCS data in memory, so there is nothing to write back
        and the field values are unchanged.
        """
        self._write(OFF_LAUNCH_STATE, _U32, LAUNCH_STATE_CLEAR)

    # -- VMREAD / VMWRITE ------------------------------------------------------
    def vmread(self, enc: int) -> int:
        """VMREAD of ``enc``: the field's value, zero-extended to 64 bits."""
        slot = self._readable.get(enc)
        if slot is None:
            _key(enc)
            raise self.vmfail_valid(VmInstructionErrorNumber.VMXERR_UNSUPPORTED_VMCS_COMPONENT,
                                    f"VMREAD of unsupported VMCS component {_describe(enc)}")
        return self._read(slot[0], slot[1])

    def vmwrite(self, enc: int, value: int) -> None:
        """VMWRITE of ``value`` (a 64-bit operand) to ``enc``, truncated to the field."""
        slot = self._writable.get(enc)
        if slot is None:
            _key(enc)
            if enc in self._readable:
                raise self.vmfail_valid(
                    VmInstructionErrorNumber.VMXERR_VMWRITE_READ_ONLY_VMCS_COMPONENT,
                    f"VMWRITE to read-only VMCS component {_describe(enc)}")
            raise self.vmfail_valid(VmInstructionErrorNumber.VMXERR_UNSUPPORTED_VMCS_COMPONENT,
                                    f"VMWRITE to unsupported VMCS component {_describe(enc)}")
        self._write(slot[0], slot[1], _check_value(value) & slot[2])

    def vmfail_valid(self, errno: int, detail: str = "") -> VmxInstructionError:
        """Record ``errno`` in VM_INSTRUCTION_ERROR (VMfailValid) and return the exception."""
        off, st, _ = FIELD_SLOTS[_ERR_FIELD]
        self._write(off, st, int(errno))
        return VmxInstructionError(errno, detail)

    # -- the processor's own accesses ----------------------------------------
    def get(self, field: FieldKey) -> int:
        """The value of a supported field, as the processor reads it."""
        enc = _key(field)
        slot = self._readable.get(enc)
        if slot is None:
            raise ValueError(f"{_describe(enc)} is not a VMCS field of the modelled CPU")
        return self._read(slot[0], slot[1])

    def set(self, field: FieldKey, value: int) -> None:
        """Write a supported field as the processor does (exit information too).

        The value must fit the field (16, 32 or 64 bits; 32 for a high access).
        """
        enc = _key(field)
        slot = self._readable.get(enc)
        if slot is None:
            raise ValueError(f"{_describe(enc)} is not a VMCS field of the modelled CPU")
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"a VMCS value is an int, not {type(value).__name__}")
        if not 0 <= value <= slot[2]:
            raise ValueError(f"{value:#x} does not fit the {slot[1].size * 8}-bit field "
                             f"{_describe(enc)}")
        self._write(slot[0], slot[1], value)

    # -- name-based convenience --------------------------------------------
    def __getitem__(self, field: FieldKey) -> int:
        return self.vmread(_key(field))

    def __setitem__(self, field: FieldKey, value: int) -> None:
        self.vmwrite(_key(field), value)

    def items(self) -> Iterator[tuple[str, int]]:
        """(name, value) of every supported full field, in table order."""
        for info in f.ALL_FIELDS:
            if not info.high and info.encoding in self._readable:
                slot = self._readable[info.encoding]
                yield info.name, self._read(slot[0], slot[1])

    def __repr__(self) -> str:
        return f"<Vmcs at {self.pa:#x} revision {self.revision_id:#x}>"


def _describe(enc: int) -> str:
    info = f.field_info(enc) if 0 <= enc <= 0xFFFFFFFF else None
    return f"{info.name} ({enc:#x})" if info else f"{enc:#x}"
