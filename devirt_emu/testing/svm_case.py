"""Direct SVM cases: run a few guest instructions under a VMCB you write, get the first #VMEXIT.

The SVM twin of :mod:`devirt_emu.testing.vmx_case`.  A *case* is guest code
(Intel-syntax assembly or raw bytes), VMCB fields by their Linux names,
intercept bits by name, MSRPM and IOPM contents, initial registers and
memory.  :func:`run_case` loads the code into a fresh 64-bit guest (below),
performs VMRUN with its consistency checks and runs the guest on a real core
until the first #VMEXIT or a step limit, and returns a :class:`CaseResult`.
No L0 handles the exit: the case ends there.

    >>> from devirt_emu.testing.svm_case import run_case
    >>> r = run_case("cpuid", intercepts=["INTERCEPT_CPUID"])
    >>> r.exit.code, r.exit.name, r.exit.next_rip - r.exit.rip
    (114, 'CPUID', 2)

The fresh state (before ``vmcb``, ``intercepts`` and ``regs`` are applied)
--------------------------------------------------------------------------
Guest (the VMCB save area): the state of :mod:`devirt_emu.platform.longmode`
(64-bit mode, CPL 0, identity paging with 2 MiB pages over the 16 MiB of
RAM, CR0 = 0x80010033, CR4 = 0x20, EFER = 0x1D00 (LME, LMA, NXE, SVME), CS
= 0x08, SS = DS = ES = 0x10, RFLAGS = 0x2, RSP = 0x9F000, every IDT gate not
present), RIP = :data:`CODE_BASE`, every other GPR 0, DR7 = 0x400, DR6 =
0xFFFF0FF0, no interrupt shadow.  The code is followed by one HLT byte.
Control area: only INTERCEPT_VMRUN is set (VMRUN requires it), ASID 1,
``iopm_base_pa`` = :data:`IOPM_PA`, ``msrpm_base_pa`` = :data:`MSRPM_PA`,
everything else 0 (no NPT, no EVENTINJ, ``int_ctl`` 0, ``tsc_offset`` 0).
The CPU model is ``epyc-rome`` (devirt_emu/cpumodels/epyc_rome.py): it has
NRIPS, so ``next_rip`` is saved, and MAXPHYADDR 48.

Intercepts: ``intercepts=`` names bits of :mod:`devirt_emu.svm.intercepts`
(``"INTERCEPT_CPUID"``; the prefix may be left out: ``"CPUID"``); they are
set in addition to INTERCEPT_VMRUN.  Giving an intercept word in ``vmcb``
as well is an error.

Maps: all zero unless given.  ``msrpm`` is 8192 bytes or ``{"read": MSRs,
"write": MSRs}`` (:func:`msrpm`); ``iopm`` 12288 bytes or an iterable of
ports 0-0x10002 (:func:`iopm`).  They take effect only with
INTERCEPT_MSR_PROT / INTERCEPT_IOIO_PROT.

Registers: ``regs`` maps "rax".."r15", "rip", "rflags" ("rip", "rflags",
"rsp" and "rax" go to the save area; the others to the engine, which VMRUN
does not load them from).  Memory: ``memory`` maps physical addresses to
bytes written after the fresh state (IDT gates, data), not over the VMCB
and maps.

Memory map (physical = linear): as vmx_case's, with the VMCB at
:data:`VMCB_PA` (0xF00000), the MSRPM at 0xF01000 (8 KiB) and the IOPM at
0xF03000 (12 KiB).

NPT
---
``npt=`` builds nested page tables in :data:`NPT_POOL` (0xF08000-0x1000000),
sets ``nested_cr3`` to them and ``nested_ctl.NP_ENABLE``; every guest access
then goes through the guest's page tables and the nested ones at run time,
and a refused access is the case's #VMEXIT NPF (EXITINFO1 the error code
with bit 32 for the final address or bit 33 for a guest page-table access,
EXITINFO2 the guest-physical address).  Forms, applied in order:
``"identity"`` (GPA = HPA over the 16 MiB, 2-MiB pages, read/write/execute),
``{gpa: (hpa, rights)}`` (4-KiB pages; ``rights`` a string of "r", "w", "x",
"" for a not-present entry; a 2-MiB page mapped before is split), or a list
of them, e.g. ``["identity", {SCRATCH_BASE: (SCRATCH_BASE, "r")}]``.

Outcomes: :attr:`CaseResult.exit` is the first #VMEXIT as the processor
wrote it into the VMCB; a VMRUN that fails its checks is the #VMEXIT with
code -1 (``INVALID``) and :attr:`CaseResult.vmrun_failure` names the check.
:attr:`CaseResult.no_exit` says why a run ended without one ("step limit",
"halted", "shutdown", "stopped").
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterable, Mapping, Optional, Union

from unicorn import x86_const as UX

from ..events import GPR_NAMES
from ..platform import longmode
from ..platform.core import GPR_IDS, GuestError, State
from ..svm import intercepts as I
from ..svm import vmcb as V
from ..svm.npt import NptBuilder
from ..svm.rules import Decision, msrpm_bit
from ..svm.vcpu import SvmVcpu
from ..svm.vmrun import VmrunFailure
from .case_common import CaseError, FirstExitL0, case_code, case_memory, check_int

__all__ = ["CODE_BASE", "CODE_LIMIT", "SCRATCH_BASE", "VMCB_PA", "MSRPM_PA", "IOPM_PA",
           "CaseError", "CaseExit", "NoExit", "CaseResult", "CaseRunner", "run_case",
           "msrpm", "iopm", "NPT_POOL", "NPT_POOL_END"]

MEM_MB = 16
CODE_BASE = 0x100000
CODE_LIMIT = 0x10000
SCRATCH_BASE = 0x400000
VMCB_PA = 0xF00000
MSRPM_PA = 0xF01000
IOPM_PA = 0xF03000
RESERVED_END = 0xF06000
NPT_POOL = 0xF08000            # the nested page tables built for npt=
NPT_POOL_END = 0x1000000
MSRPM_SIZE = 8 << 10
IOPM_SIZE = 12 << 10
HLT = b"\xf4"
_U64 = (1 << 64) - 1
_SAVE_REGS = {"rip", "rflags", "rsp", "rax"}
_ENGINE_REGS = {n: r for n, r in zip(GPR_NAMES, GPR_IDS) if n not in _SAVE_REGS}



def msrpm(read: Iterable[int] = (), write: Iterable[int] = ()) -> bytes:
    """An 8 KiB MSRPM intercepting RDMSR of ``read`` and WRMSR of ``write``
    (APM "MSR Intercepts": MSRs 0-1FFFh, C000_0000h-C000_1FFFh and
    C001_0000h-C001_1FFFh; the others always exit, so naming one is an error)."""
    pm = bytearray(MSRPM_SIZE)
    for msrs, is_write in ((read, False), (write, True)):
        for msr in msrs:
            check_int("MSR number", msr)
            b = msrpm_bit(msr, is_write)
            if b is None:
                raise CaseError(f"MSR {msr:#x} is outside the MSRPM's ranges: its RDMSR/WRMSR "
                                "always exit")
            pm[b >> 3] |= 1 << (b & 7)
    return bytes(pm)


def iopm(ports: Iterable[int]) -> bytes:
    """A 12 KiB IOPM intercepting ``ports`` (bits past 0xFFFF, up to 0x10002,
    are what a multi-byte access at the top ports reads)."""
    pm = bytearray(IOPM_SIZE)
    for p in ports:
        check_int("port", p)
        if p > 0x10002:
            raise CaseError(f"port {p:#x} is beyond the IOPM (0-0xFFFF, and 0x10000-0x10002 "
                            "for accesses that cross 0xFFFF)")
        pm[p >> 3] |= 1 << (p & 7)
    return bytes(pm)


def _npt_items(npt) -> list:
    """``npt=`` as a list of (gpa, hpa, size, rights, page_size)."""
    if isinstance(npt, str):
        if npt != "identity":
            raise CaseError(f"npt is 'identity', a mapping or a list of them, not {npt!r}")
        return [(0, 0, MEM_MB << 20, "rwx", 0x200000)]
    if isinstance(npt, Mapping):
        out = []
        for gpa, spec in npt.items():
            if not isinstance(spec, tuple) or len(spec) != 2 or not isinstance(spec[1], str) \
                    or set(spec[1]) - set("rwx"):
                raise CaseError(f"npt[{gpa!r}]: expected (hpa, rights) with rights a string of "
                                f"'r', 'w', 'x' ('' = not present), not {spec!r}")
            check_int("npt gpa", gpa)
            check_int("npt hpa", spec[0])
            if gpa % 0x1000 or spec[0] % 0x1000:
                raise CaseError(f"npt[{gpa:#x}]: addresses are 4 KiB aligned")
            out.append((gpa, spec[0], 0x1000, spec[1], 0x1000))
        return out
    if isinstance(npt, (list, tuple)):
        return [x for item in npt for x in _npt_items(item)]
    raise CaseError(f"npt is 'identity', a mapping or a list of them, not {type(npt).__name__}")


def _intercept_name(name) -> str:
    if not isinstance(name, str):
        raise CaseError(f"an intercept is named by a string, not {name!r}")
    for cand in (name, f"INTERCEPT_{name}"):
        if cand in I.TABLE:
            return cand
    raise CaseError(f"no SVM intercept is named {name!r}")


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class CaseExit:
    """The first #VMEXIT, as the processor wrote it into the VMCB.

    ``code`` is EXITCODE as a signed number (-1 for VMEXIT_INVALID), ``name``
    its name (:mod:`devirt_emu.svm.exit_codes`).  ``rip`` is the save area's
    RIP (the intercepted instruction's for an instruction intercept; the next
    one's for a write trap), ``next_rip`` the nRIP (0 where the APM resets
    it).  ``regs`` holds the GPRs (RSP and RAX from the save area) and
    "rip", "rflags", "cr0", "cr2", "cr3", "cr4", "efer" from the save area.
    ``cause`` is what the rule looked at; ``decision`` the rule's Decision."""

    code: int
    name: str
    exit_info_1: int
    exit_info_2: int
    exit_int_info: int
    exit_int_info_err: int
    next_rip: int
    insn_bytes: bytes
    rip: int
    regs: Mapping[str, int]
    cause: tuple
    decision: Decision = field(repr=False)

    def __str__(self) -> str:
        s = (f"#VMEXIT {self.code:#x} {self.name}, exit_info_1 {self.exit_info_1:#x}, "
             f"exit_info_2 {self.exit_info_2:#x}")
        if self.exit_int_info:
            s += f", exit_int_info {self.exit_int_info:#x}"
        return s + f" at RIP {self.rip:#x}"


