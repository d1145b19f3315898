"""VM-exit information encoders: small pure functions, one per SDM format.

Sources, Intel SDM Vol. 3C, chapter "VM Exits", section "Exit Information"
(the tables are named here as the SDM names them):

* exit qualifications: "Exit Qualification for Control-Register Accesses",
  "... for MOV DR", "... for I/O Instructions", "... for Task Switches",
  "... for APIC-Access VM Exits", "... for Debug Exceptions"; the text on
  INVLPG (the linear address) and on INVEPT/INVPCID/INVVPID, the descriptor-
  table instructions, the VMX instructions, XSAVES/XRSTORS (the displacement
  field, or displacement plus next RIP for RIP-relative addressing);
* VM-exit instruction information: "Format of the VM-Exit Instruction-
  Information Field as Used for INS and OUTS", "... for INVEPT, INVPCID, and
  INVVPID", "... for LIDT, LGDT, SIDT, or SGDT", "... for LLDT, LTR, SLDT,
  and STR", "... for RDRAND, RDSEED, TPAUSE, and UMWAIT", "... for VMCLEAR,
  VMPTRLD, VMPTRST, VMXON, XRSTORS, and XSAVES", "... for VMREAD and
  VMWRITE";
* VM-exit interruption information and IDT-vectoring information
  ("Format of the VM-Exit Interruption-Information Field", "Format of the
  IDT-Vectoring Information Field").

Bits the SDM calls *undefined* are written as 0 here, so that every encoding
is deterministic.  Register numbers are the SDM's (0 = RAX ... 15 = R15, the
:data:`devirt_emu.events.GPR_NAMES` order); segment numbers are ES=0 ...
GS=5.  Bad input (a size, register or selector out of range) raises
:class:`ValueError` naming the field.

Operand conventions taken from :class:`devirt_emu.events.Insn`:

* VMREAD/VMWRITE: ``insn.gpr`` is the ModRM.reg register (the one holding
  the VMCS-field encoding: *Reg2* in the SDM format) and ``insn.gpr2`` the
  ModRM.r/m register of the register form (*Reg1*); the memory form has
  ``insn.mem`` instead of ``gpr2``.
* INVEPT/INVPCID/INVVPID: ``insn.gpr`` is the register operand (the type,
  *Reg2*), ``insn.mem`` the descriptor in memory.
* LLDT/LTR/SLDT/STR: ``insn.gpr`` (register form) or ``insn.mem``.
* RDRAND/RDSEED/UMWAIT/TPAUSE: ``insn.gpr`` and ``insn.op_size``.
"""
from __future__ import annotations

from typing import Optional

from devirt_emu.events import Insn, Kind, MemOperand
from devirt_emu.vmx import controls as C
from devirt_emu.x86 import X86_TRAP_NMI

_U64 = (1 << 64) - 1

# --------------------------------------------------------------------------
# Control-register accesses (exit reason 28)
# --------------------------------------------------------------------------
#: Access type, bits 5:4.
CR_ACCESS_MOV_TO_CR = 0
CR_ACCESS_MOV_FROM_CR = 1
CR_ACCESS_CLTS = 2
CR_ACCESS_LMSW = 3


def cr_access_qualification(cr: int, access: int, gpr: int = 0, *,
                            lmsw_memory: bool = False, lmsw_source: int = 0) -> int:
    """Exit qualification for a control-register access.

    Bits 3:0 the CR number (0 for CLTS and LMSW), 5:4 the access type,
    6 the LMSW operand type (1 = memory), 11:8 the general register of MOV CR
    (0 for CLTS and LMSW), 31:16 the LMSW source data (0 otherwise).
    """
    _check("CR number", cr, 15)
    _check("CR access type", access, 3)
    _check("general register", gpr, 15)
    if access in (CR_ACCESS_CLTS, CR_ACCESS_LMSW):
        if cr != 0 or gpr != 0:
            raise ValueError("CLTS and LMSW qualifications have CR number 0 and no register")
    elif lmsw_memory or lmsw_source:
        raise ValueError("the LMSW operand type and source data belong to LMSW only")
    _check("LMSW source data", lmsw_source, 0xFFFF)
    return (cr | access << 4 | (1 << 6 if lmsw_memory else 0) | gpr << 8
            | lmsw_source << 16)


