"""Decode one sensitive instruction from its bytes, and resolve memory operands.

:func:`decode_at` parses the legacy and REX prefixes, looks the opcode up in
:data:`devirt_emu.cpu.insn_table.TABLE`, reads the ModRM/SIB/displacement and
immediate that the row calls for, and returns an :class:`~devirt_emu.events.Insn`
with every operand field that applies, or None when the bytes are not an
instruction of the table.  It is its own decoder (no capstone): capstone 5
does not know RDPRU, INVLPGB, TLBSYNC or WRMSRNS, reads MCOMMIT as MONITORX
and ignores a mandatory 66 prefix in 16-bit code, and its operands would
still have to be mapped to the SDM's numbering.  The tests check every row's
length against capstone where capstone decodes it.  Decoded Insns are cached
by (mode, instruction bytes), so a repeated encoding costs one parse.

Prefix rules (Intel SDM Vol. 2 chapter 2, AMD APM Vol. 3 chapter 1):

* legacy prefixes F0, F2, F3, 26, 2E, 36, 3E, 64, 65, 66, 67 in any order and
  number; of several from one group the last one counts.
* in 64-bit mode a REX byte (40-4F) counts only when the opcode follows it
  directly; a legacy prefix after it cancels it.  In 16/32-bit mode 40-4F
  are INC/DEC, not prefixes.
* in 64-bit mode the ES, CS, SS and DS overrides are ignored (FS and GS are
  honoured); the default segment is SS for an RSP/RBP (ESP/EBP, or BP in
  16-bit addressing) base and DS otherwise.
* an instruction longer than 15 bytes is invalid (#GP): None.
* LOCK makes every instruction of the table #UD (None), except MOV CR:
  ``LOCK MOV CR0`` is AMD's alternative encoding of CR8 (CPUID
  AltMovCr8), decoded as ``cr=8``.  On Intel that encoding is #UD, which an
  Insn cannot express: the Intel rules see a CR8 access.

Operand conventions (the Insn fields, beyond what events.py states):

* ``op_size`` is the instruction's effective operand-size attribute (66,
  REX.W and the code size applied by the row's rule); ``addr_size`` the
  effective address size (67 and the code size).
* MOV CR/DR: ``gpr`` is the general register (ModRM.rm), the direction is the
  kind.  VMREAD/VMWRITE, INVEPT/INVVPID/INVPCID: ``gpr`` is ModRM.reg (the
  field-encoding register, or the type register); ``gpr2`` is ModRM.rm when
  it is a register, else ``mem`` is set.
* ``rep`` is set for INS/OUTS only; a REP prefix on other instructions is a
  mandatory prefix or ignored.  INS has ``mem`` = ES:[rDI] (no override),
  OUTS ``mem`` = DS:[rSI] (overridable), size = ``io_size``.
* MONITOR/MONITORX: ``mem`` = DS:[rAX] (overridable), size 1.  UMONITOR:
  ``gpr`` and ``mem`` = DS:[gpr].  VMRUN/VMLOAD/VMSAVE/INVLPGA take rAX,
  whose width is ``addr_size``.
* memory sizes: LGDT/LIDT/SGDT/SIDT 6 bytes (10 in 64-bit mode), SMSW/LMSW/
  SLDT/STR/LLDT/LTR/MOV SS 2, VMPTRLD/VMPTRST/VMCLEAR/VMXON 8, VMREAD/
  VMWRITE 8 (4 outside 64-bit mode), INVEPT/INVVPID/INVPCID 16, INVLPG 1 (an
  address, not an access), XSAVES/XRSTORS 0 (the XSAVE area: its size
  depends on XCR0/XSS, not on the encoding), far JMP/CALL m16:16 4 and
  m16:32 6 (offset, then selector).
* direct far JMP/CALL (EA/9A): ``selector`` is the pointer's selector; the
  offset (2 or 4 bytes by operand size) is only in the text.

Mode checks done here are the static ones (code size, REX, CR/DR numbers
that are #UD whatever the state: CR1, CR5-CR7, CR9-CR15, DR8-DR15); dynamic
ones (CPL, CR4.DE, VMX operation...) are the rules' business.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

from devirt_emu.cpu.insn_table import (
    MSZ_FAR_PTR, MSZ_IO, MSZ_PSEUDO_DESC, MSZ_XSAVE, MSZ_Y, REX_B, REX_R, REX_W, REX_X,
    TABLE, Mod, Ops, Osz, Row,
)
from devirt_emu.events import GPR_NAMES, SEG_NAMES, Insn, MemOperand

MODES = (16, 32, 64)
MAX_INSN_LEN = 15

SEG_ES, SEG_CS, SEG_SS, SEG_DS, SEG_FS, SEG_GS = range(6)

_LOCK, _REP, _SEG, _OPSZ, _ADSZ = range(1, 6)
#: Legacy prefix byte -> prefix group.
LEGACY_PREFIXES = {
    0xF0: _LOCK, 0xF2: _REP, 0xF3: _REP,
    0x26: _SEG, 0x2E: _SEG, 0x36: _SEG, 0x3E: _SEG, 0x64: _SEG, 0x65: _SEG,
    0x66: _OPSZ, 0x67: _ADSZ,
}
_SEG_PREFIX = {0x26: SEG_ES, 0x2E: SEG_CS, 0x36: SEG_SS, 0x3E: SEG_DS,
               0x64: SEG_FS, 0x65: SEG_GS}

#: Valid control registers (MOV CR with any other number is #UD).
VALID_CRS = frozenset({0, 2, 3, 4, 8})

_REG16 = ("ax", "cx", "dx", "bx", "sp", "bp", "si", "di") + tuple(f"r{i}w" for i in range(8, 16))
_REG32 = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi") + tuple(f"r{i}d" for i in range(8, 16))
_REG_NAMES = {2: _REG16, 4: _REG32, 8: GPR_NAMES}
_ACC = {1: "al", 2: "ax", 4: "eax"}
_DQ = {2: "", 4: "d", 8: "q"}
_BWD = {1: "b", 2: "w", 4: "d"}

# 16-bit addressing, ModRM.rm -> (base, index); BX=3, BP=5, SI=6, DI=7.
_MODRM16 = ((3, 6), (3, 7), (5, 6), (5, 7), (6, None), (7, None), (5, None), (3, None))

_BY_OPCODE: dict[bytes, tuple[Row, ...]] = {}
for _row in TABLE:
    _BY_OPCODE[_row.opcode] = _BY_OPCODE.get(_row.opcode, ()) + (_row,)
for _rows in _BY_OPCODE.values():
    if len({r.modrm for r in _rows}) != 1:  # one ModRM read per opcode
        raise AssertionError(f"rows of opcode {_rows[0].opcode.hex()} disagree on ModRM")
_OPCODE_LENGTHS = tuple(sorted({len(k) for k in _BY_OPCODE}, reverse=True))
del _row, _rows


def check_mode(mode: int) -> None:
    """Raise ValueError unless ``mode`` is a code size: 16, 32 or 64."""
    if mode not in MODES:
        raise ValueError(f"mode must be 16, 32 or 64 (the code size), not {mode!r}")


def decode_at(code: bytes, addr: int, mode: int) -> Optional[Insn]:
    """Decode the instruction at the start of ``code`` for code size ``mode``.

    ``code`` may run past the instruction.  Returns the Insn if the encoding
    is in the table (valid in ``mode``), None for any other instruction and
    for bytes that run out before the instruction ends.  The decode does not
    depend on ``addr`` (RIP-relative operands stay relative: see
    :func:`resolve_linear`); it is checked and kept in the signature so that
    callers pass where the bytes came from.
    """
    check_mode(mode)
    if not isinstance(addr, int) or addr < 0:
        raise ValueError(f"addr must be a non-negative int, not {addr!r}")
    return decode_offset(bytes(code[:MAX_INSN_LEN]), 0, mode)


def decode_offset(code: bytes, off: int, mode: int) -> Optional[Insn]:
    """:func:`decode_at` of ``code[off:]`` without copying (``mode`` trusted)."""
    end = min(len(code), off + MAX_INSN_LEN)
    i = off
    rex = 0
    rep = seg = 0
    p66 = p67 = lock = False
    is64 = mode == 64
    while i < end:
        b = code[i]
        group = LEGACY_PREFIXES.get(b)
        if group is None:
            if is64 and 0x40 <= b <= 0x4F:
                rex = b
                i += 1
                continue
            break
        rex = 0
        if group == _REP:
            rep = b
        elif group == _SEG:
            seg = b
        elif group == _OPSZ:
            p66 = True
        elif group == _ADSZ:
            p67 = True
        else:
            lock = True
        i += 1
    else:
        return None
    pcls = ("F3" if rep == 0xF3 else "F2") if rep else ("66" if p66 else "")
    for n in _OPCODE_LENGTHS:
        j = i + n
        if j > end:
            continue
        rows = _BY_OPCODE.get(code[i:j])
        if rows is None:
            continue
        modrm = -1
        if rows[0].modrm:
            if j >= end:
                return None
            modrm = code[j]
        for row in rows:
            if pcls not in row.pfx or mode not in row.modes or rex & row.rex_clear:
                continue
            if modrm >= 0:
                if row.reg is not None and (modrm >> 3) & 7 != row.reg:
                    continue
                if row.mod is not Mod.ANY and (modrm >= 0xC0) != (row.mod is Mod.REG):
                    continue
            if lock and row.ops is not Ops.CR:
                return None
            stop = _end_of(row, code, j, end, modrm, p67, mode, p66)
            if stop < 0:
                return None
            key = (mode, code[off:stop])
            insn = _CACHE.get(key)
            if insn is None:
                insn = _build(row, code, off, j, stop, mode, modrm, rex, rep, seg, p66, p67, lock)
                if insn is None:                    # a #UD CR/DR number
                    return None
                if len(_CACHE) >= _CACHE_MAX:
                    _CACHE.clear()
                _CACHE[key] = insn
            return insn
    return None


#: (mode, instruction bytes) -> Insn.  The decode depends on nothing else and
#: an Insn is immutable, so equal encodings share one object (code pages
#: repeat the same few sensitive instructions; so do superset starts).
_CACHE: dict[tuple[int, bytes], Insn] = {}
_CACHE_MAX = 1 << 16


def _end_of(row: Row, code: bytes, j: int, end: int, modrm: int, p67: bool, mode: int,
            p66: bool) -> int:
    """Offset just past the instruction whose opcode ends before ``j``; -1 if truncated."""
    if modrm >= 0:
        j += 1
        mod, rm = modrm >> 6, modrm & 7
        if mod != 3 and row.ops is not Ops.CR and row.ops is not Ops.DR:
            if _addr_size(mode, p67) == 2:        # 16-bit addressing: no SIB
                j += 2 if (mod == 0 and rm == 6) else mod
            else:
                if rm == 4:
                    if j >= end:
                        return -1
                    if mod == 0 and code[j] & 7 == 5:
                        j += 4
                    j += 1
                    rm = -1
                j += (4 if rm == 5 else 0, 1, 4)[mod]
    elif row.ops is Ops.IMM8 or row.ops is Ops.PORT_IMM8:
        j += 1
    elif row.ops is Ops.FAR_PTR:                   # offset (operand size) + selector
        j += _op_size(row.osz, mode, p66, 0, 0) + 2
    return j if j <= end else -1


def _addr_size(mode: int, p67: bool) -> int:
    if mode == 64:
        return 4 if p67 else 8
    if mode == 32:
        return 2 if p67 else 4
    return 4 if p67 else 2


def _op_size(rule: Osz, mode: int, p66: bool, rex: int, asz: int) -> int:
    """Operand size in bytes (SDM Vol. 1 section 3.6 and Vol. 2 section 3.1.1.3)."""
    if rule is Osz.V or rule is Osz.Z:
        if rule is Osz.V and rex & REX_W:
            return 8
        return 4 if (mode == 16) == p66 else 2
    if rule is Osz.D64:
        if mode == 64:
            return 2 if (p66 and not rex & REX_W) else 8
        return 4 if (mode == 16) == p66 else 2
    if rule is Osz.Y:
        return 8 if mode == 64 else 4
    if rule is Osz.A:
        return asz
    return {Osz.B: 1, Osz.W: 2, Osz.D: 4}[rule]


def _mem_size(row: Row, mode: int, osz: Optional[int]) -> int:
    """Memory-operand size in bytes; ``osz`` is the operand size (the I/O size for INS/OUTS)."""
    msz = row.msz
    if isinstance(msz, int):
        return msz
    if msz == MSZ_PSEUDO_DESC:   # limit (2) + base (4; 8 in 64-bit mode)
        return 10 if mode == 64 else 6
    if msz == MSZ_Y:
        return 8 if mode == 64 else 4
    if msz == MSZ_IO:
        return osz
    if msz == MSZ_XSAVE:
        return 0
    if msz == MSZ_FAR_PTR:       # offset (operand size) + 16-bit selector
        return osz + 2
    raise AssertionError(f"row {row.fmt!r}: no memory size rule")


def _seg(seg_prefix: int, mode: int, default: int) -> tuple[int, bool]:
    """(segment number, whether an override prefix is in effect)."""
    if seg_prefix:
        s = _SEG_PREFIX[seg_prefix]
        if mode != 64 or s >= SEG_FS:
            return s, True
    return default, False


def _build(row: Row, code: bytes, off: int, j: int, stop: int, mode: int, modrm: int,
           rex: int, rep: int, seg_prefix: int, p66: bool, p67: bool, lock: bool) -> Optional[Insn]:
    """Read the operands of ``row`` (opcode ends before ``j``) into an Insn.

    ``stop`` is the end of the instruction as :func:`_end_of` measured it
    (the one length computation: the bytes up to it are all present).
    """
    ops = row.ops
    asz = _addr_size(mode, p67)
    osz = _op_size(row.osz, mode, p66, rex, asz)
    f: dict = {"dq": _DQ.get(osz, ""), "w64": "64" if rex & REX_W else "",
               "ax": _REG_NAMES[asz][0]}
    kw: dict = {}
    seg_text = ""

    if modrm >= 0:
        j += 1
        mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
        if ops is Ops.CR or ops is Ops.DR:
            mod = 3                                  # "the mod field is ignored"
        if mod == 3:
            gpr_rm = rm | (8 if rex & REX_B else 0)
            f["rm"] = _REG_NAMES[osz][gpr_rm]
        else:
            base, index, scale, disp, rip_rel, default_seg = _modrm_mem(
                code, j, mod, rm, rex, asz, mode)
            segno, overridden = _seg(seg_prefix, mode, default_seg)
            if overridden:
                seg_text = SEG_NAMES[segno] + ":"
            kw["mem"] = MemOperand(segno, base, index, scale, disp, asz,
                                   _mem_size(row, mode, osz), rip_rel)
            f["rm"] = seg_text + _mem_text(base, index, scale, disp, asz, rip_rel)
        reg_x = reg | (8 if rex & REX_R else 0)

        if ops is Ops.CR:
            cr = reg_x
            if lock and cr == 0:
                cr = 8
            if cr not in VALID_CRS:
                return None
            kw["cr"], kw["gpr"] = cr, gpr_rm
            f["cr"] = f"cr{cr}"
        elif ops is Ops.DR:
            if reg_x > 7:
                return None
            kw["dr"], kw["gpr"] = reg, gpr_rm
            f["dr"] = f"dr{reg}"
        elif ops is Ops.RM:
            if mod == 3:
                kw["gpr"] = gpr_rm
        elif ops is Ops.REG_RM:
            kw["gpr"] = reg_x
            f["reg"] = _REG_NAMES[osz][reg_x]
            if mod == 3:
                kw["gpr2"] = gpr_rm
        elif ops is Ops.RM_ADDR:
            kw["gpr"] = gpr_rm
            segno, overridden = _seg(seg_prefix, mode, SEG_DS)
            kw["mem"] = MemOperand(segno, gpr_rm, None, 1, 0, asz, _mem_size(row, mode, None))
            if overridden:
                f["rm"] = SEG_NAMES[segno] + ":" + f["rm"]
        else:
            raise AssertionError(f"row {row.fmt!r}: ModRM with operands {ops}")
    elif ops is Ops.IMM8 or ops is Ops.PORT_IMM8:
        imm = code[j]
        if ops is Ops.IMM8:
            kw["vector"] = imm
            f["imm"] = hex(imm)
        else:
            kw["port"], kw["io_size"] = imm, osz
            f["port"], f["acc"] = hex(imm), _ACC[osz]
    elif ops is Ops.PORT_DX:
        kw["io_size"] = osz
        f["port"], f["acc"] = "dx", _ACC[osz]
    elif ops is Ops.STR_IN or ops is Ops.STR_OUT:
        if ops is Ops.STR_IN:                        # ES:[rDI], no override
            segno, base = SEG_ES, 7
        else:                                        # DS:[rSI], override allowed
            segno, base = _seg(seg_prefix, mode, SEG_DS)[0], 6
        kw["io_size"] = osz
        kw["rep"] = bool(rep)
        kw["mem"] = MemOperand(segno, base, None, 1, 0, asz, _mem_size(row, mode, osz))
        f["bwd"] = _BWD[osz]
    elif ops is Ops.FAR_PTR:
        offset = int.from_bytes(code[j:j + osz], "little")
        kw["selector"] = int.from_bytes(code[j + osz:j + osz + 2], "little")
        f["ptr"] = f"{kw['selector']:#x}:{offset:#x}"
    elif ops is Ops.RAX_ADDR:
        segno = _seg(seg_prefix, mode, SEG_DS)[0]
        kw["mem"] = MemOperand(segno, 0, None, 1, 0, asz, _mem_size(row, mode, None))
    if row.vector is not None:
        kw["vector"] = row.vector

    text = row.fmt.format(**f)
    if kw.get("rep"):
        text = "rep " + text
    return Insn(kind=row.kind, length=stop - off, text=text, op_size=osz, addr_size=asz, **kw)


def _modrm_mem(code: bytes, j: int, mod: int, rm: int, rex: int, asz: int, mode: int):
    """Parse SIB and displacement after a memory ModRM (j: first byte after ModRM).

    Returns (base, index, scale, disp, rip_relative, default segment).
    """
    if asz == 2:
        if mod == 0 and rm == 6:
            base, index, dsize = None, None, 2
        else:
            base, index = _MODRM16[rm]
            dsize = (0, 1, 2)[mod]
        default_seg = SEG_SS if base == 5 else SEG_DS
        scale, rip_rel = 1, False
    else:
        scale, index, rip_rel = 1, None, False
        dsize = (0, 1, 4)[mod]
        if rm == 4:
            sib = code[j]
            j += 1
            scale = 1 << (sib >> 6)
            idx = ((sib >> 3) & 7) | (8 if rex & REX_X else 0)
            index = None if idx == 4 else idx
            if sib & 7 == 5 and mod == 0:
                base, dsize = None, 4
            else:
                base = (sib & 7) | (8 if rex & REX_B else 0)
        elif rm == 5 and mod == 0:
            base, dsize, rip_rel = None, 4, mode == 64
        else:
            base = rm | (8 if rex & REX_B else 0)
        default_seg = SEG_SS if base in (4, 5) else SEG_DS
    disp = int.from_bytes(code[j:j + dsize], "little", signed=True) if dsize else 0
    return base, index, scale, disp, rip_rel, default_seg


def _mem_text(base, index, scale, disp, asz, rip_rel) -> str:
    names = _REG_NAMES[asz]
    parts = []
    if rip_rel:
        parts.append("rip" if asz == 8 else "eip")
    if base is not None:
        parts.append(names[base])
    if index is not None:
        parts.append(names[index] + (f"*{scale}" if scale != 1 else ""))
    s = " + ".join(parts)
    if disp or not parts:
        mag = abs(disp) if parts else disp & ((1 << (8 * asz)) - 1)
        num = hex(mag) if mag > 9 else str(mag)
        s = num if not parts else f"{s} {'-' if disp < 0 else '+'} {num}"
    return f"[{s}]"


def resolve_linear(mem: MemOperand, regs: Mapping[str, int], rip_next: int,
                   seg_base: Callable[[int], int]) -> int:
    """The linear address of ``mem`` (SDM Vol. 1 section 3.7.5, Vol. 3 section 3.4).

    ``regs`` maps GPR names (``"rax"`` ...) to their values; ``rip_next`` is the
    address of the next instruction (RIP-relative operands are relative to
    it); ``seg_base(n)`` returns the base of segment register ``n``
    (:data:`~devirt_emu.events.SEG_NAMES` order; in 64-bit mode the caller
    returns 0 for ES/CS/SS/DS).  The effective address wraps at the address
    size; the linear address wraps at 64 bits in 64-bit mode and at 32 bits
    otherwise.  The code size is known from ``addr_size`` except for 32-bit
    addressing, where ``regs["mode"]`` tells 64-bit mode (67 prefix) from
    32-bit mode.
    """
    ea_mask = (1 << (8 * mem.addr_size)) - 1
    if mem.rip_relative:
        ea = rip_next + mem.disp
    else:
        ea = mem.disp
        if mem.base is not None:
            ea += regs[GPR_NAMES[mem.base]]
        if mem.index is not None:
            ea += regs[GPR_NAMES[mem.index]] * mem.scale
    ea &= ea_mask
    if mem.addr_size == 8 or mem.rip_relative:
        long_mode = True
    elif mem.addr_size == 2:
        long_mode = False
    else:
        mode = regs.get("mode")
        if mode not in MODES:
            raise ValueError("resolve_linear of a 32-bit address needs regs['mode'] (16, 32 or 64)")
        long_mode = mode == 64
    lin_mask = (1 << 64) - 1 if long_mode else 0xFFFFFFFF
    return (seg_base(mem.seg) + ea) & lin_mask


__all__ = ["decode_at", "decode_offset", "resolve_linear", "check_mode", "MODES",
           "MAX_INSN_LEN", "LEGACY_PREFIXES", "VALID_CRS"]