@dataclass(frozen=True)
class NoExit:
    """The run ended without a #VMEXIT (``why`` as in vmx_case's NoExit)."""

    why: str
    rip: int
    regs: Mapping[str, int]
    message: str = ""

    def __str__(self) -> str:
        tail = f": {self.message}" if self.message else ""
        return f"no #VMEXIT ({self.why}) at RIP {self.rip:#x}{tail}"


@dataclass(frozen=True)
class CaseResult:
    """``exit`` or ``no_exit``; ``vmrun_failure`` with an exit of code -1.
    ``vmcb`` is a snapshot (name -> value) of every VMCB field after the run."""

    exit: Optional[CaseExit]
    no_exit: Optional[NoExit]
    vmrun_failure: Optional[VmrunFailure]
    steps: int
    vmcb: Mapping[str, object] = field(repr=False)
    symbols: Mapping[str, int] = field(repr=False)
    code_end: int = 0

    def __str__(self) -> str:
        return f"{self.exit or self.no_exit} after {self.steps} steps"


# --------------------------------------------------------------------------- the L0 of a case
class _RecordingL0(FirstExitL0):
    """An L0 that takes the first #VMEXIT (a failed VMRUN is #VMEXIT -1) and ends the run."""

    EXIT, ENTRY = "#VMEXIT", "VMRUN"

    def record(self, vcpu) -> CaseExit:
        return _exit_from(vcpu)

    record_failure = record