# --------------------------------------------------------------------------
# MOV DR (exit reason 29)
# --------------------------------------------------------------------------
def dr_access_qualification(dr: int, from_dr: bool, gpr: int) -> int:
    """Bits 2:0 the debug register, bit 4 the direction (1 = MOV from DR),
    bits 11:8 the general register."""
    _check("debug register", dr, 7)
    _check("general register", gpr, 15)
    return dr | (1 << 4 if from_dr else 0) | gpr << 8


# --------------------------------------------------------------------------
# I/O instructions (exit reason 30)
# --------------------------------------------------------------------------
_IO_SIZE_CODE = {1: 0, 2: 1, 4: 3}


def io_qualification(size: int, is_in: bool, string: bool, rep: bool,
                     immediate: bool, port: int) -> int:
    """Bits 2:0 size of access (0 = 1 byte, 1 = 2 bytes, 3 = 4 bytes), bit 3
    direction (1 = IN), bit 4 string, bit 5 REP, bit 6 operand encoding
    (1 = immediate), bits 31:16 the port."""
    code = _IO_SIZE_CODE.get(size)
    if code is None:
        raise ValueError(f"I/O access size {size!r} is not 1, 2 or 4")
    if type(port) is not int or not 0 <= port <= 0xFFFF:     # (on every I/O exit: inline)
        _check("I/O port", port, 0xFFFF)
    if immediate and string:
        raise ValueError("string I/O instructions take the port from DX, never an immediate")
    return (code | (1 << 3 if is_in else 0) | (1 << 4 if string else 0)
            | (1 << 5 if rep else 0) | (1 << 6 if immediate else 0) | port << 16)


# --------------------------------------------------------------------------
# Task switch (exit reason 9)
# --------------------------------------------------------------------------
#: Source of the task switch, bits 31:30.
TASK_SWITCH_CALL = 0
TASK_SWITCH_IRET = 1
TASK_SWITCH_JMP = 2
TASK_SWITCH_IDT = 3          # task gate in the IDT

TASK_SWITCH_SOURCES = {"CALL": TASK_SWITCH_CALL, "IRET": TASK_SWITCH_IRET,
                       "JMP": TASK_SWITCH_JMP, "IDT": TASK_SWITCH_IDT}


def task_switch_qualification(selector: int, source: int) -> int:
    """Bits 15:0 the selector of the new TSS, bits 31:30 the source."""
    _check("TSS selector", selector, 0xFFFF)
    _check("task-switch source", source, 3)
    return selector | source << 30


# --------------------------------------------------------------------------
# Linear addresses and displacements
# --------------------------------------------------------------------------
def invlpg_qualification(linear: int, long_mode_64: bool) -> int:
    """INVLPG: the linear-address operand; bits 63:32 are cleared outside
    64-bit mode."""
    return linear & (_U64 if long_mode_64 else 0xFFFFFFFF)


def displacement_qualification(mem: Optional[MemOperand], next_rip: int) -> int:
    """INVEPT, INVPCID, INVVPID, LGDT, LIDT, LLDT, LTR, SGDT, SIDT, SLDT, STR,
    VMCLEAR, VMPTRLD, VMPTRST, VMREAD, VMWRITE, VMXON, XRSTORS, XSAVES.

    The displacement field sign-extended to 64 bits; 0 for a register
    operand (``mem`` None); displacement plus the RIP of the next
    instruction for RIP-relative addressing.  (The SDM leaves the bits above
    the address size undefined; they are the sign extension here.)
    """
    if mem is None:
        return 0
    disp = mem.disp
    if not -(1 << 63) <= disp < (1 << 64):
        raise ValueError(f"displacement {disp:#x} does not fit 64 bits")
    if mem.rip_relative:
        return (disp + next_rip) & _U64
    return disp & _U64


