"""The VMCB: one table of the control area and the state-save area, and an
accessor that reads and writes the 4 KiB region in memory by field name.

Source: AMD64 Architecture Programmer's Manual Volume 2, Appendix B "Layout
of VMCB" (Table B-1 "VMCB Layout, Control Area", Table B-2 "VMCB Layout,
State Save Area"), and Section 15.5.1 ("the VMCB ... is a 4-Kbyte-aligned
page").  Names are Linux's ``struct vmcb_control_area`` and ``struct
vmcb_save_area`` (``arch/x86/include/asm/svm.h``).  The state-save area
starts at offset 0x400; the APM gives its offsets relative to that start,
this table gives them from the start of the VMCB (APM offset + 0x400).

The intercept vectors are the 32-bit words ``intercepts[0..5]`` at 0x000-
0x014 (their bits: :mod:`devirt_emu.svm.intercepts`).  A segment register in
the save area is 16 bytes (``struct vmcb_seg``: selector, attrib, limit,
base); each of its four parts is a row here (``es_selector``, ``es_attrib``,
``es_limit``, ``es_base``, ...), so that every row is one little-endian
integer.  ``insn_bytes`` is 15 bytes and read as bytes.

The VMCB is memory: :class:`Vmcb` reads and writes the region through the
machine's physical memory (the L0 model and the processor model use the
same accessor, as a hypervisor running as guest code would use loads and
stores).  Nothing is cached.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import Iterator, Mapping

VMCB_SIZE = 0x1000
SAVE_AREA = 0x400


@dataclass(frozen=True)
class VmcbField:
    """One row: byte offset from the start of the VMCB, size in bytes, Linux name."""

    offset: int
    size: int
    name: str
    area: str           # "control" or "save"


# (offset, size, name): Table B-1, the control area.
_CONTROL = (
    (0x000, 4, "intercept_cr"),          # intercepts[0]: CR reads 15:0, CR writes 31:16
    (0x004, 4, "intercept_dr"),          # intercepts[1]: DR reads 15:0, DR writes 31:16
    (0x008, 4, "intercept_exceptions"),  # intercepts[2]: exception vectors 31:0
    (0x00C, 4, "intercept_word3"),       # intercepts[3]: INTR ... SHUTDOWN
    (0x010, 4, "intercept_word4"),       # intercepts[4]: VMRUN ... CR write traps
    (0x014, 4, "intercept_word5"),       # intercepts[5]: INVLPGB ... (0x018-0x03B reserved)
    (0x03C, 2, "pause_filter_thresh"),
    (0x03E, 2, "pause_filter_count"),
    (0x040, 8, "iopm_base_pa"),
    (0x048, 8, "msrpm_base_pa"),
    (0x050, 8, "tsc_offset"),
    (0x058, 4, "asid"),
    (0x05C, 1, "tlb_ctl"),
    (0x060, 4, "int_ctl"),               # V_TPR, V_IRQ, VGIF, V_INTR_PRIO, V_IGN_TPR, V_INTR_MASKING, ...
    (0x064, 4, "int_vector"),
    (0x068, 4, "int_state"),             # bit 0 interrupt shadow, bit 1 guest interrupt mask
    (0x070, 4, "exit_code"),
    (0x074, 4, "exit_code_hi"),
    (0x078, 8, "exit_info_1"),
    (0x080, 8, "exit_info_2"),
    (0x088, 4, "exit_int_info"),
    (0x08C, 4, "exit_int_info_err"),
    (0x090, 8, "nested_ctl"),            # bit 0 NP_ENABLE, 1 SEV, 2 SEV-ES, ...
    (0x098, 8, "avic_vapic_bar"),
    (0x0A0, 8, "ghcb_gpa"),
    (0x0A8, 4, "event_inj"),
    (0x0AC, 4, "event_inj_err"),
    (0x0B0, 8, "nested_cr3"),
    (0x0B8, 8, "virt_ext"),              # bit 0 LBR virtualization, bit 1 virtual VMLOAD/VMSAVE
    (0x0C0, 4, "clean"),
    (0x0C8, 8, "next_rip"),
    (0x0D0, 1, "insn_len"),
    (0x0D1, 15, "insn_bytes"),
    (0x0E0, 8, "avic_backing_page"),
    (0x0F0, 8, "avic_logical_id"),
    (0x0F8, 8, "avic_physical_id"),
    (0x108, 8, "vmsa_pa"),
)

_SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs", "gdtr", "ldtr", "idtr", "tr")

# Table B-2, the state-save area (APM offsets, relative to 0x400).
_SAVE = (
    *((0x10 * i + part_off, part_size, f"{seg}_{part}")
      for i, seg in enumerate(_SEGMENTS)
      for part_off, part_size, part in ((0, 2, "selector"), (2, 2, "attrib"), (4, 4, "limit"),
                                        (8, 8, "base"))),
    (0x0CA, 1, "vmpl"),
    (0x0CB, 1, "cpl"),
    (0x0D0, 8, "efer"),
    (0x140, 8, "xss"),
    (0x148, 8, "cr4"),
    (0x150, 8, "cr3"),
    (0x158, 8, "cr0"),
    (0x160, 8, "dr7"),
    (0x168, 8, "dr6"),
    (0x170, 8, "rflags"),
    (0x178, 8, "rip"),
    (0x1D8, 8, "rsp"),
    (0x1E0, 8, "s_cet"),
    (0x1E8, 8, "ssp"),
    (0x1F0, 8, "isst_addr"),
    (0x1F8, 8, "rax"),
    (0x200, 8, "star"),
    (0x208, 8, "lstar"),
    (0x210, 8, "cstar"),
    (0x218, 8, "sfmask"),
    (0x220, 8, "kernel_gs_base"),
    (0x228, 8, "sysenter_cs"),
    (0x230, 8, "sysenter_esp"),
    (0x238, 8, "sysenter_eip"),
    (0x240, 8, "cr2"),
    (0x268, 8, "g_pat"),
    (0x270, 8, "dbgctl"),
    (0x278, 8, "br_from"),
    (0x280, 8, "br_to"),
    (0x288, 8, "last_excp_from"),
    (0x290, 8, "last_excp_to"),
    (0x2E0, 8, "spec_ctrl"),
)

#: Every field, in offset order.
TABLE: tuple[VmcbField, ...] = tuple(
    [VmcbField(o, s, n, "control") for o, s, n in _CONTROL]
    + sorted((VmcbField(SAVE_AREA + o, s, n, "save") for o, s, n in _SAVE),
             key=lambda f: f.offset))

BY_NAME: Mapping[str, VmcbField] = MappingProxyType({f.name: f for f in TABLE})
#: The segment registers of the save area, in the APM's order.
SEGMENTS = _SEGMENTS

assert len(BY_NAME) == len(TABLE), "VMCB field names are unique"
assert all(a.offset + a.size <= b.offset for a, b in zip(TABLE, TABLE[1:])), "no overlap"

_STRUCTS = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"),
            8: struct.Struct("<Q")}


def field(name: str) -> VmcbField:
    """The row named ``name`` (KeyError with a clear message otherwise)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no VMCB field is named {name!r}") from None