def _exit_from(vcpu) -> CaseExit:
    v = vcpu.vmcb
    g = v.get
    d = vcpu.last_exit
    core = vcpu.core
    gpr = core.probe.gpr
    regs = {n: gpr(i) for i, n in enumerate(GPR_NAMES)}
    regs.update(rsp=g("rsp"), rax=g("rax"), rip=g("rip"), rflags=g("rflags"), cr0=g("cr0"),
                cr2=g("cr2"), cr3=g("cr3"), cr4=g("cr4"), efer=g("efer"))
    n = g("insn_len")
    return CaseExit(code=v.exitcode, name=d.name, exit_info_1=g("exit_info_1"),
                    exit_info_2=g("exit_info_2"), exit_int_info=g("exit_int_info"),
                    exit_int_info_err=g("exit_int_info_err"), next_rip=g("next_rip"),
                    insn_bytes=g("insn_bytes")[:n], rip=g("rip"), regs=MappingProxyType(regs),
                    cause=tuple(d.cause), decision=d)


# --------------------------------------------------------------------------- the runner
class CaseRunner:
    """One machine that runs cases one after another (see :func:`run_case`)."""

    def __init__(self):
        from ..machine import Machine
        self.machine = Machine(cores=1, mem_mb=MEM_MB, max_ns=1 << 62, cpu="epyc-rome")
        self.core = core = self.machine.cores[0]
        self._asm_cache: dict[str, tuple[bytes, dict[str, int]]] = {}
        longmode.write_environment(self.machine)
        longmode.enter(core, CODE_BASE)
        core.uc.reg_write(UX.UC_X86_REG_DR7, 0x400)
        for rid in GPR_IDS:
            if rid != UX.UC_X86_REG_RSP:
                core.uc.reg_write(rid, 0)
        self.machine.boot(prepared=True)
        self._fresh_context = core.uc.context_save()
        self._env_bytes = self.machine.mem.read(longmode.GDT, longmode.PML4 + 0x3000 - longmode.GDT)
        # the fresh VMCB: the save area from the fresh state, the control area's defaults
        mem = self.machine.mem
        V.Vmcb(mem, VMCB_PA).clear()
        probe = SvmVcpu(core, VMCB_PA, _RecordingL0(self.machine))
        probe.save_guest_state()
        v = probe.vmcb
        v.set("dr6", 0xFFFF0FF0)
        v.set("intercept_word4", 1 << (I.INTERCEPT_VMRUN & 31))
        v.set("asid", 1)
        v.set("iopm_base_pa", IOPM_PA)
        v.set("msrpm_base_pa", MSRPM_PA)
        self._fresh_vmcb = mem.read(VMCB_PA, V.VMCB_SIZE)
        self._maps = {MSRPM_PA: bytes(MSRPM_SIZE), IOPM_PA: bytes(IOPM_SIZE)}
        for pa, data in self._maps.items():
            self.machine.write_phys(pa, data)
        #: The NptBuilder of the last case run with ``npt=`` (None without): its
        #: ``entry_address(gpa, level)`` lets a test read the entries' A/D flags.
        self.npt: Optional[NptBuilder] = None

    def _code(self, code) -> tuple[bytes, dict[str, int]]:
        return case_code(code, self._asm_cache, CODE_BASE, CODE_LIMIT)

    @staticmethod
    def _fields(vmcb_fields, intercepts, regs) -> tuple[dict, dict]:
        fields: dict[str, object] = {}
        for name, value in (vmcb_fields or {}).items():
            if not isinstance(name, str) or name not in V.BY_NAME:
                raise CaseError(f"no VMCB field is named {name!r}")
            if name == "insn_bytes":
                if not isinstance(value, (bytes, bytearray)) or len(value) > 15:
                    raise CaseError("insn_bytes is at most 15 bytes")
            else:
                check_int(name, value)
                if value >> (8 * V.BY_NAME[name].size):
                    raise CaseError(f"{name} is {8 * V.BY_NAME[name].size} bits; "
                                    f"{value:#x} does not fit")
            fields[name] = value
        words = None
        if intercepts is not None:
            if isinstance(intercepts, str):
                raise CaseError("intercepts is a list of names, not one string")
            clash = set(V.INTERCEPT_WORDS) & set(fields)
            if clash:
                raise CaseError(f"give intercepts either by name or as {sorted(clash)}, not both")
            words = I.words_from_names([_intercept_name(n) for n in intercepts])
            words[4] |= 1 << (I.INTERCEPT_VMRUN & 31)
        engine = {}
        for name, value in (regs or {}).items():
            check_int(f"register {name!r}", value)
            if value > _U64:
                raise CaseError(f"register {name!r}: {value:#x} does not fit 64 bits")
            if name in _SAVE_REGS:
                if name in fields:
                    raise CaseError(f"{name!r} is given both in regs and in vmcb")
                fields[name] = value
            elif name in _ENGINE_REGS:
                engine[name] = value
            else:
                raise CaseError(f"unknown register {name!r}; one of {', '.join(GPR_NAMES)}, "
                                "rip, rflags")
        if words is not None:
            for w, val in zip(V.INTERCEPT_WORDS, words):
                fields[w] = val
        return fields, engine

    @staticmethod
    def _map(what: str, value, size: int, build) -> bytes:
        if value is None:
            return bytes(size)
        if isinstance(value, (bytes, bytearray, memoryview)):
            if len(value) != size:
                raise CaseError(f"{what} is {size} bytes, not {len(value)}")
            return bytes(value)
        if what == "msrpm":
            if not isinstance(value, Mapping) or set(value) - {"read", "write"}:
                raise CaseError("msrpm is 8192 bytes or {'read': MSRs, 'write': MSRs}")
            return build(value.get("read", ()), value.get("write", ()))
        try:
            return build(list(value))
        except TypeError:
            raise CaseError(f"{what} is {size} bytes or an iterable of ports") from None

    def _memory(self, memory) -> list[tuple[int, bytes]]:
        return case_memory(memory, self.machine.mem.size, (VMCB_PA, RESERVED_END), "the VMCB and maps",
                           "use vmcb=, msrpm=, iopm=")

    def run(self, code, *, vmcb: Optional[Mapping] = None, intercepts: Optional[Iterable[str]] = None,
            msrpm: Union[bytes, Mapping, None] = None, iopm: Union[bytes, Iterable[int], None] = None,
            regs: Optional[Mapping[str, int]] = None, memory: Optional[Mapping[int, bytes]] = None,
            max_steps: int = 10_000, npt=None) -> CaseResult:
        """Run one case; see :func:`run_case`."""
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise CaseError(f"max_steps is a positive int, not {max_steps!r}")
        if vmcb is not None and not isinstance(vmcb, Mapping):
            raise CaseError(f"vmcb is a mapping of field names to values, not {type(vmcb).__name__}")
        data, symbols = self._code(code)
        fields, engine = self._fields(vmcb, intercepts, regs)
        maps = {MSRPM_PA: self._map("msrpm", msrpm, MSRPM_SIZE, _msrpm_builder),
                IOPM_PA: self._map("iopm", iopm, IOPM_SIZE, _iopm_builder)}
        writes = self._memory(memory)
        npt_items = None
        if npt is not None:
            npt_items = _npt_items(npt)
            if "nested_cr3" in fields:
                raise CaseError("give the nested tables either as npt= or as nested_cr3, not both")
            for pa, blob in writes:
                if pa < NPT_POOL_END and pa + len(blob) > NPT_POOL:
                    raise CaseError(f"memory at {pa:#x}+{len(blob):#x} overlaps the nested "
                                    f"tables of npt= ({NPT_POOL:#x}-{NPT_POOL_END:#x})")
        m, core = self.machine, self.core
        self._reset(data, maps)
        for pa, blob in writes:
            m.write_phys(pa, blob)
        self.npt = None
        if npt_items is not None:
            b = self.npt = NptBuilder(m.mem, NPT_POOL, NPT_POOL_END - NPT_POOL)
            for gpa, hpa, size, rights, page_size in npt_items:
                try:
                    b.map(gpa, hpa, size, present=bool(rights), writable="w" in rights,
                          nx="x" not in rights, page_size=page_size)
                except ValueError as e:
                    raise CaseError(f"npt: {e}") from None
            fields["nested_cr3"] = b.root
            fields["nested_ctl"] = fields.get("nested_ctl", 0) | V.SVM_NESTED_CTL_NP_ENABLE
        l0 = _RecordingL0(m)
        vcpu = SvmVcpu(core, VMCB_PA, l0)
        vcpu.engine_matches_vmcb()       # (the fresh context is what the fresh VMCB was saved from)
        v = vcpu.vmcb
        for name, value in fields.items():
            v.set(name, value)
        for name, value in engine.items():
            core.uc.reg_write(_ENGINE_REGS[name], value)
        core.virt = vcpu
        icount0 = core.icount
        try:
            if vcpu.vmrun():
                m.step(max_steps, core=0)
        except GuestError as e:
            m.finish("error", str(e))
        finally:
            core.virt = None
        steps = core.icount - icount0
        snapshot = v.snapshot()
        end = CODE_BASE + len(data)
        if l0.exit is not None:
            return CaseResult(l0.exit, None, l0.failure, steps, snapshot, symbols, end)
        if core.state is State.HALTED and m.verdict in (None, "halted"):
            why, msg = "halted", ""
        elif core.state is State.SHUTDOWN and m.verdict in (None, "shutdown"):
            why, msg = "shutdown", ""
        elif m.verdict is not None:
            why, msg = "stopped", m.message
        else:
            why, msg = "step limit", ""
        uc = core.uc
        regs_now = {n: uc.reg_read(r) for n, r in zip(GPR_NAMES, GPR_IDS)}
        regs_now.update(rip=core.rip(), rflags=uc.reg_read(UX.UC_X86_REG_EFLAGS))
        no = NoExit(why, core.rip(), MappingProxyType(regs_now), msg)
        return CaseResult(None, no, None, steps, snapshot, symbols, end)

    def _reset(self, code: bytes, maps: dict[int, bytes]) -> None:
        m, core = self.machine, self.core
        mem = m.mem
        m.new_run()
        env = self._env_bytes
        if mem.read(longmode.GDT, len(env)) != env:
            m.write_phys(longmode.GDT, env)
        for pa, data in maps.items():
            if self._maps.get(pa) != data or mem.read(pa, len(data)) != data:
                m.write_phys(pa, data)
                self._maps[pa] = data
        mem.write(VMCB_PA, self._fresh_vmcb)
        blob = code + HLT
        if mem.read(CODE_BASE, len(blob)) != blob:
            m.write_phys(CODE_BASE, blob)
        core.uc.context_restore(self._fresh_context)
        core.reset_model_state()
        core.state = State.RUNNING
        core.lapic.reset()