# --------------------------------------------------------------------------
# APIC access (exit reason 44)
# --------------------------------------------------------------------------
#: Access type, bits 15:12.
APIC_ACCESS_LINEAR_READ = 0
APIC_ACCESS_LINEAR_WRITE = 1
APIC_ACCESS_LINEAR_FETCH = 2
APIC_ACCESS_LINEAR_EVENT_DELIVERY = 3
APIC_ACCESS_GUEST_PHYS_EVENT_DELIVERY = 10
APIC_ACCESS_GUEST_PHYS_INSN = 15


def apic_access_qualification(offset: int, access_type: int, asynchronous: bool = False) -> int:
    """Bits 11:0 the page offset (for access types 0-3; 0 otherwise), bits
    15:12 the access type, bit 16 set for asynchronous accesses that are not
    part of event delivery."""
    if access_type not in (0, 1, 2, 3, 10, 15):
        raise ValueError(f"APIC-access type {access_type} is not one the SDM defines")
    _check("APIC-access page offset", offset, 0xFFF)
    if access_type > 3:
        offset = 0
    return offset | access_type << 12 | (1 << 16 if asynchronous else 0)


# --------------------------------------------------------------------------
# Other qualifications
# --------------------------------------------------------------------------
#: Debug-exception qualification bits (the DR6-like layout of the SDM table).
DEBUG_QUAL_B_MASK = 0xF       # B3:B0, breakpoint conditions met
DEBUG_QUAL_BLD = 1 << 11      # bus-lock detected
DEBUG_QUAL_BD = 1 << 13       # debug-register access detected
DEBUG_QUAL_BS = 1 << 14       # single step
DEBUG_QUAL_RTM = 1 << 16      # inside an RTM region


def debug_exception_qualification(dr6: int) -> int:
    """Exit qualification of a #DB VM exit from the DR6 value the exception
    would have produced.  B3:B0, BD and BS are active-high in both; BLD
    (DR6 bit 11) and RTM (DR6 bit 16) are active-low in DR6 and active-high
    in the qualification."""
    _check("DR6", dr6, 0xFFFFFFFF)
    qual = dr6 & (DEBUG_QUAL_B_MASK | DEBUG_QUAL_BD | DEBUG_QUAL_BS)
    if not dr6 & (1 << 11):
        qual |= DEBUG_QUAL_BLD
    if not dr6 & (1 << 16):
        qual |= DEBUG_QUAL_RTM
    return qual


def sipi_qualification(vector: int) -> int:
    """SIPI: bits 7:0 the SIPI vector."""
    _check("SIPI vector", vector, 0xFF)
    return vector


def mwait_qualification(monitor_armed: bool) -> int:
    """MWAIT: bit 0 is 1 if the monitoring hardware was armed."""
    return 1 if monitor_armed else 0


# --------------------------------------------------------------------------
# VM-exit instruction information
# --------------------------------------------------------------------------
_SCALE_CODE = {1: 0, 2: 1, 4: 2, 8: 3}
_ADDR_SIZE_CODE = {2: 0, 4: 1, 8: 2}
_OP_SIZE_CODE = {2: 0, 4: 1, 8: 2}

INFO_MEM_REG = 1 << 10            # Mem/Reg: 1 = register operand
INFO_INDEX_INVALID = 1 << 22
INFO_BASE_INVALID = 1 << 27

#: Instruction identity, bits 29:28, of the descriptor-table formats.
GDTR_IDTR_IDENTITY = {Kind.SGDT: 0, Kind.SIDT: 1, Kind.LGDT: 2, Kind.LIDT: 3}
LDTR_TR_IDENTITY = {Kind.SLDT: 0, Kind.STR: 1, Kind.LLDT: 2, Kind.LTR: 3}


def _addr_size_code(addr_size: int) -> int:
    try:
        return _ADDR_SIZE_CODE[addr_size]
    except KeyError:
        raise ValueError(f"address size {addr_size!r} is not 2, 4 or 8 bytes") from None


