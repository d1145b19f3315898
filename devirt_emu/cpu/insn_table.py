"""The one table of the instructions the page scanner finds and the decoder names.

Every instruction a VMX or SVM hypervisor can intercept is here, and so are a
few that no hypervisor intercepts but the platform must see at their boundary:
CLI, STI, MOV SS and POP SS (they open or close the interrupt window or set an
interrupt shadow), UD2, and the steady-state markers (``xchg bx, bx`` /
``xchg cx, cx`` with an operand-size prefix).

Each :class:`Row` is one encoding, written as the Intel SDM (Vol. 2, opcode
tables and Appendix A) and the AMD APM (Vol. 3) write it::

    [mandatory prefix] opcode bytes [/digit] [mod constraint]

``opcode`` holds every fixed byte after the prefixes.  Where the manuals give
a fixed ModRM byte as part of the opcode (``0F 01 C1`` VMCALL) that byte is in
``opcode`` and ``modrm`` is False; where a ModRM byte with operands follows
(``0F 01 /7`` INVLPG) ``modrm`` is True and ``reg``/``mod`` constrain it.

Mandatory prefixes are matched on one *prefix class* per instruction,
computed by the decoder from the legacy prefixes: ``"F3"`` or ``"F2"`` if a
REP/REPNE prefix is present (the last of the two wins), else ``"66"`` if an
operand-size prefix is present, else ``""``.  ``Row.pfx`` is the set of
classes with which the row's encoding means this instruction: :data:`ANY`
when 66/F2/F3 do not select another instruction (they are ignored or only
change the operand size), :data:`NO_REP` when F2/F3 select another one but 66
does not, :data:`NP` when any of them does, and a single class for the rows
that need that prefix.  Rows that share an opcode and overlap in ModRM have
disjoint ``pfx`` sets, so at most one row matches an encoding.

``modes`` lists the code sizes (16, 32, 64) in which the encoding exists.
This is a static property: an instruction that decodes but faults at run
time (LLDT in real mode, VMXON outside VMX-capable state, MOV CR at CPL 3)
is still listed; the dynamic checks belong to the rules.  One exception: the
far JMP/CALL rows list only 16- and 32-bit code.  A far transfer is sensitive
only when it attempts a task switch, and task switching does not exist in
IA-32e mode (a far JMP/CALL to a TSS or task gate there is a #GP, which
Unicorn raises itself), so 64-bit code never needs their hooks.

Not in the table (not interceptable, or newer than the Kind list): PCONFIG,
SEAMCALL/TDCALL, RDMSRLIST/WRMSRLIST, LOADIWKEY, ENQCMD(S), SWAPGS, RDPID.
WRMSRNS (``0F 01 C6``) is listed under :attr:`Kind.WRMSR`, since VMX and SVM
intercept it exactly as WRMSR.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Union

from devirt_emu.events import Kind

# --- prefix classes ---------------------------------------------------------
ANY = frozenset({"", "66", "F3", "F2"})
NO_REP = frozenset({"", "66"})
NP = frozenset({""})
P66 = frozenset({"66"})
PF3 = frozenset({"F3"})
PF2 = frozenset({"F2"})
#: WBINVD: F3 selects WBNOINVD; F2 and 66 are ignored.
NOT_F3 = frozenset({"", "66", "F2"})

ALL_MODES = frozenset({16, 32, 64})
LEGACY_MODES = frozenset({16, 32})

# REX bits (low nibble of 40-4F)
REX_W, REX_R, REX_X, REX_B = 8, 4, 2, 1


class Mod(enum.Enum):
    """Constraint on ModRM.mod."""

    ANY = "any"
    MEM = "mem"   # mod != 11b
    REG = "reg"   # mod == 11b


class Ops(enum.Enum):
    """How the operands are read from the encoding."""

    NONE = "none"            # no explicit operand
    IMM8 = "imm8"            # INT n: imm8 is the vector
    PORT_IMM8 = "port_imm8"  # IN/OUT with the port in imm8
    PORT_DX = "port_dx"      # IN/OUT with the port in DX
    STR_IN = "str_in"        # INS: ES:[rDI] <- port DX
    STR_OUT = "str_out"      # OUTS: port DX <- seg:[rSI] (DS by default)
    CR = "cr"                # MOV CR: ModRM.reg = CRn, ModRM.rm = GPR (mod ignored)
    DR = "dr"                # MOV DR: ModRM.reg = DRn, ModRM.rm = GPR (mod ignored)
    RM = "rm"                # ModRM.rm: register (gpr) or memory (mem)
    REG_RM = "reg_rm"        # ModRM.reg -> gpr; ModRM.rm -> gpr2 or mem
    RAX_ADDR = "rax_addr"    # implicit seg:[rAX] (DS by default): MONITOR(X)
    RM_ADDR = "rm_addr"      # ModRM.rm register holding an address (DS by default): UMONITOR
    FAR_PTR = "far_ptr"      # immediate far pointer: offset (operand size), then selector (2 bytes)


class Osz(enum.Enum):
    """Operand-size rule (SDM Vol. 2 section 3.1.1.3 notation where it has one)."""

    V = "v"      # 16/32 by mode and 66; 64 with REX.W
    Z = "z"      # 16/32 by mode and 66; REX.W ignored (IN/OUT eAX, INS/OUTS w/d)
    D64 = "d64"  # as v, but 64 by default in 64-bit mode (66 gives 16)
    Y = "y"      # 64 in 64-bit mode, 32 otherwise; 66 ignored (MOV CR/DR, VMREAD...)
    B = "b"      # always 8-bit
    W = "w"      # always 16-bit
    D = "d"      # always 32-bit
    A = "a"      # the address size (UMONITOR's register)


#: Memory-operand size: bytes, or one of these rules.
MSZ_PSEUDO_DESC = "pseudo_desc"  # LGDT/SGDT...: 6 bytes, 10 in 64-bit mode
MSZ_Y = "y"                      # VMREAD/VMWRITE: 8 in 64-bit mode, 4 otherwise
MSZ_IO = "io"                    # INS/OUTS: the I/O size
MSZ_XSAVE = "xsave"              # XSAVES/XRSTORS: the XSAVE area, size 0 = variable
MSZ_FAR_PTR = "far_ptr"          # far JMP/CALL m16:16/m16:32: offset (operand size) + selector

Msz = Union[int, str, None]


@dataclass(frozen=True)
class Row:
    """One encoding of one interceptable instruction.

    ``fmt`` is the text template; placeholders filled by the decoder:
    ``{rm}`` (register at the operand size, or memory), ``{reg}``,
    ``{cr}``, ``{dr}``, ``{port}`` (immediate or ``dx``), ``{acc}``
    (AL/AX/EAX by I/O size), ``{ax}`` (rAX by address size), ``{imm}``,
    ``{dq}`` ("" / "d" / "q" by operand size 16/32/64), ``{bwd}``
    ("b"/"w"/"d" by I/O size), ``{w64}`` ("64" with REX.W), ``{ptr}``
    (an immediate far pointer, ``selector:offset``).
    ``rex_clear`` is a mask of REX bits that must be 0 (PAUSE: REX.B turns
    ``90`` into XCHG r8; the markers: exactly ``66 87 DB``/``66 87 C9``).
    ``vector`` is the fixed vector of INT3/INT1/INTO.
    """

    kind: Kind
    fmt: str
    opcode: bytes
    pfx: frozenset = ANY
    modrm: bool = False
    reg: Optional[int] = None
    mod: Mod = Mod.ANY
    ops: Ops = Ops.NONE
    osz: Osz = Osz.V
    msz: Msz = None
    modes: frozenset = ALL_MODES
    rex_clear: int = 0
    vector: Optional[int] = None


def _r(kind, fmt, opcode, **kw) -> Row:
    return Row(kind, fmt, bytes.fromhex(opcode), **kw)


K = Kind
M, R = Mod.MEM, Mod.REG

#: Every interceptable instruction encoding.  Sources: Intel SDM Vol. 2
#: (instruction pages, Table A-6 "Opcode Extensions for One- and Two-byte
#: Opcodes by Group Number") and AMD APM Vol. 3 (Appendix A, secondary opcode
#: map 0F 01 and its ModRM extensions).
TABLE: tuple[Row, ...] = (
    # --- control and debug registers ---------------------------------------
    _r(K.MOV_FROM_CR, "mov {rm}, {cr}", "0F 20", modrm=True, ops=Ops.CR, osz=Osz.Y),
    _r(K.MOV_TO_CR,   "mov {cr}, {rm}", "0F 22", modrm=True, ops=Ops.CR, osz=Osz.Y),
    _r(K.MOV_FROM_DR, "mov {rm}, {dr}", "0F 21", modrm=True, ops=Ops.DR, osz=Osz.Y),
    _r(K.MOV_TO_DR,   "mov {dr}, {rm}", "0F 23", modrm=True, ops=Ops.DR, osz=Osz.Y),
    _r(K.CLTS, "clts", "0F 06"),
    _r(K.LMSW, "lmsw {rm}", "0F 01", modrm=True, reg=6, ops=Ops.RM, osz=Osz.W, msz=2),
    _r(K.SMSW, "smsw {rm}", "0F 01", modrm=True, reg=4, ops=Ops.RM, msz=2),
    # --- MSRs, CPUID, time stamps, random numbers ----------------------------
    _r(K.RDMSR, "rdmsr", "0F 32"),
    _r(K.WRMSR, "wrmsr", "0F 30"),
    _r(K.WRMSR, "wrmsrns", "0F 01 C6", pfx=NO_REP),
    _r(K.CPUID, "cpuid", "0F A2"),
    _r(K.RDTSC, "rdtsc", "0F 31"),
    _r(K.RDTSCP, "rdtscp", "0F 01 F9", pfx=NO_REP),
    _r(K.RDPMC, "rdpmc", "0F 33"),
    _r(K.RDRAND, "rdrand {rm}", "0F C7", pfx=NO_REP, modrm=True, reg=6, mod=R, ops=Ops.RM),
    _r(K.RDSEED, "rdseed {rm}", "0F C7", pfx=NO_REP, modrm=True, reg=7, mod=R, ops=Ops.RM),
    _r(K.RDPRU, "rdpru", "0F 01 FD", pfx=NO_REP),
    # --- halting and waiting -------------------------------------------------
    _r(K.HLT, "hlt", "F4"),
    _r(K.PAUSE, "pause", "90", pfx=PF3, rex_clear=REX_B),
    _r(K.MONITOR, "monitor", "0F 01 C8", pfx=NO_REP, ops=Ops.RAX_ADDR, msz=1),
    _r(K.MWAIT, "mwait", "0F 01 C9", pfx=NO_REP),
    _r(K.MONITORX, "monitorx", "0F 01 FA", pfx=NO_REP, ops=Ops.RAX_ADDR, msz=1),
    _r(K.MWAITX, "mwaitx", "0F 01 FB", pfx=NO_REP),
    _r(K.UMONITOR, "umonitor {rm}", "0F AE", pfx=PF3, modrm=True, reg=6, mod=R,
       ops=Ops.RM_ADDR, osz=Osz.A, msz=1),
    _r(K.UMWAIT, "umwait {rm}", "0F AE", pfx=PF2, modrm=True, reg=6, mod=R,
       ops=Ops.RM, osz=Osz.D),
    _r(K.TPAUSE, "tpause {rm}", "0F AE", pfx=P66, modrm=True, reg=6, mod=R,
       ops=Ops.RM, osz=Osz.D),
    # --- caches and TLBs -----------------------------------------------------
    _r(K.INVLPG, "invlpg {rm}", "0F 01", modrm=True, reg=7, mod=M, ops=Ops.RM, msz=1),
    _r(K.INVLPGA, "invlpga {ax}, ecx", "0F 01 DF", pfx=NO_REP),
    _r(K.INVLPGB, "invlpgb", "0F 01 FE", pfx=NO_REP),
    _r(K.TLBSYNC, "tlbsync", "0F 01 FF", pfx=NO_REP),
    _r(K.INVPCID, "invpcid {reg}, {rm}", "0F 38 82", pfx=P66, modrm=True, mod=M,
       ops=Ops.REG_RM, osz=Osz.Y, msz=16),
    _r(K.INVD, "invd", "0F 08"),
    _r(K.WBINVD, "wbinvd", "0F 09", pfx=NOT_F3),
    _r(K.WBNOINVD, "wbnoinvd", "0F 09", pfx=PF3),
    _r(K.MCOMMIT, "mcommit", "0F 01 FA", pfx=PF3),
    # --- extended state ------------------------------------------------------
    _r(K.XSETBV, "xsetbv", "0F 01 D1", pfx=NO_REP),
    _r(K.XSAVES, "xsaves{w64} {rm}", "0F C7", pfx=NP, modrm=True, reg=5, mod=M,
       ops=Ops.RM, msz=MSZ_XSAVE),
    _r(K.XRSTORS, "xrstors{w64} {rm}", "0F C7", pfx=NP, modrm=True, reg=3, mod=M,
       ops=Ops.RM, msz=MSZ_XSAVE),
    # --- descriptor tables ---------------------------------------------------
    _r(K.SGDT, "sgdt {rm}", "0F 01", modrm=True, reg=0, mod=M, ops=Ops.RM, msz=MSZ_PSEUDO_DESC),
    _r(K.SIDT, "sidt {rm}", "0F 01", modrm=True, reg=1, mod=M, ops=Ops.RM, msz=MSZ_PSEUDO_DESC),
    _r(K.LGDT, "lgdt {rm}", "0F 01", modrm=True, reg=2, mod=M, ops=Ops.RM, msz=MSZ_PSEUDO_DESC),
    _r(K.LIDT, "lidt {rm}", "0F 01", modrm=True, reg=3, mod=M, ops=Ops.RM, msz=MSZ_PSEUDO_DESC),
    _r(K.SLDT, "sldt {rm}", "0F 00", modrm=True, reg=0, ops=Ops.RM, msz=2),
    _r(K.STR, "str {rm}", "0F 00", modrm=True, reg=1, ops=Ops.RM, msz=2),
    _r(K.LLDT, "lldt {rm}", "0F 00", modrm=True, reg=2, ops=Ops.RM, osz=Osz.W, msz=2),
    _r(K.LTR, "ltr {rm}", "0F 00", modrm=True, reg=3, ops=Ops.RM, osz=Osz.W, msz=2),
    # --- port I/O ------------------------------------------------------------
    _r(K.IN, "in {acc}, {port}", "E4", ops=Ops.PORT_IMM8, osz=Osz.B),
    _r(K.IN, "in {acc}, {port}", "E5", ops=Ops.PORT_IMM8, osz=Osz.Z),
    _r(K.IN, "in {acc}, {port}", "EC", ops=Ops.PORT_DX, osz=Osz.B),
    _r(K.IN, "in {acc}, {port}", "ED", ops=Ops.PORT_DX, osz=Osz.Z),
    _r(K.OUT, "out {port}, {acc}", "E6", ops=Ops.PORT_IMM8, osz=Osz.B),
    _r(K.OUT, "out {port}, {acc}", "E7", ops=Ops.PORT_IMM8, osz=Osz.Z),
    _r(K.OUT, "out {port}, {acc}", "EE", ops=Ops.PORT_DX, osz=Osz.B),
    _r(K.OUT, "out {port}, {acc}", "EF", ops=Ops.PORT_DX, osz=Osz.Z),
    _r(K.INS, "ins{bwd}", "6C", ops=Ops.STR_IN, osz=Osz.B, msz=MSZ_IO),
    _r(K.INS, "ins{bwd}", "6D", ops=Ops.STR_IN, osz=Osz.Z, msz=MSZ_IO),
    _r(K.OUTS, "outs{bwd}", "6E", ops=Ops.STR_OUT, osz=Osz.B, msz=MSZ_IO),
    _r(K.OUTS, "outs{bwd}", "6F", ops=Ops.STR_OUT, osz=Osz.Z, msz=MSZ_IO),
    # --- software interrupts, flags, interrupt shadow -------------------------
    _r(K.INT, "int {imm}", "CD", ops=Ops.IMM8),
    _r(K.INT3, "int3", "CC", vector=3),
    _r(K.INTO, "into", "CE", vector=4, modes=LEGACY_MODES),
    _r(K.INT1, "int1", "F1", vector=1),
    _r(K.IRET, "iret{dq}", "CF"),
    _r(K.PUSHF, "pushf{dq}", "9C", osz=Osz.D64),
    _r(K.POPF, "popf{dq}", "9D", osz=Osz.D64),
    _r(K.CLI, "cli", "FA"),
    _r(K.STI, "sti", "FB"),
    _r(K.MOV_SS, "mov ss, {rm}", "8E", modrm=True, reg=2, ops=Ops.RM, osz=Osz.W, msz=2),
    _r(K.POP_SS, "pop ss", "17", modes=LEGACY_MODES),
    # --- far transfers: sensitive only as task switches (see the module docstring)
    _r(K.JMP_FAR, "ljmp {ptr}", "EA", ops=Ops.FAR_PTR, osz=Osz.Z, modes=LEGACY_MODES),
    _r(K.CALL_FAR, "lcall {ptr}", "9A", ops=Ops.FAR_PTR, osz=Osz.Z, modes=LEGACY_MODES),
    _r(K.JMP_FAR, "ljmp {rm}", "FF", modrm=True, reg=5, mod=M, ops=Ops.RM, osz=Osz.Z,
       msz=MSZ_FAR_PTR, modes=LEGACY_MODES),
    _r(K.CALL_FAR, "lcall {rm}", "FF", modrm=True, reg=3, mod=M, ops=Ops.RM, osz=Osz.Z,
       msz=MSZ_FAR_PTR, modes=LEGACY_MODES),
    # --- VMX -----------------------------------------------------------------
    _r(K.VMCALL, "vmcall", "0F 01 C1", pfx=NO_REP),
    _r(K.VMLAUNCH, "vmlaunch", "0F 01 C2", pfx=NO_REP),
    _r(K.VMRESUME, "vmresume", "0F 01 C3", pfx=NO_REP),
    _r(K.VMXOFF, "vmxoff", "0F 01 C4", pfx=NO_REP),
    _r(K.VMFUNC, "vmfunc", "0F 01 D4", pfx=NO_REP),
    _r(K.VMPTRLD, "vmptrld {rm}", "0F C7", pfx=NP, modrm=True, reg=6, mod=M, ops=Ops.RM, msz=8),
    _r(K.VMCLEAR, "vmclear {rm}", "0F C7", pfx=P66, modrm=True, reg=6, mod=M, ops=Ops.RM, msz=8),
    _r(K.VMXON, "vmxon {rm}", "0F C7", pfx=PF3, modrm=True, reg=6, mod=M, ops=Ops.RM, msz=8),
    _r(K.VMPTRST, "vmptrst {rm}", "0F C7", pfx=NO_REP, modrm=True, reg=7, mod=M, ops=Ops.RM, msz=8),
    _r(K.VMREAD, "vmread {rm}, {reg}", "0F 78", pfx=NP, modrm=True, ops=Ops.REG_RM,
       osz=Osz.Y, msz=MSZ_Y),
    _r(K.VMWRITE, "vmwrite {reg}, {rm}", "0F 79", pfx=NP, modrm=True, ops=Ops.REG_RM,
       osz=Osz.Y, msz=MSZ_Y),
    _r(K.INVEPT, "invept {reg}, {rm}", "0F 38 80", pfx=P66, modrm=True, mod=M,
       ops=Ops.REG_RM, osz=Osz.Y, msz=16),
    _r(K.INVVPID, "invvpid {reg}, {rm}", "0F 38 81", pfx=P66, modrm=True, mod=M,
       ops=Ops.REG_RM, osz=Osz.Y, msz=16),
    _r(K.ENCLS, "encls", "0F 01 CF", pfx=NP),
    _r(K.ENCLU, "enclu", "0F 01 D7", pfx=NO_REP),
    _r(K.ENCLV, "enclv", "0F 01 C0", pfx=NO_REP),
    # --- SVM -----------------------------------------------------------------
    _r(K.VMRUN, "vmrun {ax}", "0F 01 D8", pfx=NO_REP),
    _r(K.VMMCALL, "vmmcall", "0F 01 D9", pfx=NO_REP),
    _r(K.VMLOAD, "vmload {ax}", "0F 01 DA", pfx=NO_REP),
    _r(K.VMSAVE, "vmsave {ax}", "0F 01 DB", pfx=NO_REP),
    _r(K.STGI, "stgi", "0F 01 DC", pfx=NO_REP),
    _r(K.CLGI, "clgi", "0F 01 DD", pfx=NO_REP),
    _r(K.SKINIT, "skinit eax", "0F 01 DE", pfx=NO_REP),
    # --- other system instructions ---------------------------------------------
    _r(K.GETSEC, "getsec", "0F 37"),
    _r(K.RSM, "rsm", "0F AA"),
    _r(K.UD2, "ud2", "0F 0B"),
    # --- devirt-emu steady-state markers (Bochs-style magic xchg) -------------
    _r(K.MARKER_BEGIN, "xchg bx, bx", "87 DB", pfx=P66, rex_clear=REX_W | REX_R | REX_X | REX_B),
    _r(K.MARKER_END, "xchg cx, cx", "87 C9", pfx=P66, rex_clear=REX_W | REX_R | REX_X | REX_B),
)


def modrm_bytes(row: Row) -> frozenset[int]:
    """The ModRM byte values a ``modrm`` row accepts (its reg and mod constraints)."""
    out = set()
    for b in range(256):
        mod, reg = b >> 6, (b >> 3) & 7
        if row.reg is not None and reg != row.reg:
            continue
        if row.mod is Mod.MEM and mod == 3:
            continue
        if row.mod is Mod.REG and mod != 3:
            continue
        out.add(b)
    return frozenset(out)