def _msrpm_builder(read, write):
    return msrpm(read, write)


def _iopm_builder(ports):
    return iopm(ports)


_runner: Optional[CaseRunner] = None


def run_case(code, *, vmcb: Optional[Mapping] = None, intercepts: Optional[Iterable[str]] = None,
             msrpm: Union[bytes, Mapping, None] = None, iopm: Union[bytes, Iterable[int], None] = None,
             regs: Optional[Mapping[str, int]] = None, memory: Optional[Mapping[int, bytes]] = None,
             max_steps: int = 10_000, npt=None) -> CaseResult:
    """Run ``code`` as an SVM guest from the fresh 64-bit state until the first #VMEXIT.

    ``code``: Intel-syntax assembly (at :data:`CODE_BASE`) or bytes.
    ``vmcb``: VMCB field name -> value (control and save area alike), written
    after the fresh VMCB.  ``intercepts``: intercept names (see the module
    docstring).  ``msrpm``, ``iopm``, ``regs``, ``memory``: see the module
    docstring.  ``max_steps``: guest instructions to run at most.  Raises
    :class:`CaseError` for input that cannot be run as given.  ``npt``: nested
    paging in a line (module docstring, "NPT").
    """
    global _runner
    if _runner is None:
        _runner = CaseRunner()
    return _runner.run(code, vmcb=vmcb, intercepts=intercepts, msrpm=msrpm, iopm=iopm, regs=regs,
                       memory=memory, max_steps=max_steps, npt=npt)