def _memory_bits(mem: MemOperand) -> int:
    """Scaling (1:0), address size (9:7), segment (17:15), index (21:18, invalid
    22), base (26:23, invalid 27): the memory-operand part common to every
    format but INS/OUTS.  Scaling is 0 when there is no index register."""
    _check("segment register", mem.seg, 5)
    bits = _addr_size_code(mem.addr_size) << 7 | mem.seg << 15
    if mem.index is None:
        bits |= INFO_INDEX_INVALID
    else:
        _check("index register", mem.index, 15)
        try:
            bits |= _SCALE_CODE[mem.scale]
        except KeyError:
            raise ValueError(f"scale {mem.scale!r} is not 1, 2, 4 or 8") from None
        bits |= mem.index << 18
    if mem.base is None or mem.rip_relative:
        bits |= INFO_BASE_INVALID
    else:
        _check("base register", mem.base, 15)
        bits |= mem.base << 23
    return bits


def _need_mem(insn: Insn) -> MemOperand:
    if insn.mem is None:
        raise ValueError(f"{insn.kind.value} needs a memory operand for its instruction information")
    return insn.mem


def _need_gpr(value: Optional[int], what: str) -> int:
    if value is None:
        raise ValueError(f"{what} register is missing")
    _check(what + " register", value, 15)
    return value


def ins_outs_info(addr_size: int, seg: int) -> int:
    """INS/OUTS: bits 9:7 address size, bits 17:15 segment register (the SDM
    leaves the segment undefined for INS; ES, its only possible segment, is
    written)."""
    _check("segment register", seg, 5)
    return _addr_size_code(addr_size) << 7 | seg << 15


def invalidate_info(mem: MemOperand, reg2: int) -> int:
    """INVEPT/INVPCID/INVVPID: memory-operand bits, bit 10 clear, bits 31:28
    Reg2 (the register operand)."""
    return _memory_bits(mem) | _need_gpr(reg2, "Reg2") << 28


def gdtr_idtr_info(mem: MemOperand, identity: int, op_size: int) -> int:
    """LIDT/LGDT/SIDT/SGDT: memory-operand bits, bit 11 operand size
    (0 = 16-bit, 1 = 32-bit; undefined, written 0, for 64-bit operand size),
    bits 29:28 identity (0 SGDT, 1 SIDT, 2 LGDT, 3 LIDT)."""
    _check("instruction identity", identity, 3)
    if op_size not in (2, 4, 8):
        raise ValueError(f"operand size {op_size!r} is not 2, 4 or 8 bytes")
    return _memory_bits(mem) | (1 << 11 if op_size == 4 else 0) | identity << 28


def ldtr_tr_info(mem: Optional[MemOperand], reg1: Optional[int], identity: int) -> int:
    """LLDT/LTR/SLDT/STR: memory form as the common memory bits, register
    form as bit 10 set and bits 6:3 Reg1; bits 29:28 identity (0 SLDT, 1 STR,
    2 LLDT, 3 LTR)."""
    _check("instruction identity", identity, 3)
    if (mem is None) == (reg1 is None):
        raise ValueError("LLDT/LTR/SLDT/STR take exactly one of a memory or a register operand")
    if mem is not None:
        return _memory_bits(mem) | identity << 28
    return _need_gpr(reg1, "Reg1") << 3 | INFO_MEM_REG | identity << 28


def register_info(reg: int, op_size: int) -> int:
    """RDRAND/RDSEED (destination) and TPAUSE/UMWAIT (source): bits 6:3 the
    register, bits 12:11 the operand size (0 = 16, 1 = 32, 2 = 64 bits)."""
    try:
        code = _OP_SIZE_CODE[op_size]
    except KeyError:
        raise ValueError(f"operand size {op_size!r} is not 2, 4 or 8 bytes") from None
    return _need_gpr(reg, "operand") << 3 | code << 11


def vmx_memory_info(mem: MemOperand) -> int:
    """VMCLEAR/VMPTRLD/VMPTRST/VMXON/XRSTORS/XSAVES: memory-operand bits,
    bit 10 clear."""
    return _memory_bits(mem)