#: name -> (unpack_from, pack_into, offset, max value) of every integer field.
_SLOTS = {f.name: (_STRUCTS[f.size].unpack_from, _STRUCTS[f.size].pack_into, f.offset,
                   (1 << (8 * f.size)) - 1)
          for f in TABLE if f.size in _STRUCTS}


class Vmcb:
    """The VMCB at physical address ``pa`` of ``mem`` (a PhysMem: ``view``, or
    ``read``/``write``).

    ``vmcb["asid"]`` and ``vmcb.get("asid")`` read a field, ``vmcb["asid"] = 1``
    and ``set`` write it (a value too wide for the field is a ValueError);
    ``insn_bytes`` reads and writes bytes.  The region is the truth: nothing
    is cached here.
    """

    __slots__ = ("mem", "pa", "_view")

    def __init__(self, mem, pa: int):
        if pa % VMCB_SIZE:
            raise ValueError(f"a VMCB is 4 KiB aligned; {pa:#x} is not")
        self.mem = mem
        self.pa = pa
        self._view = getattr(mem, "view", None)

    def get(self, name: str):
        slot = _SLOTS.get(name)
        if slot is None:
            f = field(name)
            return self.mem.read(self.pa + f.offset, f.size)
        if self._view is not None:
            return slot[0](self._view, self.pa + slot[2])[0]
        return slot[0](self.mem.read(self.pa + slot[2], _size(slot)), 0)[0]

    def set(self, name: str, value) -> None:
        slot = _SLOTS.get(name)
        if slot is None:
            f = field(name)
            data = bytes(value)
            if len(data) > f.size:
                raise ValueError(f"{name} holds {f.size} bytes, not {len(data)}")
            self.mem.write(self.pa + f.offset, data.ljust(f.size, b"\0"))
            return
        _, pack, off, top = slot
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: expected an int, not {type(value).__name__}")
        if value < 0:
            if name != "exit_code" and name != "exit_code_hi":
                raise ValueError(f"{name}: negative value")
            value &= top            # EXITCODE -1 as its two's complement
        if value > top:
            raise ValueError(f"{name} is {top.bit_length()} bits; {value:#x} does not fit")
        if self._view is not None:
            pack(self._view, self.pa + off, value)
        else:
            buf = bytearray(_size(slot))
            pack(buf, 0, value)
            self.mem.write(self.pa + off, bytes(buf))

    def put(self, name: str, value: int) -> None:
        """The processor's own write of a value it knows fits (no checks)."""
        _, pack, off, top = _SLOTS[name]
        pack(self._view, self.pa + off, value & top)

    __getitem__ = get
    __setitem__ = set

    # --- the 64-bit exit code (exit_code and exit_code_hi are one EXITCODE) ---
    @property
    def exitcode(self) -> int:
        """EXITCODE as a signed 64-bit number (VMEXIT_INVALID reads -1)."""
        v = self.get("exit_code") | self.get("exit_code_hi") << 32
        return v - (1 << 64) if v >= 1 << 63 else v

    @exitcode.setter
    def exitcode(self, code: int) -> None:
        v = code & ((1 << 64) - 1)
        self.set("exit_code", v & 0xFFFFFFFF)
        self.set("exit_code_hi", v >> 32)

    def intercept_word(self, index: int) -> int:
        """``intercepts[index]`` (0-5), the 32-bit vector at offset 4 * index."""
        return self.get(_INTERCEPT_WORDS[index])

    def set_intercept_word(self, index: int, value: int) -> None:
        self.set(_INTERCEPT_WORDS[index], value)

    def clear(self) -> None:
        """Zero the whole 4 KiB region."""
        self.mem.write(self.pa, bytes(VMCB_SIZE))

    def items(self) -> Iterator[tuple[str, object]]:
        for f in TABLE:
            yield f.name, self.get(f.name)

    def snapshot(self) -> "VmcbSnapshot":
        """The region's bytes now, readable by field name."""
        return VmcbSnapshot(self.mem.read(self.pa, VMCB_SIZE))


