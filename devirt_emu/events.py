"""Events: what guest execution looks like to the virtualization layers.

Guest code runs on a Unicorn core at full speed.  The few things a VMX or SVM
configuration can intercept (sensitive instructions, exceptions, interrupts,
INIT/SIPI, ...) are turned into :class:`Event` objects by ``devirt_emu.cpu``
and ``devirt_emu.platform``.  The VMX/SVM rules look only at events, never at
raw instruction bytes, so they can be unit-tested without a core.

Two layers:

* :class:`Insn` is the *static* decode of one sensitive instruction at one
  address (what the page scanner finds): its kind, length and operands.
  Register operands are general-purpose register numbers in the SDM's
  encoding (0 = RAX ... 15 = R15), memory operands are kept as their parts
  so that VM-exit instruction information can be built from them.
* :class:`Event` is one *dynamic* occurrence: which core, at which RIP, and
  the values resolved at that moment (the memory operand's linear address,
  the I/O port number when it comes from DX, an exception's error code).

:class:`Kind` is the one list of event kinds; its values are the names used
in JSON output, traces and event counts.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Optional


class Kind(str, enum.Enum):
    """Every kind of event.  The value is the stable name used in output."""

    # --- control registers, debug registers -------------------------------
    MOV_TO_CR = "MOV_TO_CR"
    MOV_FROM_CR = "MOV_FROM_CR"
    MOV_TO_DR = "MOV_TO_DR"
    MOV_FROM_DR = "MOV_FROM_DR"
    CLTS = "CLTS"
    LMSW = "LMSW"
    SMSW = "SMSW"
    # --- MSRs, CPUID, timestamps, random numbers ---------------------------
    RDMSR = "RDMSR"
    WRMSR = "WRMSR"
    CPUID = "CPUID"
    RDTSC = "RDTSC"
    RDTSCP = "RDTSCP"
    RDPMC = "RDPMC"
    RDRAND = "RDRAND"
    RDSEED = "RDSEED"
    RDPRU = "RDPRU"
    # --- halting, waiting ---------------------------------------------------
    HLT = "HLT"
    PAUSE = "PAUSE"
    MONITOR = "MONITOR"
    MWAIT = "MWAIT"
    MONITORX = "MONITORX"
    MWAITX = "MWAITX"
    UMONITOR = "UMONITOR"
    UMWAIT = "UMWAIT"
    TPAUSE = "TPAUSE"
    # --- caches and TLBs ------------------------------------------------------
    INVLPG = "INVLPG"
    INVLPGA = "INVLPGA"
    INVLPGB = "INVLPGB"
    TLBSYNC = "TLBSYNC"
    INVPCID = "INVPCID"
    INVD = "INVD"
    WBINVD = "WBINVD"
    WBNOINVD = "WBNOINVD"
    MCOMMIT = "MCOMMIT"
    # --- extended state ---------------------------------------------------
    XSETBV = "XSETBV"
    XSAVES = "XSAVES"
    XRSTORS = "XRSTORS"
    # --- descriptor tables --------------------------------------------------
    LGDT = "LGDT"
    LIDT = "LIDT"
    SGDT = "SGDT"
    SIDT = "SIDT"
    LLDT = "LLDT"
    LTR = "LTR"
    SLDT = "SLDT"
    STR = "STR"
    # --- port I/O -------------------------------------------------------------
    IN = "IN"
    OUT = "OUT"
    INS = "INS"
    OUTS = "OUTS"
    # --- software interrupts, flags, interrupt shadow ---------------------
    INT = "INT"        # INT n (CD ib)
    INT3 = "INT3"      # CC
    INTO = "INTO"      # CE (invalid in 64-bit mode)
    INT1 = "INT1"      # F1 (ICEBP)
    IRET = "IRET"
    PUSHF = "PUSHF"
    POPF = "POPF"
    CLI = "CLI"
    STI = "STI"
    MOV_SS = "MOV_SS"
    POP_SS = "POP_SS"
    # --- far transfers: sensitive only when they attempt a task switch ------
    JMP_FAR = "JMP_FAR"    # EA cp, FF /5 m16:16/32 (outside 64-bit mode)
    CALL_FAR = "CALL_FAR"  # 9A cp, FF /3 m16:16/32 (outside 64-bit mode)
    # --- VMX instructions ---------------------------------------------------
    VMCALL = "VMCALL"
    VMCLEAR = "VMCLEAR"
    VMLAUNCH = "VMLAUNCH"
    VMRESUME = "VMRESUME"
    VMPTRLD = "VMPTRLD"
    VMPTRST = "VMPTRST"
    VMREAD = "VMREAD"
    VMWRITE = "VMWRITE"
    VMXON = "VMXON"
    VMXOFF = "VMXOFF"
    INVEPT = "INVEPT"
    INVVPID = "INVVPID"
    VMFUNC = "VMFUNC"
    ENCLS = "ENCLS"
    ENCLU = "ENCLU"
    ENCLV = "ENCLV"
    # --- SVM instructions ---------------------------------------------------
    VMRUN = "VMRUN"
    VMMCALL = "VMMCALL"
    VMLOAD = "VMLOAD"
    VMSAVE = "VMSAVE"
    STGI = "STGI"
    CLGI = "CLGI"
    SKINIT = "SKINIT"
    # --- other system instructions ----------------------------------------
    GETSEC = "GETSEC"
    RSM = "RSM"
    UD2 = "UD2"
    # --- devirt-emu markers (no architectural effect) -------------------
    MARKER_BEGIN = "MARKER_BEGIN"   # xchg bx, bx  (66 87 DB): steady state begins
    MARKER_END = "MARKER_END"       # xchg cx, cx  (66 87 C9): steady state ends
    # --- events that are not instructions -------------------------------
    EXCEPTION = "EXCEPTION"          # a fault or trap raised by an instruction
    INTERRUPT = "INTERRUPT"          # an external (LAPIC) interrupt delivered
    NMI = "NMI"
    INIT = "INIT"
    SIPI = "SIPI"
    TRIPLE_FAULT = "TRIPLE_FAULT"
    APIC_ACCESS = "APIC_ACCESS"      # xAPIC MMIO access
    VM_EXIT = "VM_EXIT"              # a VM exit taken (traces and counts only; rules never see it)
    TASK_SWITCH = "TASK_SWITCH"      # attempted task switch: CALL/JMP to a TSS or task gate,
                                     # IRET with NT=1, or a task gate in the IDT


#: The kinds that are not instructions (no row in the instruction table).
NON_INSTRUCTION_KINDS = frozenset({
    Kind.EXCEPTION, Kind.INTERRUPT, Kind.NMI, Kind.INIT, Kind.SIPI, Kind.TRIPLE_FAULT,
    Kind.APIC_ACCESS, Kind.TASK_SWITCH, Kind.VM_EXIT,
})

#: Register numbers as the SDM encodes them in exit qualifications and
#: VM-exit instruction information (and as x86 ModRM does).
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

#: Segment registers in the SDM's encoding (ES=0 ... GS=5).
SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")


@dataclass(frozen=True)
class MemOperand:
    """A memory operand as decoded, before its address is computed.

    ``base``/``index`` are GPR numbers (see :data:`GPR_NAMES`) or None;
    ``rip_relative`` marks ``[rip + disp]``.  ``addr_size`` and ``size`` are
    in bytes.  ``seg`` is the segment register number (:data:`SEG_NAMES`).
    """

    seg: int
    base: Optional[int]
    index: Optional[int]
    scale: int
    disp: int
    addr_size: int
    size: int
    rip_relative: bool = False


@dataclass(frozen=True)
class Insn:
    """Static decode of one sensitive instruction.

    Only the fields that make sense for ``kind`` are set; the others are None.

    ``gpr``      general register operand (MOV CR/DR source or destination,
                 RDRAND/RDSEED/SMSW/LMSW/SLDT/STR/LLDT/LTR register form,
                 INVPCID/INVEPT/INVVPID type register, VMREAD/VMWRITE
                 register, UMWAIT/TPAUSE source)
    ``gpr2``     second register operand (VMREAD/VMWRITE register form)
    ``cr``/``dr`` control or debug register number
    ``mem``      memory operand, if the instruction has one
    ``port``     I/O port for the immediate forms (None: the port is in DX)
    ``io_size``  I/O access size in bytes (1, 2, 4)
    ``rep``      a REP/REPE/REPNE prefix is present
    ``vector``   INT n's immediate
    ``selector`` the segment selector of a direct far JMP/CALL (EA/9A ptr16:16/32)
    ``op_size``  operand size in bytes
    ``addr_size`` address size in bytes
    """

    kind: Kind
    length: int
    text: str
    gpr: Optional[int] = None
    gpr2: Optional[int] = None
    cr: Optional[int] = None
    dr: Optional[int] = None
    mem: Optional[MemOperand] = None
    port: Optional[int] = None
    io_size: Optional[int] = None
    rep: bool = False
    vector: Optional[int] = None
    op_size: int = 4
    addr_size: int = 8
    selector: Optional[int] = None


IO_KINDS = frozenset({Kind.IN, Kind.OUT, Kind.INS, Kind.OUTS})
#: I/O kind -> (is an input, is a string instruction).
IO_SHAPE = {Kind.IN: (True, False), Kind.OUT: (False, False), Kind.INS: (True, True),
            Kind.OUTS: (False, True)}


@dataclass(slots=True)
class Event:
    """One occurrence of something a hypervisor could intercept.

    For instruction events ``insn`` is the static decode and ``rip`` the
    address of the instruction; ``linear`` is the memory operand's linear
    address and ``port`` the resolved I/O port.  For exceptions and
    interrupts ``vector`` (and ``error_code``, ``cr2`` for #PF) are set.

    ``regs`` gives the guest state at the event, read lazily by name:
    the GPRs by their 64-bit names (``"rax"`` ... ``"r15"``), ``"rip"``,
    ``"rflags"``, ``"cr0"``, ``"cr2"``, ``"cr3"``, ``"cr4"``, ``"cr8"``,
    ``"efer"``, ``"cpl"`` and ``"mode"`` (16, 32 or 64: the code size).
    The cores pass a mapping that reads the register on first use; tests
    pass a plain dict.  Rules read from it what they need (ECX for RDMSR,
    the source value of MOV to CR, CR4.TSD and CPL for RDTSC, ...).
    """

    kind: Kind
    core: int
    rip: int
    insn: Optional[Insn] = None
    linear: Optional[int] = None
    port: Optional[int] = None
    vector: Optional[int] = None
    error_code: Optional[int] = None
    cr2: Optional[int] = None
    regs: Mapping[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.insn.length if self.insn is not None else 0

    def to_json(self) -> dict:
        """A JSON-ready dict (used by ``--trace``)."""
        d = {"kind": self.kind.value, "core": self.core, "rip": self.rip}
        if self.insn is not None:
            d["insn"] = self.insn.text
            d["length"] = self.insn.length
        for name in ("linear", "port", "vector", "error_code", "cr2"):
            v = getattr(self, name)
            if v is not None:
                d[name] = v
        if self.extra:
            d.update(self.extra)
        return d