def vmread_vmwrite_info(mem: Optional[MemOperand], reg1: Optional[int], reg2: int) -> int:
    """VMREAD/VMWRITE: memory form as the common memory bits, register form
    as bit 10 set and bits 6:3 Reg1; bits 31:28 Reg2 (the register with the
    VMCS-field encoding)."""
    if (mem is None) == (reg1 is None):
        raise ValueError("VMREAD/VMWRITE take exactly one of a memory or a register r/m operand")
    reg2_bits = _need_gpr(reg2, "Reg2") << 28
    if mem is not None:
        return _memory_bits(mem) | reg2_bits
    return _need_gpr(reg1, "Reg1") << 3 | INFO_MEM_REG | reg2_bits


def instruction_info(insn: Insn) -> Optional[int]:
    """The VM-exit instruction-information field for ``insn``, or None when
    the SDM leaves it undefined for that instruction (IN/OUT, HLT, ...)."""
    encode = _INFO_BY_KIND.get(insn.kind)
    return encode(insn) if encode is not None else None


def _ins_outs(insn: Insn) -> int:
    if insn.kind is Kind.INS:
        seg = 0                               # INS always writes ES:[rDI]
    else:
        seg = insn.mem.seg if insn.mem is not None else 3   # OUTS: DS unless overridden
    return ins_outs_info(insn.addr_size, seg)


_INFO_BY_KIND = {
    Kind.INS: _ins_outs,
    Kind.OUTS: _ins_outs,
    Kind.INVEPT: lambda i: invalidate_info(_need_mem(i), i.gpr),
    Kind.INVPCID: lambda i: invalidate_info(_need_mem(i), i.gpr),
    Kind.INVVPID: lambda i: invalidate_info(_need_mem(i), i.gpr),
    Kind.SGDT: lambda i: gdtr_idtr_info(_need_mem(i), GDTR_IDTR_IDENTITY[i.kind], i.op_size),
    Kind.SIDT: lambda i: gdtr_idtr_info(_need_mem(i), GDTR_IDTR_IDENTITY[i.kind], i.op_size),
    Kind.LGDT: lambda i: gdtr_idtr_info(_need_mem(i), GDTR_IDTR_IDENTITY[i.kind], i.op_size),
    Kind.LIDT: lambda i: gdtr_idtr_info(_need_mem(i), GDTR_IDTR_IDENTITY[i.kind], i.op_size),
    Kind.SLDT: lambda i: ldtr_tr_info(i.mem, None if i.mem is not None else i.gpr,
                                      LDTR_TR_IDENTITY[i.kind]),
    Kind.STR: lambda i: ldtr_tr_info(i.mem, None if i.mem is not None else i.gpr,
                                     LDTR_TR_IDENTITY[i.kind]),
    Kind.LLDT: lambda i: ldtr_tr_info(i.mem, None if i.mem is not None else i.gpr,
                                      LDTR_TR_IDENTITY[i.kind]),
    Kind.LTR: lambda i: ldtr_tr_info(i.mem, None if i.mem is not None else i.gpr,
                                     LDTR_TR_IDENTITY[i.kind]),
    Kind.RDRAND: lambda i: register_info(i.gpr, i.op_size),
    Kind.RDSEED: lambda i: register_info(i.gpr, i.op_size),
    Kind.UMWAIT: lambda i: register_info(i.gpr, i.op_size),
    Kind.TPAUSE: lambda i: register_info(i.gpr, i.op_size),
    Kind.VMCLEAR: lambda i: vmx_memory_info(_need_mem(i)),
    Kind.VMPTRLD: lambda i: vmx_memory_info(_need_mem(i)),
    Kind.VMPTRST: lambda i: vmx_memory_info(_need_mem(i)),
    Kind.VMXON: lambda i: vmx_memory_info(_need_mem(i)),
    Kind.XSAVES: lambda i: vmx_memory_info(_need_mem(i)),
    Kind.XRSTORS: lambda i: vmx_memory_info(_need_mem(i)),
    Kind.VMREAD: lambda i: vmread_vmwrite_info(i.mem, None if i.mem is not None else i.gpr2,
                                               i.gpr),
    Kind.VMWRITE: lambda i: vmread_vmwrite_info(i.mem, None if i.mem is not None else i.gpr2,
                                                i.gpr),
}