class VmcbSnapshot(Mapping):
    """A copy of a VMCB's 4 KiB, as a read-only mapping of field name to value."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data

    def __getitem__(self, name: str):
        slot = _SLOTS.get(name)
        if slot is None:
            f = field(name)
            return self.data[f.offset:f.offset + f.size]
        return slot[0](self.data, slot[2])[0]

    def __iter__(self):
        return (f.name for f in TABLE)

    def __len__(self) -> int:
        return len(TABLE)


def _size(slot) -> int:
    return {0xFF: 1, 0xFFFF: 2, 0xFFFFFFFF: 4}.get(slot[3], 8)


_INTERCEPT_WORDS = ("intercept_cr", "intercept_dr", "intercept_exceptions", "intercept_word3",
                    "intercept_word4", "intercept_word5")
#: The field names of the six intercept vectors, intercepts[0..5].
INTERCEPT_WORDS = _INTERCEPT_WORDS


# --- bits of the control-area fields (APM Appendix B; Linux svm.h names) ---------------
# int_ctl (offset 0x060)
V_TPR_MASK = 0x0F
V_IRQ_SHIFT, V_IRQ_MASK = 8, 1 << 8
V_GIF_SHIFT, V_GIF_MASK = 9, 1 << 9
V_NMI_PENDING_MASK = 1 << 11
V_NMI_BLOCKING_MASK = 1 << 12
V_INTR_PRIO_SHIFT, V_INTR_PRIO_MASK = 16, 0xF << 16
V_IGN_TPR_SHIFT, V_IGN_TPR_MASK = 20, 1 << 20
V_INTR_MASKING_SHIFT, V_INTR_MASKING_MASK = 24, 1 << 24
V_GIF_ENABLE_SHIFT, V_GIF_ENABLE_MASK = 25, 1 << 25
V_NMI_ENABLE_MASK = 1 << 26
X2APIC_MODE_MASK = 1 << 30
AVIC_ENABLE_MASK = 1 << 31
# int_state (offset 0x068)
SVM_INTERRUPT_SHADOW_MASK = 1 << 0
SVM_GUEST_INTERRUPT_MASK = 1 << 1
# tlb_ctl (offset 0x05C)
TLB_CONTROL_DO_NOTHING = 0
TLB_CONTROL_FLUSH_ALL_ASID = 1
TLB_CONTROL_FLUSH_ASID = 3
TLB_CONTROL_FLUSH_ASID_LOCAL = 7
TLB_CONTROL_VALUES = frozenset({0, 1, 3, 7})
# nested_ctl (offset 0x090)
SVM_NESTED_CTL_NP_ENABLE = 1 << 0
SVM_NESTED_CTL_SEV_ENABLE = 1 << 1
SVM_NESTED_CTL_SEV_ES_ENABLE = 1 << 2
# virt_ext (offset 0x0B8)
LBR_CTL_ENABLE_MASK = 1 << 0
VIRTUAL_VMLOAD_VMSAVE_ENABLE_MASK = 1 << 1
# event_inj / exit_int_info (APM 15.20 "Event Injection", 15.7.2)
SVM_EVTINJ_VEC_MASK = 0xFF
SVM_EVTINJ_TYPE_SHIFT = 8
SVM_EVTINJ_TYPE_MASK = 7 << 8
SVM_EVTINJ_TYPE_INTR = 0 << 8
SVM_EVTINJ_TYPE_NMI = 2 << 8
SVM_EVTINJ_TYPE_EXEPT = 3 << 8
SVM_EVTINJ_TYPE_SOFT = 4 << 8
SVM_EVTINJ_VALID_ERR = 1 << 11
SVM_EVTINJ_VALID = 1 << 31
SVM_EXITINTINFO_VEC_MASK = SVM_EVTINJ_VEC_MASK
SVM_EXITINTINFO_TYPE_MASK = SVM_EVTINJ_TYPE_MASK
SVM_EXITINTINFO_VALID = SVM_EVTINJ_VALID
SVM_EXITINTINFO_VALID_ERR = SVM_EVTINJ_VALID_ERR