#: Instructions whose exit qualification is the displacement (see
#: :func:`displacement_qualification`).
DISPLACEMENT_KINDS = frozenset({
    Kind.INVEPT, Kind.INVPCID, Kind.INVVPID, Kind.LGDT, Kind.LIDT, Kind.LLDT, Kind.LTR,
    Kind.SGDT, Kind.SIDT, Kind.SLDT, Kind.STR, Kind.VMCLEAR, Kind.VMPTRLD, Kind.VMPTRST,
    Kind.VMREAD, Kind.VMWRITE, Kind.VMXON, Kind.XRSTORS, Kind.XSAVES,
})

# --------------------------------------------------------------------------
# Interruption information and IDT-vectoring information
# --------------------------------------------------------------------------
#: The interruption types an exit can report (not 1, reserved, nor 7, used only on entry).
_EVENT_TYPES = frozenset({C.INTR_TYPE_EXT_INTR, C.INTR_TYPE_NMI_INTR, C.INTR_TYPE_HARD_EXCEPTION,
                          C.INTR_TYPE_SOFT_INTR, C.INTR_TYPE_PRIV_SW_EXCEPTION,
                          C.INTR_TYPE_SOFT_EXCEPTION})


def interruption_info(vector: int, intr_type: int, error_code_valid: bool = False,
                      nmi_unblocked_by_iret: bool = False) -> int:
    """VM-exit interruption information: bits 7:0 vector, 10:8 type, 11 error
    code valid, 12 NMI unblocking due to IRET, 31 valid.  ``intr_type`` is a
    :mod:`~devirt_emu.vmx.controls` ``INTR_TYPE_*`` value (already in bits 10:8).

    The SDM's constraints are enforced: type 1 is reserved and type 7 is not
    used on exits; an NMI has vector 2; only hardware exceptions carry error
    codes.
    """
    _check_event(vector, intr_type, error_code_valid)
    return (vector | intr_type | (C.INTR_INFO_DELIVER_CODE_MASK if error_code_valid else 0)
            | (C.INTR_INFO_UNBLOCK_NMI if nmi_unblocked_by_iret else 0) | C.INTR_INFO_VALID_MASK)


def idt_vectoring_info(vector: int, intr_type: int, error_code_valid: bool = False) -> int:
    """IDT-vectoring information (an exit during event delivery): bits 7:0
    vector, 10:8 type, 11 error code valid, 31 valid (bit 12 is undefined,
    written 0)."""
    _check_event(vector, intr_type, error_code_valid)
    return (vector | intr_type | (C.INTR_INFO_DELIVER_CODE_MASK if error_code_valid else 0)
            | C.INTR_INFO_VALID_MASK)


def _check_event(vector: int, intr_type: int, error_code_valid: bool) -> None:
    _check("vector", vector, 0xFF)
    if intr_type not in _EVENT_TYPES:
        raise ValueError(f"interruption type {intr_type:#x} is not valid here")
    if intr_type == C.INTR_TYPE_NMI_INTR and vector != X86_TRAP_NMI:
        raise ValueError(f"an NMI has vector 2, not {vector}")
    if intr_type in (C.INTR_TYPE_HARD_EXCEPTION, C.INTR_TYPE_PRIV_SW_EXCEPTION,
                     C.INTR_TYPE_SOFT_EXCEPTION) and vector > 31:
        raise ValueError(f"exception vector {vector} is above 31")
    if error_code_valid and intr_type != C.INTR_TYPE_HARD_EXCEPTION:
        raise ValueError("only hardware exceptions deliver an error code")


def _check(what: str, value: int, maximum: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= maximum:
        raise ValueError(f"{what} {value!r} is out of range 0..{maximum:#x}")
