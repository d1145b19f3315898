"""One x86-64 core: a Unicorn engine plus what Unicorn lacks.

How guest code runs
-------------------
RAM is mapped readable and writable but not executable.  The first fetch
from a page stops the engine (UC_ERR_FETCH_PROT); the core then scans the
page with :mod:`devirt_emu.cpu.scan`, puts a UC_HOOK_CODE hook on the exact
address of every sensitive instruction found, makes the page executable,
write-protects it in every other core, and resumes.  Ordinary instructions
never reach Python.  A store into the page by this core (self-modifying code,
or data sharing a page with code) lands as on hardware: a write hook rescans
only the starts it can change (see :class:`~.watch.CodeWatching`).  A store
into it by another core stops that core's engine (UC_ERR_WRITE_PROT); the
scan is dropped in every core, the page becomes writable and non-executable
again, and the store is retried.  Hooks are keyed by linear address and execute
permission by physical page, so a second linear alias of a scanned page
would run unhooked: the core therefore re-arms (drops execute permission
everywhere) on CR3 loads, INVLPG and paging-mode changes.

Pages first executed in 64-bit mode are scanned as 64-bit code only; pages
first executed in real or protected mode (the boot path) are scanned for all
three code sizes and their hooks check the mode each time they fire.

What Unicorn gets wrong, the core does itself: interrupt and exception
delivery through the guest IDT (IA-32e mode gates and IST here; real,
protected and virtual-8086 mode in :mod:`.delivery`; error codes from
QEMU's state, #DF, triple fault), the interrupt shadow of STI / MOV SS /
POP SS, NMI blocking until IRET, HLT, MSRs (an unknown MSR is #GP), CPUID,
port I/O, the local APIC (x2APIC MSRs and the xAPIC MMIO page), CR8.

Watched physical pages
----------------------
A layer above (the VMX APIC-access page) can *watch* a physical page:
:meth:`Core.watch_page` maps it with no access in this core's engine (a page
outside RAM, the xAPIC MMIO page included, gets a private no-access page
mapped in its place), so every engine access to it stops the engine before
the instruction takes effect, with RIP at the instruction; the core then
calls the watcher with a :class:`PageAccess`.  The watcher either leaves the
instruction undone (a VM exit) or lets it run once over the page with
:meth:`Core.step_watched`.  Measured on Unicorn 2.1.4 (see the methods):
the protection hooks get the *physical* address and the access size (8 for
a qword), a denied read or write leaves registers and memory unchanged (a
REP string instruction keeps the iterations already done), and a denied
fetch stops with RIP at the fetched address.  Two holes: a read that starts
on the page before and crosses into the watched page is not seen at all, and
a write crossing into it has already written its bytes on the page before.
Accesses the platform performs itself in Python (event delivery, INS/OUTS,
task switches) through read_linear/write_linear call the watcher at once,
inside the access (see :meth:`PageWatching.watch_page`).

Time
----
The core's clock is in virtual nanoseconds; one retired instruction is one
nanosecond (a 1 GHz core retiring one instruction per cycle) and the TSC
counts nanoseconds.  In deterministic mode every run is a counted
``emu_start`` and the retired count is exact (see :mod:`ucinternals`).
"""
from __future__ import annotations

import ctypes
import enum
import struct
import time
from functools import partial
from typing import Callable, Optional

from unicorn import (UC_ARCH_X86, UC_ERR_EXCEPTION, UC_ERR_FETCH_PROT, UC_ERR_FETCH_UNMAPPED,
                     UC_ERR_INSN_INVALID, UC_ERR_READ_UNMAPPED,
                     UC_ERR_WRITE_PROT, UC_ERR_WRITE_UNMAPPED, UC_HOOK_CODE,
                     UC_ERR_READ_PROT, UC_HOOK_INTR, UC_HOOK_MEM_FETCH_PROT,
                     UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE, UC_HOOK_MEM_WRITE_PROT,
                     UC_MEM_WRITE, UC_MODE_16,
                     UC_PROT_EXEC, UC_PROT_READ, UC_PROT_WRITE, Uc,
                     UcError)
from unicorn import x86_const as X
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib  # (see _add_site_hook)

from ..x86 import (ERROR_CODE_VECTORS, MSR_EFER, X86_EFLAGS_DF, X86_EFLAGS_IF, X86_EFLAGS_NT,
                   X86_EFLAGS_OF, X86_EFLAGS_RF, X86_EFLAGS_TF, X86_EFLAGS_VM)
from ..cpu.decode import resolve_linear
from ..events import GPR_NAMES, IO_KINDS, Event, Insn, Kind
from ..virt import Delivery, EventType
from . import cpuid as cpuid_model
from . import monitor, pcid
from .monitor import MonitorState
from . import tasks
from .delivery import LegacyDelivery
from .descriptors import DescriptorTables
from .descriptors import ar_to_flags, descriptor_cache, flags_to_ar  # (re-exported)
from .lapic import GeneralProtection
from .memory import PAGE_SIZE
from .msrs import check_read, check_write, is_canonical, reset_value
from .paging import PageFault, PagingMode, UnsupportedPaging, paging_mode, translate
from .errors import GuestError, _Fault
from .task_switch import TASK_SWITCH_INSNS, TaskSwitcher
from .watch import _DORMANT, CodeWatching, PageAccess, PageWatching
from .tlb import (ACC_FETCH, ACC_READ, ACC_WRITE, AccessAborted, NonCanonical, PaeRegisters,
                  SecondStage, Stage2Fault, VirtualTlb)
from .ucinternals import HF_CS64, EngineProbe

IMPOSSIBLE_PC = 0xFFFF_FFFF_FFFF_FFFF
#: The site hooks' callback type: Unicorn calls a UC_HOOK_CODE callback with
#: (uc, address, size, user_data); declaring only the first two is sound in the
#: x86-64 calling conventions (the other two stay in their registers) and spares
#: converting them on every hooked instruction (measured: about 0.3 us a call).
_SITE_HOOK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64)
#: The code-page store hooks' callback type: a UC_HOOK_MEM_WRITE callback gets
#: (uc, type, address, size, value, user_data); user_data is the code page.
_CODE_WRITE_HOOK = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64,
                                    ctypes.c_int, ctypes.c_int64, ctypes.c_uint64)
#: Kinds whose native handling always completes the instruction in Python (or
#: raises a fault): on a compute phase's page they are caught by Unicorn exits.
EXIT_KINDS = frozenset({
    Kind.IN, Kind.OUT, Kind.INS, Kind.OUTS, Kind.CPUID, Kind.RDTSC, Kind.RDTSCP, Kind.HLT,
    Kind.INT, Kind.INT3, Kind.INT1, Kind.PAUSE, Kind.RDPMC, Kind.STI,
})
#: A counted run of at least this many instructions that ended only because its
#: budget ran out, with no event on the way, counts as a compute phase (see
#: Core._keep_only_current_page).
CALM_RUN = 20_000
#: Virtual nanoseconds one PAUSE takes (about 140 cycles on Skylake and later).
PAUSE_NS = 140


GPR_IDS = (X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX,
           X.UC_X86_REG_RSP, X.UC_X86_REG_RBP, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI,
           X.UC_X86_REG_R8, X.UC_X86_REG_R9, X.UC_X86_REG_R10, X.UC_X86_REG_R11,
           X.UC_X86_REG_R12, X.UC_X86_REG_R13, X.UC_X86_REG_R14, X.UC_X86_REG_R15)
def _register_readers(core: "Core") -> dict:
    """Event.regs names -> how ``core`` reads them, bound once per core: GPRs,
    RIP, CPL and CR0/3/4 straight from QEMU's state (C calls, no Python frame);
    RFLAGS assembled by Unicorn from QEMU's lazy flags."""
    p = core.probe
    r = {n: p.gpr_reader(i) for i, n in enumerate(GPR_NAMES)}
    r.update(
        rip=p.eip,
        rflags=partial(p.reg, X.UC_X86_REG_EFLAGS),
        cr0=p.cr_reader(0),
        cr2=partial(p.reg, X.UC_X86_REG_CR2),
        cr3=p.cr_reader(3),
        cr4=p.cr_reader(4),
        efer=partial(core.rdmsr_raw, MSR_EFER),
        cr8=lambda: core.lapic.read_cr8(),
        cpl=p.cpl,
        mode=core.code_size,
        dr7=partial(p.reg, X.UC_X86_REG_DR7),
        tsc=core.tsc,
        xss=lambda: 0,              # XSAVES is not supported: IA32_XSS is 0
    )
    return r


#: Kind -> its name (the keys of ``Core.events``): an enum's ``.value`` costs a
#: property call, and this is looked up on every hooked instruction.
_KIND_NAMES = {k: k.value for k in Kind}
#: Kinds used on every VM exit, bound once: an Enum class attribute costs about
#: 0.3 us on CPython 3.11 (EnumType.__getattr__ puts every lookup on the slow path).
_KIND_IN, _KIND_TASK_SWITCH = Kind.IN, Kind.TASK_SWITCH

#: Event types of the software events the core delivers (INT1 is privileged).
_SOFT_EVENT_TYPE = {Kind.INT: EventType.SOFTWARE_INTERRUPT, Kind.INT3: EventType.SOFTWARE_EXCEPTION,
                    Kind.INTO: EventType.SOFTWARE_EXCEPTION}

#: Stop reasons a hook gives for a stop the stepping API asked for (Machine.stop_on_exit,
#: watchpoints, Machine.stop_on_vector).
_USER_STOPS = frozenset({"vm-exit", "watch", "vector"})

# Exception classes for the double-fault rule (SDM "Conditions for Generating a Double Fault").
_CONTRIBUTORY = frozenset({0, 10, 11, 12, 13})


# Kinds that the modelled CPU does not implement natively: #UD.
_NATIVE_UD = frozenset({
    Kind.VMCALL, Kind.VMCLEAR, Kind.VMLAUNCH, Kind.VMRESUME, Kind.VMPTRLD, Kind.VMPTRST,
    Kind.VMREAD, Kind.VMWRITE, Kind.VMXON, Kind.VMXOFF, Kind.INVEPT, Kind.INVVPID,
    Kind.VMFUNC, Kind.ENCLS, Kind.ENCLU, Kind.ENCLV, Kind.VMRUN, Kind.VMMCALL, Kind.VMLOAD,
    Kind.VMSAVE, Kind.STGI, Kind.CLGI, Kind.SKINIT, Kind.INVLPGA, Kind.MONITOR, Kind.MWAIT,
    Kind.MONITORX, Kind.MWAITX, Kind.UMONITOR, Kind.UMWAIT, Kind.TPAUSE, Kind.XSAVES,
    Kind.XRSTORS, Kind.INVPCID, Kind.GETSEC, Kind.RSM, Kind.RDPRU, Kind.INVLPGB,
    Kind.TLBSYNC, Kind.MCOMMIT, Kind.UD2, Kind.XSETBV,
})
# Kinds Unicorn executes correctly itself: the core only counts them.
_NATIVE_PASS = frozenset({
    Kind.MOV_FROM_DR, Kind.MOV_TO_DR, Kind.CLTS, Kind.LMSW, Kind.SMSW, Kind.RDRAND, Kind.RDSEED,
    Kind.INVD, Kind.WBINVD, Kind.WBNOINVD, Kind.LGDT, Kind.LIDT, Kind.SGDT,
    Kind.SIDT, Kind.LLDT, Kind.LTR, Kind.SLDT, Kind.STR, Kind.PUSHF, Kind.CLI,
})


class State(enum.Enum):
    WAIT_SIPI = "wait-for-SIPI"
    RUNNING = "running"
    HALTED = "halted"
    SHUTDOWN = "shutdown"


class LazyRegs(dict):
    """The ``Event.regs`` mapping: reads a register on first use (and keeps it).
    A dict, so that every use after the first is a plain dict lookup.  Made by
    :meth:`Core.lazy_regs` (no ``__init__`` of its own: dict's is C)."""

    __slots__ = ("core",)

    def __missing__(self, name: str) -> int:
        v = self[name] = self.core.reg_readers[name]()      # (KeyError: no such register)
        return v

    def get(self, name, default=None):
        try:
            return self[name]
        except KeyError:
            return default


class Core(PageWatching, CodeWatching, SecondStage):
    """One logical processor of a :class:`~devirt_emu.machine.Machine`."""

    def __init__(self, machine, index: int, lapic):
        self.machine = machine
        #: The CPU model this core is (CPUID, the MSRs it has, the VMX capabilities).
        self.cpu = cpuid_model.get_model(getattr(machine, "cpu", None))
        self.index = index
        self.apic_id = index
        self.lapic = lapic
        self.mem = machine.mem
        uc = Uc(UC_ARCH_X86, UC_MODE_16)
        self.uc = uc
        uc.mem_map_ptr(0, self.mem.size, UC_PROT_READ | UC_PROT_WRITE, self.mem.ptr)
        self._map_lapic_mmio()
        self._site_cb = _SITE_HOOK(self._on_site_raw)        # kept alive with the core
        self._code_write_cb = _CODE_WRITE_HOOK(self._on_code_write_raw)
        self._site_of: dict[int, tuple] = {}   # hooked address -> (insn or None, insn by code size)
        uc.hook_add(UC_HOOK_MEM_FETCH_PROT, self._on_fetch_prot)
        uc.hook_add(UC_HOOK_MEM_WRITE_PROT, self._on_write_prot)
        uc.hook_add(UC_HOOK_INTR, self._on_intr)
        self.probe = EngineProbe(uc)
        self.reg_readers = _register_readers(self)   # Event.regs name -> reader()
        # One register API for every CPU mode (see ucinternals): 64-bit registers,
        # RIP = EIP, emu_start(begin) sets EIP; segments are written by the core.
        self.probe.set_real_mode_api(False)
        self._architectural_reset()
        self.reset_context = uc.context_save()
        self.state = State.WAIT_SIPI
        self.icount = 0                # retired instructions
        self.clock = 0                 # virtual ns at the next instruction
        self.tsc_offset = 0            # IA32_TSC writes
        self.tsc_adjust = 0            # added while a VMX guest's RDTSC is executed
        self.events: dict[str, int] = {}
        self.markers: list[list[int]] = []     # [begin_icount, end_icount or None]
        self.msr_store: dict[int, int] = {}
        self.nmi_blocked = False
        self.shadow_at = -1            # icount of the instruction in an interrupt shadow
        self.virt = None               # the VMX/SVM layer, when one is attached
        self.vtlb: VirtualTlb | None = None    # virtual-TLB mode (a second stage), made on first use
        self.pae = PaeRegisters(self)          # the PDPTE registers of PAE paging (a part)
        self.iret_unblocked_nmi = False        # the IRET being stepped unblocked NMIs
        self._straddle_exit: int | None = None  # temporary engine exit (see _straddle_fetch)
        # parts: the GDT/LDT, task switches, delivery outside IA-32e mode
        self.tables = DescriptorTables(self)
        self.task_switcher = TaskSwitcher(self, self.tables)
        self.legacy = LegacyDelivery(self, self.tables)
        self.trace = machine.trace
        # page scanning
        self.hooks: dict[int, dict] = {}      # physical page -> {linear: (handle, insn)}
        self.exec_pages: set[int] = set()     # physical pages executable in this engine
        self._exit_sites: dict[int, Insn] = {}     # linear address -> site handled by exit
        self._exit_pages: dict[int, list[int]] = {}
        self._exits_enabled = False
        self.fetch_fault: int | None = None
        self._last_fetch_fault, self._last_fetch_icount = None, -1
        self.write_fault: int | None = None
        # stores into executable pages (see CodeWatching)
        self._code_scans: dict[int, list] = {}     # executable page -> [CodeScan]
        self._code_by_lpage: dict[int, object] = {}   # linear page -> its CodeScan
        self._code_write_hooks: dict[int, int] = {}   # executable page -> write hook
        self._code_stale: set[int] = set()     # pages other cores stored into
        self._code_rescan: set[int] = set()    # ... changing their sensitive sites
        self._last_store: tuple | None = None  # (EIP, address, size, value) of the last store
        self._last_store_count = -1            # the instruction count it came at
        self._store_alone = False      # running an undone store alone (see _engine_run)
        self._counter, self._eip = self.probe.executed, self.probe.eip   # (for the store hook)
        self._ram = self.mem.view
        self._peers: tuple | None = None       # the machine's other cores, once they all exist
        # per-run bookkeeping
        self._budget = 0
        self._uncount = 0
        self._stop_reason: str | None = None
        self._skip_once = -1
        self._in_run = False
        self._counted = True           # the current run counts instructions exactly
        #: The event whose delivery through the IDT is in progress (see deliver_exception).
        self.delivering: Delivery | None = None
        self.cr2 = 0                   # CR2 as the architecture has it (see _on_intr)
        self.free_running = False      # fast mode: the scheduler lets this core run uncounted
        self._extra_ns = 0             # virtual time beyond 1 ns per instruction (PAUSE)
        self._time_limit = 0           # virtual ns at which the current run should yield
        self._hook_ns = 0              # wall ns spent in our hooks during the current run
        self._run_events = 0           # events dispatched during the current run
        self._run_wall0 = 0
        self._rearm_after_step = False
        self._pending_rearm = False
        # watched physical pages (see watch_page)
        self._watched: dict[int, Callable] = {}          # page -> watcher(core, PageAccess)
        self._watch_scratch: dict[int, ctypes.Array] = {}   # page outside RAM -> its stand-in
        self._watch_queue: list[tuple[int, Optional[Callable]]] = []   # changes made in a run
        self._watch_hit: Optional[PageAccess] = None
        self._watch_denied: Optional[PageAccess] = None
        self._watch_stepping = False
        self._read_prot_hook = None
        # the stepping API's stops (see Machine.run_until)
        self.breakpoints: set[int] = set()     # linear addresses: Unicorn exits
        self._bp_suspended: int | None = None  # the breakpoint being stepped over
        self._at_breakpoint: int | None = None  # stopped at it: the next run steps over it
        self.stop_vectors: frozenset[int] = frozenset()
        self.vector_hit: int | None = None
        self._watch_hooks: dict[int, list[int]] = {}   # watchpoint id -> Unicorn hooks
        self._watch_code_hook = None
        self.watch_hit: tuple[int, int, str] | None = None   # (id, address, access)
        self.monitor = MonitorState()          # MONITOR/MWAIT (platform/monitor.py)
        self._handlers = self._make_handlers()

    def _architectural_reset(self) -> None:
        """The state after power-up/RESET/INIT (SDM "Processor State Following
        Power-up, Reset, or INIT"); Unicorn's own reset leaves CS:IP at 0:0."""
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_CR0, 0x60000010)
        uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)
        uc.reg_write(X.UC_X86_REG_EDX, self.cpu.cpuid_for(1, 0, 0, 1)[0])
        uc.reg_write(X.UC_X86_REG_GDTR, (0, 0, 0xFFFF, 0))
        uc.reg_write(X.UC_X86_REG_IDTR, (0, 0, 0xFFFF, 0))
        uc.reg_write(X.UC_X86_REG_DR7, 0x400)
        for seg in (0, 2, 3, 4, 5):
            self.write_segment(seg, 0, 0, 0xFFFF, 0x93)
        self.write_segment(1, 0xF000, 0xFFFF0000, 0xFFFF, 0x9B)
        self.write_segment(6, 0, 0, 0xFFFF, 0x82)
        self.write_segment(7, 0, 0, 0xFFFF, 0x8B)
        uc.reg_write(X.UC_X86_REG_IP, 0xFFF0)

    # ------------------------------------------------------------------ registers
    def read_reg(self, name: str) -> int:
        """A register by the names of :class:`~devirt_emu.events.Event` ``regs``."""
        return self.reg_readers[name]()

    def lazy_regs(self) -> "LazyRegs":
        """A fresh ``Event.regs`` mapping for this core."""
        regs = LazyRegs()
        regs.core = self
        return regs

    def rip(self) -> int:
        """The linear address of the next instruction (CS.base + RIP), as hooks see it."""
        return (self.probe.cs_base() + self.probe.eip()) & 0xFFFF_FFFF_FFFF_FFFF

    def set_rip(self, linear: int) -> None:
        """Continue at a linear address (RIP = linear - CS.base)."""
        probe = self.probe
        probe.set_eip(linear - probe.cs_base())

    def load_segment(self, index: int, selector: int) -> None:
        """Load segment register ``index`` (ES, CS, SS, DS, FS, GS = 0..5) as a
        MOV to it would: from the GDT in protected mode, base = selector * 16
        in real mode.

        Measured: Unicorn's register API does not do this (its 16-bit API gives
        DS/ES/SS real-mode bases even with CR0.PE=1; its 64-bit API stores the
        selector only), so the core writes QEMU's segment cache itself.
        """
        if not self.probe.reg(X.UC_X86_REG_CR0) & 1:
            self.write_segment(index, selector, selector << 4, 0xFFFF, 0x9B if index == 1 else 0x93)
            return
        if selector & ~3 == 0:
            self.write_segment(index, selector, 0, 0, 1 << 16)      # null: unusable
            return
        desc = self._descriptor(selector)
        if desc is None:
            raise GuestError(f"core {self.index}: selector {selector:#x} is outside the GDT")
        base, limit, flags = descriptor_cache(desc)
        # a load marks a code/data descriptor accessed (the processor sets its A bit)
        self.write_segment(index, selector, base, limit, flags_to_ar(flags | (1 << 8)))

    def read_segment(self, index: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, access rights in the VMCS format) of ES..GS (0..5),
        LDTR (6) or TR (7)."""
        sel, base, limit, flags = self.probe.segment(index)
        return sel, base, limit, flags_to_ar(flags)

    def write_segment(self, index: int, selector: int, base: int, limit: int, ar: int) -> None:
        """Set a segment register's selector and hidden part (VMCS access-rights format)."""
        self.probe.set_segment(index, selector, base, limit, ar_to_flags(ar))
        self.probe.fix_hflags()

    def rdmsr_raw(self, index: int) -> int:
        return self.uc.reg_read(X.UC_X86_REG_MSR, index)

    def cpl(self) -> int:
        return self.probe.cpl()

    def code_size(self) -> int:
        """16, 32 or 64: the current code size (CS.L/CS.D in protected mode; 16 in
        real-address and virtual-8086 mode)."""
        if not self.probe.reg(X.UC_X86_REG_CR0) & 1 or self.probe.reg(X.UC_X86_REG_EFLAGS) & X86_EFLAGS_VM:
            return 16
        desc = self._descriptor(self.probe.reg(X.UC_X86_REG_CS))
        if desc is None:
            return 32
        if (desc >> 53) & 1 and self.rdmsr_raw(MSR_EFER) & (1 << 10):
            return 64
        return 32 if (desc >> 54) & 1 else 16

    def _descriptor(self, selector: int) -> int | None:
        _, base, limit, _ = self.uc.reg_read(X.UC_X86_REG_GDTR)
        idx = selector & ~7
        if selector & 4 or idx + 7 > limit:
            return None
        try:
            return struct.unpack("<Q", self.read_linear(base + idx, 8, peek=True))[0]
        except (PageFault, UnsupportedPaging):
            return None

    # ------------------------------------------------------------------ time
    def retired_now(self) -> int:
        """Retired instructions up to (not including) the instruction being handled."""
        if self._in_run and self._counted:
            return self.icount + self.probe.executed() - 1 - self._uncount
        return self.icount

    def now(self) -> int:
        """Virtual ns at the current instruction."""
        if self._in_run:
            if self._counted:
                return self.clock + (self.retired_now() - self.icount) + self._extra_ns
            return self.clock + self._free_run_estimate() + self._extra_ns
        return self.clock

    def _free_run_estimate(self) -> int:
        """Instructions a free-running (fast mode) run has retired so far, estimated
        from the wall time spent emulating (our hooks' time excluded) at the raw
        rate measured on this machine."""
        emulating = time.perf_counter_ns() - self._run_wall0 - self._hook_ns
        return max(0, int(emulating * self.machine.fast_rate))

    def tsc(self) -> int:
        """The TSC as an RDTSC here reads it (``tsc_adjust``: VMX TSC offsetting)."""
        return (self.now() + self.tsc_offset + self.tsc_adjust) & 0xFFFF_FFFF_FFFF_FFFF

    # ------------------------------------------------------------------ memory
    def _paging_regs(self):
        return (self.probe.reg(X.UC_X86_REG_CR0), self.probe.reg(X.UC_X86_REG_CR3),
                self.probe.reg(X.UC_X86_REG_CR4), self.rdmsr_raw(MSR_EFER))

    def translate(self, linear: int, *, write=False, fetch=False, user=False, peek=False) -> int:
        """Linear -> physical for an access the platform makes for the guest.  With
        a second stage (virtual-TLB mode) the walk is two-stage and has the
        guest access's side effects (accessed/dirty flags; a second-stage fault
        is a VM exit, taken now: AccessAborted); ``peek`` asks for none of them
        (any failure is then a PageFault)."""
        vt = self.vtlb
        if vt is not None and vt.active:
            return self._translate2(linear, ACC_WRITE if write else ACC_FETCH if fetch else ACC_READ,
                                    user, peek)
        cr0, cr3, cr4, efer = self._paging_regs()
        pdptes = self.pae.current(peek=peek) if paging_mode(cr0, cr4, efer) is PagingMode.PAE \
            else None
        return translate(self.mem, cr0, cr3, cr4, efer, linear, write=write, fetch=fetch, user=user,
                         pdptes=pdptes)

    def read_linear(self, linear: int, n: int, *, peek: bool = False) -> bytes:
        out = bytearray()
        while n:
            chunk = min(n, PAGE_SIZE - (linear & 0xFFF))
            pa = self.translate(linear, peek=peek)
            if self._watched and not peek and pa & ~0xFFF in self._watched:
                got = self._platform_watched(pa, linear, chunk, None)     # (see watch_page)
                if got is not None:
                    out += got
                    linear += chunk
                    n -= chunk
                    continue
            if not self.mem.contains(pa, chunk):
                raise GuestError(f"core {self.index}: platform read of physical {pa:#x} outside RAM")
            out += self.mem.read(pa, chunk)
            linear += chunk
            n -= chunk
        return bytes(out)

    def write_linear(self, linear: int, data: bytes) -> None:
        off = 0
        while off < len(data):
            chunk = min(len(data) - off, PAGE_SIZE - (linear & 0xFFF))
            pa = self.translate(linear, write=True)
            if self._watched and pa & ~0xFFF in self._watched and \
                    self._platform_watched(pa, linear, chunk, data[off:off + chunk]) is not None:
                linear += chunk          # the watcher took the data (see watch_page)
                off += chunk
                continue
            if not self.mem.contains(pa, chunk):
                raise GuestError(f"core {self.index}: platform write of physical {pa:#x} outside RAM")
            self.machine.write_phys(pa, data[off:off + chunk])
            linear += chunk
            off += chunk

    # ------------------------------------------------------------------ page scanning
    def _on_fetch_prot(self, uc, access, address, size, value, data):
        if self._watched and address & ~0xFFF in self._watched:
            if self._watch_hit is None:
                self._watch_hit = PageAccess(address, "fetch", size)
            return False
        self.fetch_fault = address
        return False

    def _on_write_prot(self, uc, access, address, size, value, data):
        if self._watched and address & ~0xFFF in self._watched:
            if self._watch_hit is None:      # a write split in bytes calls this once per byte
                self._watch_hit = PageAccess(address, "write", size, value)
                self._uncount += 1
            return False
        self.write_fault = address
        self._uncount += 1
        return False

    def _on_read_prot(self, uc, access, address, size, value, data):
        # only watched pages are ever mapped without read permission
        if self._watch_hit is None:
            self._watch_hit = PageAccess(address, "read", size)
            self._uncount += 1
        return False

    def _scan_and_arm(self, linear: int) -> None:
        try:
            pa = self.translate(linear, fetch=True, peek=True)
        except PageFault as pf:
            # Unicorn raised FETCH_PROT, so it found a mapping; our walker disagrees only
            # if the guest changed its tables without invalidating.  Treat as a #PF.
            raise _Fault(14, pf.error_code, linear) from None
        ppage = pa & ~0xFFF
        lpage = linear & ~0xFFF
        if not self.mem.contains(ppage, PAGE_SIZE):
            raise GuestError(f"core {self.index}: execution from physical {pa:#x} outside RAM")
        mode = self.code_size()
        code = self.mem.read(ppage, PAGE_SIZE)
        try:
            tail = self.read_linear(lpage + PAGE_SIZE, 15, peek=True)
        except (PageFault, UnsupportedPaging, GuestError):
            tail = b""
        modes = (64,) if mode == 64 else (16, 32, 64)
        sites: dict[int, dict[int, Insn]] = {}
        for m in modes:
            for addr, insn in self.machine.scan_cache(ppage, code + tail, lpage, m).items():
                sites.setdefault(addr, {})[m] = insn
        handles = self.hooks.setdefault(ppage, {})
        for addr, by_mode in sites.items():
            insn = by_mode[64] if len(modes) == 1 else None
            old = handles.get(addr)
            if old is not None and old[0] is not None:
                self._del_site_hook(old[0], addr)
            handles[addr] = (self._add_site_hook(addr, insn, by_mode), insn)
        self.machine.mark_code_page(ppage)
        # writable here: a store into it is seen by its write hook (see CodeWatching)
        self.uc.mem_protect(ppage, PAGE_SIZE, UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC)
        self._watch_code(ppage, lpage, modes, tail, sites)
        self.exec_pages.add(ppage)

    def disarm_page(self, ppage: int) -> None:
        """Drop this engine's hooks, exits and execute permission for one physical page."""
        for addr, (h, _) in self.hooks.pop(ppage, {}).items():
            if h is not None:
                self._del_site_hook(h, addr)
        gone = self._exit_pages.pop(ppage, None)
        if gone:
            for addr in gone:
                self._exit_sites.pop(addr, None)
            self._set_exits()
        self._unwatch_code(ppage)
        self.exec_pages.discard(ppage)
        self.uc.ctl_remove_cache(ppage, ppage + PAGE_SIZE)

    def rearm_all(self) -> None:
        """Forget every scan of this engine (CR3 load, INVLPG, mode change); in
        virtual-TLB mode also every cached translation (EFER writes and
        register loads by a VM entry do not flush QEMU's TLB: measured)."""
        if self.vtlb is not None and self.vtlb.active:
            self.vtlb.flush()
        for ppage in list(self.exec_pages):
            self.disarm_page(ppage)
            perms = UC_PROT_READ if self.machine.is_code_page(ppage) else UC_PROT_READ | UC_PROT_WRITE
            self.uc.mem_protect(ppage, PAGE_SIZE, perms)

    def _keep_only_current_page(self) -> None:
        """A counted run used its whole budget without an event: a compute phase.
        Unicorn's instruction counter walks every code hook for every counted
        instruction (measured: 1 hook costs 26%, 100 hooks 95% of the speed), so
        the pages this core is not executing now are disarmed; they are scanned
        (from the cache) and hooked again on their next fetch."""
        try:
            here = self.translate(self.rip(), fetch=True, peek=True) & ~0xFFF
        except (PageFault, UnsupportedPaging):
            return
        for ppage in list(self.exec_pages):
            if ppage != here:
                self.disarm_page(ppage)
                self.uc.mem_protect(ppage, PAGE_SIZE, UC_PROT_READ)   # still code: no writes
        self._hooks_to_exits(here)

    def _hooks_to_exits(self, ppage: int) -> None:
        """Replace the hooks of the page a compute phase runs on by Unicorn exits
        where the platform completes the instruction itself (EXIT_KINDS): exits are
        checked when code is translated, not per counted instruction (measured:
        3000 exits cost nothing).  The run stops before such an instruction and
        the core handles it as the hook would have (see _take_exit).  Dormant
        hooks (CodeWatching._resite) go too: a hook costs counted runs speed."""
        new = []
        handles = self.hooks.get(ppage, {})
        dormant = []
        for addr, (h, insn) in handles.items():
            if h is not None and insn is not None and insn.kind in EXIT_KINDS:
                self._del_site_hook(h, addr)
                self._exit_sites[addr] = insn
                new.append(addr)
            elif h is not None and self._site_of.get(addr) is _DORMANT:
                dormant.append((addr, h))    # a store removed its instruction (CodeWatching)
        for addr, h in dormant:
            self._del_site_hook(h, addr)
            del handles[addr]
        if not new:
            return
        for addr in new:
            handles[addr] = (None, handles[addr][1])
        self._exit_pages.setdefault(ppage, []).extend(new)
        self._set_exits()
        self.uc.ctl_remove_cache(ppage, ppage + PAGE_SIZE)

    def _take_exit(self) -> bool:
        """The run stopped at an exit: handle the instruction there as its hook
        would have.  Returns False if RIP is not at an exit site."""
        address = self.rip()
        insn = self._exit_sites.get(address)
        if insn is None:
            return False
        before = self.probe.reg(X.UC_X86_REG_RIP)
        self._dispatch(address, insn)
        if self.probe.reg(X.UC_X86_REG_RIP) != before:
            self.icount += 1          # completed by us (Unicorn stopped before counting it)
            self.clock += 1
        return True

    def protect_page(self, ppage: int, writable: bool) -> None:
        if ppage in self.exec_pages or ppage in self._watched:
            return
        self.uc.mem_protect(ppage, PAGE_SIZE, UC_PROT_READ | (UC_PROT_WRITE if writable else 0))

    # ------------------------------------------------------------------ running
    def run(self, budget: int | None, wall_timeout_us: int = 0, *,
            time_limit: int | None = None) -> str | None:
        """Run up to ``budget`` instructions (None: free-running, fast mode), and
        yield at a PAUSE once virtual time reaches ``time_limit`` (default: the
        clock plus ``budget``).

        Returns the reason the core stopped early ("halt", "shutdown", "check",
        "exit") or None when the budget was used up.
        """
        if self._at_breakpoint is not None:
            at, self._at_breakpoint = self._at_breakpoint, None
            if at == self.rip() and at in self.breakpoints and self.state is State.RUNNING:
                icount = self.icount
                why = self._run_over_breakpoint(at)
                if why is not None and why != "check":
                    return why
                if budget is not None:
                    budget -= self.icount - icount
                    if budget <= 0:
                        return why
        det = budget is not None
        remaining = budget if det else 0
        if time_limit is None:
            time_limit = self.clock + budget if det else 1 << 62
        self._time_limit = time_limit
        while True:
            if self._straddle_exit is not None and self.rip() == self._straddle_exit:
                self._drop_straddle_exit()      # stopped in front of it: now run it
            self._stop_reason = None
            retired, err = self._engine_run(remaining if det else None, wall_timeout_us)
            if det:
                remaining -= retired
            try:
                if err is not None:
                    self._handle_engine_error(err)
            except _Fault as f:
                self.deliver_exception(f.vector, f.error_code, f.cr2)
            if self._pending_rearm:
                self._pending_rearm = False
                self.rearm_all()
            if self._watch_queue:
                self._apply_watch_queue()
            if self._stop_reason == "step":
                self._stop_reason = None
                if remaining or not det:
                    # execute the instruction the hook stopped at, alone
                    stepped = self._step_one()
                    remaining -= stepped
                if self._stop_reason is None:
                    return "check"
            if self._stop_reason is not None:
                return self._stop_reason
            if self.state is not State.RUNNING:
                return "halt"
            if err is None and self.breakpoints and self.rip() in self.breakpoints:
                self._at_breakpoint = self.rip()
                return "break"
            if err is None and self._exit_sites and (not det or remaining > 0) \
                    and self._take_exit():
                # stopped at an exit (see _hooks_to_exits): the instruction is done
                if det:
                    remaining -= 1
                if self._stop_reason is not None:
                    return self._stop_reason
                if self.state is not State.RUNNING:
                    return "halt"
                continue
            if not det:
                if err is None:
                    return None
                continue
            if err is None and retired >= CALM_RUN and not self._run_events and (len(self.exec_pages) > 1 or (
                    self.exec_pages and not self._exit_pages)):
                self._keep_only_current_page()
            if remaining <= 0:
                return None

    def _engine_run(self, count: int | None, wall_timeout_us: int = 0):
        """One emu_start from RIP: exactly ``count`` instructions at most, or
        (None, fast mode) free-running for ``wall_timeout_us``; the retired
        instructions (hooks' cancellations taken off) are added to the count
        and the clock.  Returns (retired, the engine's error or None).  Both
        :meth:`run` and the single steps go through here."""
        if self._code_stale or self._code_rescan:
            self._drop_stale_code()
        self._hook_ns = 0
        self._run_events = 0
        self._run_wall0 = time.perf_counter_ns()
        retired, err = self._emu(count, wall_timeout_us)
        store_stop = self._stop_reason == "store"
        if store_stop:
            self._stop_reason = None
        if err is None and self._stop_reason is None and self._last_store is not None \
                and self.probe.eip() == self._last_store[0] and \
                (store_stop or count is not None and self._last_store_count >= count):
            # the run ended between the two attempts of an instruction that stored
            # into its own translation block (see _on_code_write_raw): its budget
            # ran out, or an unaligned store asked to stop.  It did not retire: run
            # it alone, with room for both attempts and an exit after it
            if count is not None:
                retired -= 1
            more, err = self._run_undone_store()
            retired += more
        retired = max(retired, 0)
        self.icount += retired
        self.clock += retired + self._extra_ns
        self._extra_ns = 0
        return retired, err

    def _emu(self, count: int | None, wall_timeout_us: int):
        self._uncount = 0
        self._budget = count or 0
        self._last_store, self._last_store_count = None, -1
        self.fetch_fault = self.write_fault = None
        self._watch_hit = None
        self.probe.clear_fault_tracking()
        det = count is not None
        self._counted = det
        self._in_run = True
        err = None
        try:
            begin = self.probe.reg(X.UC_X86_REG_RIP)
            if det:
                self.uc.emu_start(begin, IMPOSSIBLE_PC, 0, count)
            else:
                self.uc.emu_start(begin, IMPOSSIBLE_PC, wall_timeout_us, 0)
        except UcError as e:
            err = e
        finally:
            if det:
                retired = min(self.probe.executed(), count) - self._uncount
            else:
                retired = self._free_run_estimate()
            self._in_run = False
        return retired, err

    def _run_undone_store(self):
        rip = self.rip()
        size = self.instruction_length_at_rip()
        after = rip + size if size else None
        self._set_exits(after)
        # the blocks made without that exit: from RIP, and the one from the exit on
        # (measured: Unicorn may run the instruction in a one-instruction block that
        # an undone attempt left pending, then chain to a block at the exit)
        self.uc.ctl_remove_cache(rip, (after if after else rip) + 1)
        self._store_alone = True
        try:
            retired, err = self._emu(2, 0)
        finally:
            self._store_alone = False
            self._set_exits()
        if err is None and after is not None and self.rip() == after:
            retired = 1         # (an unaligned store's second attempt calls no hook)
        return retired, err

    def _step_one(self) -> int:
        """Run exactly one instruction (the one a hook stopped at), then apply
        what it may have changed: the paging mode and the register API."""
        if self._exit_sites and self.rip() in self._exit_sites:
            icount = self.icount
            self._take_exit()
            return self.icount - icount
        if self._straddle_exit is not None and self.rip() == self._straddle_exit:
            self._drop_straddle_exit()
        retired, err = self._engine_run(1)
        if self.task_switcher.stepping_from is not None:
            self._after_task_switch_step(err is None)
        try:
            if err is not None:
                self._handle_engine_error(err)
        except _Fault as f:
            self.deliver_exception(f.vector, f.error_code, f.cr2)
        if self._rearm_after_step:
            self._rearm_after_step = False
            self.rearm_all()
        if self._watch_queue:
            self._apply_watch_queue()
        self.iret_unblocked_nmi = False
        return retired

    def _handle_engine_error(self, err: UcError) -> None:
        no = err.errno
        if self._watch_hit is not None and no in (UC_ERR_READ_PROT, UC_ERR_WRITE_PROT,
                                                  UC_ERR_FETCH_PROT):
            hit, self._watch_hit = self._watch_hit, None
            if self._watch_stepping:
                self._watch_denied = hit        # step_watched reports it to its caller
            else:
                self._call_watcher(hit)
            return
        vt = self.vtlb
        if vt is not None and vt.active and no == UC_ERR_EXCEPTION:
            self._tlb_refusal()
            return
        # FETCH_PROT and WRITE_PROT report physical addresses (measured, with
        # Unicorn's walker and in virtual-TLB mode): the fetch's linear address is
        # RIP's page or the next one (an instruction straddling into it)
        if no == UC_ERR_FETCH_PROT and self.fetch_fault is not None:
            linear = self._fetch_linear(self.fetch_fault)
            if linear is None:
                raise GuestError(f"core {self.index}: fetch from physical {self.fetch_fault:#x} "
                                 f"near RIP {self.rip():#x} maps to no linear address")
            self.fetch_fault = linear
        if no == UC_ERR_FETCH_PROT and self.fetch_fault is not None:
            if self.fetch_fault == self._last_fetch_fault and self.icount == self._last_fetch_icount:
                raise GuestError(f"core {self.index}: instruction fetch at {self.fetch_fault:#x} "
                                 "faults again after its page was made executable")
            self._last_fetch_fault, self._last_fetch_icount = self.fetch_fault, self.icount
            self._scan_and_arm(self.fetch_fault)
        elif no == UC_ERR_WRITE_PROT and self.write_fault is not None:
            # a store into a page another core executes, or this one did before it
            # was disarmed: forget its scans everywhere; the store runs again
            self.machine.invalidate_code_page(self.write_fault & ~0xFFF)
        elif no == UC_ERR_INSN_INVALID:
            raise _Fault(6)
        elif no == UC_ERR_FETCH_UNMAPPED and vt is not None and vt.active and \
                vt.drop_placeholder(self.rip()):
            return          # a placeholder TLB entry (see VirtualTlb._placeholder): walk again
        elif no in (UC_ERR_READ_UNMAPPED, UC_ERR_WRITE_UNMAPPED, UC_ERR_FETCH_UNMAPPED):
            raise GuestError(f"core {self.index}: access to a physical address outside RAM "
                             f"near RIP {self.rip():#x} ({err})")
        else:
            raise GuestError(f"core {self.index}: engine error at RIP {self.rip():#x}: {err}")

    def _fetch_linear(self, pa: int) -> int | None:
        """The linear address of a fetch from physical ``pa``: in RIP's page or
        the next one, whichever translates to ``pa``'s page (None: neither)."""
        rip = self.rip()
        for lpage in (rip & ~0xFFF, (rip & ~0xFFF) + PAGE_SIZE):
            try:
                if self.translate(lpage, fetch=True, peek=True) & ~0xFFF == pa & ~0xFFF:
                    return lpage | (pa & 0xFFF)
            except (PageFault, UnsupportedPaging, Stage2Fault, NonCanonical):
                continue
        return None

    def _set_exits(self, extra: int | None = None) -> None:
        """Give Unicorn its exits: the exit sites, the straddle exit, and ``extra``
        (exits are turned on the first time there is one; once on, the run's
        ``until`` address is ignored, so an empty list gets IMPOSSIBLE_PC)."""
        exits = set(self._exit_sites)
        if self.breakpoints:
            exits |= self.breakpoints
            exits.discard(self._bp_suspended)
        if self._straddle_exit is not None:
            exits.add(self._straddle_exit)
        if extra is not None:
            exits.add(extra)
        if exits and not self._exits_enabled:
            self.uc.ctl_exits_enabled(True)
            self._exits_enabled = True
        if self._exits_enabled:
            self.uc.ctl_set_exits(sorted(exits) or [IMPOSSIBLE_PC])

    def after_mode_change(self) -> None:
        """CR0/CR3/CR4/EFER were written (by a VMX entry or a shadowed MOV to CR):
        scans are re-armed outside the engine (changing page permissions from
        inside a hook is not safe)."""
        if self._in_run:
            self._pending_rearm = True
            self.request_stop("check")
        else:
            self.rearm_all()

    def run_native(self, event: Event) -> None:
        """Execute an instruction event with the platform's own semantics (what an L0
        does to emulate it on the hardware).  Instructions Unicorn executes itself are
        left to it: RIP stays at the instruction.  A TASK_SWITCH event is performed
        (see TaskSwitcher.emulate)."""
        if event.kind is _KIND_TASK_SWITCH:
            self.task_switcher.emulate(event)
            return
        self._handlers[event.kind](event.rip, event.insn)

    def request_stop(self, reason: str) -> None:
        """From a hook: stop the engine after the current instruction is dealt with.
        Between engine runs the reason still ends the current :meth:`run`."""
        self._stop_reason = reason
        self.uc.emu_stop()

    def take_stop_request(self) -> str | None:
        """The reason of a :meth:`request_stop` made outside a run (by a layer
        above acting between runs), cleared; None if there was none."""
        reason, self._stop_reason = self._stop_reason, None
        return reason

    @property
    def in_run(self) -> bool:
        """Is the engine running (the caller is a hook or a callback inside it)?"""
        return self._in_run

    def cancel_retirement(self) -> None:
        """The instruction whose hook is running does not retire (a layer above
        took a VM exit for it and will not complete it): it is not counted."""
        if self._in_run:
            self._uncount += 1

    def resume_in_engine(self, address: int) -> None:
        """A hook stopped the run in front of the instruction at ``address`` and
        the layer above has since let it through (an L0 handling, after a
        debugger's stop, an exit whose instruction the engine executes): the
        next run executes it without calling its hook again, as it would have
        done had the hook returned at once."""
        self._skip_once = address

    def settle_pending_exit(self, event: Optional[Event], guest_running: bool) -> None:
        """A stop at a VM exit left ``event``'s instruction pending (its retirement
        cancelled) and the layer above has since handed the exit to its hypervisor:
        an instruction the hypervisor left to the engine (RIP unchanged, the guest
        running again) runs without calling its hook again; one it emulated or
        skipped (RIP moved) retires now.  Exceptions and events without an
        instruction, and calls from inside a run, need nothing."""
        if event is None or event.insn is None or event.kind is Kind.EXCEPTION or self._in_run:
            return
        rip = self.rip()
        if guest_running and rip == event.rip:
            self.resume_in_engine(event.rip)
        elif rip != event.rip:
            self.retire_completed()

    def retire_completed(self) -> None:
        """The instruction a stop left pending (its retirement cancelled) was
        completed by the layer above since: it retires now."""
        self.icount += 1
        self.clock += 1

    def set_cr2(self, value: int) -> None:
        """CR2 as the architecture has it (a hypervisor re-injecting a #PF)."""
        self.uc.reg_write(X.UC_X86_REG_CR2, value)
        self.cr2 = value

    # ------------------------------------------------------------------ stepping API
    def add_breakpoint(self, linear: int) -> None:
        """Stop before the instruction at ``linear`` (an Unicorn exit: checked when
        code is translated, so it costs nothing per instruction and survives the
        page scanner's disarm and re-arm and retranslation after a store)."""
        self.breakpoints.add(linear)
        self._set_exits()
        self._drop_translations_at(linear)

    def remove_breakpoint(self, linear: int) -> None:
        self.breakpoints.discard(linear)
        if self._at_breakpoint == linear:
            self._at_breakpoint = None
        self._set_exits()
        self._drop_translations_at(linear)

    def _drop_translations_at(self, linear: int) -> None:
        page = linear & ~0xFFF
        self.uc.ctl_remove_cache(page, page + PAGE_SIZE)

    def _run_over_breakpoint(self, at: int) -> str | None:
        """Execute the instruction at breakpoint ``at`` (the run stopped in front
        of it): its exit is lifted for one instruction."""
        self._bp_suspended = at
        self._set_exits()
        self._drop_translations_at(at)
        try:
            return self.run(1)
        finally:
            self._bp_suspended = None
            self._set_exits()
            self._drop_translations_at(at)

    def add_watch(self, ident: int, linear: int, size: int, access: str) -> None:
        """Report accesses by guest instructions to ``[linear, linear + size)``
        (``access`` "r", "w" or "rw") in :attr:`watch_hit`; the run stops after
        the accessing instruction retired.  While any watch is set every
        instruction calls a hook (the run slows down about tenfold)."""
        kinds = {"r": UC_HOOK_MEM_READ, "w": UC_HOOK_MEM_WRITE,
                 "rw": UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE}[access]
        end = linear + size - 1

        def hit(uc, kind, address, size, value, data):
            if self.watch_hit is None:
                self.watch_hit = (ident, address, "write" if kind == UC_MEM_WRITE else "read")

        self._watch_hooks[ident] = [self.uc.hook_add(kinds, hit, begin=linear, end=end)]
        if self._watch_code_hook is None:
            self._watch_code_hook = self.uc.hook_add(UC_HOOK_CODE, self._on_watch_code)
        self.uc.ctl_flush_tb()     # hooks apply to code translated after them

    def remove_watch(self, ident: int) -> None:
        for h in self._watch_hooks.pop(ident, ()):
            self.uc.hook_del(h)
        if not self._watch_hooks and self._watch_code_hook is not None:
            self.uc.hook_del(self._watch_code_hook)
            self._watch_code_hook = None
        self.uc.ctl_flush_tb()     # hooks apply to code translated after them

    def _on_watch_code(self, uc, address, size, data):
        if self.watch_hit is not None:
            self._stop_after_watch_hit()

    def _stop_after_watch_hit(self) -> None:
        # before the instruction after the access: it does not execute now
        if self._stop_reason != "watch":
            self._uncount += 1
            self.request_stop("watch")

    # ------------------------------------------------------------------ hooks
    def _add_site_hook(self, addr: int, insn: Optional[Insn], by_mode: dict) -> int:
        """A UC_HOOK_CODE hook on exactly ``addr`` for a sensitive instruction
        (``insn``, or per code size ``by_mode`` on pages scanned in several modes).
        Registered through uc_hook_add with one ctypes callback per engine: the
        binding's hook_add wraps every callback in two Python layers and a new
        ctypes thunk, about 1.5 us on each hit."""
        h = uc_hook_h()
        status = uclib.uc_hook_add(self.uc._uch, ctypes.byref(h), UC_HOOK_CODE, self._site_cb,
                                   None, ctypes.c_uint64(addr), ctypes.c_uint64(addr))
        if status:
            raise UcError(status)
        self._site_of[addr] = (insn, by_mode)
        return h.value

    def _del_site_hook(self, h: int, addr: int) -> None:
        status = uclib.uc_hook_del(self.uc._uch, uc_hook_h(h))
        if status:
            raise UcError(status)
        self._site_of.pop(addr, None)

    def _on_site_raw(self, handle, address):
        # called by Unicorn (ctypes): nothing may escape from here
        try:
            if address == self._skip_once:
                self._skip_once = -1
                return
            if self.watch_hit is not None:
                self._stop_after_watch_hit()
                return
            if self._budget and self.probe.executed() > self._budget:
                return          # the count ran out here: this instruction runs next time
            insn, by_mode = self._site_of[address]
            if insn is None:
                insn = by_mode.get(self.code_size())
                if insn is None:
                    return
            self._dispatch(address, insn)
        except BaseException as e:       # a bug of ours: end the run with verdict error
            self.machine.internal_error(self, e)
            self.request_stop("exit")

    def _dispatch(self, address: int, insn: Insn) -> None:
        """A sensitive instruction is about to execute (from its hook or an exit)."""
        kind = insn.kind
        if kind in TASK_SWITCH_INSNS and self._far_transfer(address, insn):
            return          # an ordinary far JMP/CALL (Unicorn's), or a task-switch attempt
        self.count_event(kind)
        timed = not self._counted           # fast mode estimates time from the hooks' share
        if timed:
            t0 = time.perf_counter_ns()
        try:
            if self.trace is not None or self.virt is not None:
                event = Event(kind, self.index, address, insn, regs=self.lazy_regs())
                if insn.mem is not None:
                    event.linear = self.mem_operand_linear(insn, address)
                if kind in IO_KINDS:
                    event.port = insn.port if insn.port is not None else \
                        self.probe.gpr(2) & 0xFFFF
                    event.extra["io_permitted"] = False   # no TSS I/O bitmap is modelled
                elif kind is Kind.MWAIT:
                    event.extra["monitor_armed"] = not monitor.triggered(self)
                if self.trace is not None:
                    self.trace(self, event)
                if self.virt is not None and self.virt.on_event(self, event):
                    return
            self._handlers[kind](address, insn)
        except Exception as e:
            self._hook_failed(e)
        finally:
            if timed:
                self._hook_ns += time.perf_counter_ns() - t0

    def _far_transfer(self, address: int, insn: Insn) -> bool:
        """A far JMP/CALL or IRET: the task switcher's (True), or an IRET's usual path (False)."""
        t0 = time.perf_counter_ns()
        try:
            return self.task_switcher.far_transfer(address, insn)
        except Exception as e:
            self._hook_failed(e)
            return True
        finally:
            self._hook_ns += time.perf_counter_ns() - t0

    def count_event(self, kind: Kind) -> None:
        """A sensitive event is dispatched in this run: counted, and the run is not calm."""
        self.count(kind)
        self._run_events += 1

    def _hook_failed(self, e: Exception) -> None:
        """What ends a hooked instruction early: an exception to deliver, a VM exit
        taken inside it, a guest error or a bug of ours (verdict error).  The
        instruction does not retire here."""
        self._uncount += 1
        if isinstance(e, _Fault):
            self.deliver_exception(e.vector, e.error_code, e.cr2)
        elif isinstance(e, tasks.TaskFault):
            self.deliver_exception(e.vector, e.error_code)
        elif isinstance(e, AccessAborted):
            # a second-stage fault during the instruction was a VM exit, taken: the
            # instruction did not retire and runs again from its start (hooked) after it
            if self._in_run:
                self.request_stop("check")
        elif isinstance(e, GuestError):
            self.machine.guest_error(str(e))
            self.request_stop("exit")
        else:
            self.machine.internal_error(self, e)
            self.request_stop("exit")

    def mem_operand_linear(self, insn: Insn, address: int) -> int:
        regs = self.lazy_regs()
        return resolve_linear(insn.mem, regs, address + insn.length, self.segment_base)

    def segment_base(self, seg: int) -> int:
        if seg >= 4 or not self.probe.hflags() & HF_CS64:
            return self.probe.segment(seg)[1]
        return 0          # 64-bit mode: ES, CS, SS, DS bases are 0

    def _skip(self, address: int, insn: Insn) -> None:
        """The core emulated the instruction: continue after it."""
        self.set_rip(address + insn.length)

    def rearm_after_step(self) -> None:
        """Re-arm every page's scan after the instruction being stepped (it may change CR3)."""
        self._rearm_after_step = True

    def step_then_check(self, address: int) -> None:
        """Stop before this instruction; the run loop executes it alone, then checks interrupts."""
        self._skip_once = address
        self._uncount += 1
        self.request_stop("step")

    def _on_intr(self, uc, intno, data):
        # An exception raised by Unicorn (INT n and friends are hooked before they run).
        self.probe.clear_fault_tracking()
        self._uncount += 1
        ec = self.probe.error_code() if intno in ERROR_CODE_VECTORS else None
        cr2 = None
        if intno == 14:
            # QEMU has written CR2 already; architecturally only the #PF's delivery
            # does (a #PF that causes a VM exit leaves CR2 alone)
            cr2 = self.probe.reg(X.UC_X86_REG_CR2)
            uc.reg_write(X.UC_X86_REG_CR2, self.cr2)
        try:
            self.deliver_exception(intno, ec, cr2)
        except GuestError as e:
            self.machine.guest_error(str(e))
            self.request_stop("exit")
        except Exception as e:
            self.machine.internal_error(self, e)
            self.request_stop("exit")

    # ------------------------------------------------------------------ LAPIC MMIO
    def _mmio_read(self, uc, offset, size, data):
        self.count(Kind.APIC_ACCESS)
        try:
            return self.lapic.mmio_read(offset, size)
        except GeneralProtection:
            return 0

    def _mmio_write(self, uc, offset, size, value, data):
        if self._in_run and self._budget != 1:
            # A write can make an interrupt deliverable (EOI, TPR, a self-IPI): the core
            # stops after the instruction.  Measured: emu_stop from this callback aborts
            # the instruction after the callback (RIP stays at it, its other effects are
            # undone) and a restarted run would repeat it forever; so the write is left
            # undone here and the run loop executes the instruction alone (budget 1).
            self._uncount += 1
            self.request_stop("step")
            return
        self.count(Kind.APIC_ACCESS)
        try:
            self.lapic.mmio_write(offset, size, value)
        except GeneralProtection:
            pass

    def count(self, kind: Kind) -> None:
        """Count one event of ``kind`` (the run's ``events`` summary)."""
        name = _KIND_NAMES[kind]
        self.events[name] = self.events.get(name, 0) + 1

    # ------------------------------------------------------------------ instruction semantics
    def _make_handlers(self):
        h = {}
        for k in Kind:
            if k in _NATIVE_UD:
                h[k] = self._h_ud
            elif k in _NATIVE_PASS:
                h[k] = self._h_pass
        h.update({
            Kind.RDMSR: self._h_rdmsr, Kind.WRMSR: self._h_wrmsr, Kind.CPUID: self._h_cpuid,
            Kind.RDTSC: self._h_rdtsc, Kind.RDTSCP: self._h_rdtscp, Kind.RDPMC: self._h_rdpmc,
            Kind.HLT: self._h_hlt, Kind.IN: self._h_io, Kind.OUT: self._h_io,
            Kind.INS: self._h_string_io, Kind.OUTS: self._h_string_io,
            Kind.MOV_TO_CR: self._h_mov_to_cr, Kind.MOV_FROM_CR: self._h_mov_from_cr,
            Kind.INVLPG: self._h_invlpg, Kind.STI: self._h_sti, Kind.POPF: self._h_step,
            Kind.IRET: self._h_iret, Kind.MOV_SS: self._h_mov_ss, Kind.POP_SS: self._h_mov_ss,
            Kind.INT: self._h_int, Kind.INT3: self._h_int, Kind.INT1: self._h_int,
            Kind.INTO: self._h_into,
            Kind.PAUSE: self._h_pause,
            Kind.MARKER_BEGIN: self._h_marker_begin, Kind.MARKER_END: self._h_marker_end,
        })
        if self.cpu.has("monitor"):
            h.update({Kind.MONITOR: self._h_monitor, Kind.MWAIT: self._h_mwait})
        if self.cpu.has("invpcid"):
            h[Kind.INVPCID] = self._h_invpcid
        return h

    def _h_pass(self, address, insn):
        pass

    def _h_ud(self, address, insn):
        raise _Fault(6)

    def _require_cpl0(self):
        if self.cpl() != 0:
            raise _Fault(13, 0)

    def _h_step(self, address, insn):
        self.step_then_check(address)

    def _h_rdmsr(self, address, insn):
        self._require_cpl0()
        probe = self.probe
        value = self.rdmsr(probe.gpr(1) & 0xFFFFFFFF)
        if value is None:
            return          # Unicorn holds it: let the instruction run
        probe.set_gpr(0, value & 0xFFFFFFFF)         # (EAX and EDX zero-extend into RAX, RDX)
        probe.set_gpr(2, value >> 32)
        self._skip(address, insn)

    def rdmsr(self, index: int) -> int | None:
        """The value of an MSR, None when Unicorn's own copy is authoritative; #GP if absent."""
        try:
            info = check_read(index, self.cpu)
            owner = info.owner
            if owner == "vmx":
                raise _Fault(13, 0)   # CPUID.1:ECX.VMX is 0 natively: the VMX MSRs #GP
            if owner == "lapic":
                return self.lapic.rdmsr(index)
            if owner == "tsc":
                return self.tsc()
            if owner == "store":
                return self.msr_store.get(index, reset_value(info, self.cpu))
        except GeneralProtection:
            raise _Fault(13, 0) from None
        return None

    def _h_wrmsr(self, address, insn):
        self._require_cpl0()
        probe = self.probe
        index = probe.gpr(1) & 0xFFFFFFFF
        value = (probe.gpr(2) & 0xFFFFFFFF) << 32 | (probe.gpr(0) & 0xFFFFFFFF)
        if self.wrmsr(index, value):
            self._skip(address, insn)
        elif index == MSR_EFER:
            self._h_step(address, insn)   # paging mode may change: re-arm after it

    def wrmsr(self, index: int, value: int) -> bool:
        """Write an MSR; False when Unicorn must execute the WRMSR itself; #GP as hardware."""
        try:
            info = check_write(index, value, model=self.cpu)
            owner = info.owner
            if owner == "vmx":
                raise _Fault(13, 0)
            if owner == "lapic":
                self.lapic.wrmsr(index, value)
                if self._in_run:
                    self.request_stop("check")
                return True
            if owner == "tsc":
                self.tsc_offset = (value - self.now()) & 0xFFFF_FFFF_FFFF_FFFF
                return True
            if owner == "store":
                self.msr_store[index] = value
                return True
        except GeneralProtection:
            raise _Fault(13, 0) from None
        return False

    def _h_cpuid(self, address, insn):
        p = self.probe
        a, b, c, d = self.cpu.cpuid_for(p.gpr(0) & 0xFFFFFFFF, p.gpr(1) & 0xFFFFFFFF,
                                        self.apic_id, len(self.machine.cores))
        for n, v in ((0, a), (3, b), (1, c), (2, d)):
            p.set_gpr(n, v)
        self._skip(address, insn)

    def _h_rdtsc(self, address, insn):
        if self.probe.reg(X.UC_X86_REG_CR4) & (1 << 2) and self.cpl() != 0:
            raise _Fault(13, 0)
        t = self.tsc()
        self.uc.reg_write(X.UC_X86_REG_RAX, t & 0xFFFFFFFF)
        self.uc.reg_write(X.UC_X86_REG_RDX, t >> 32)
        self._skip(address, insn)

    def _h_rdtscp(self, address, insn):
        self._h_rdtsc(address, insn)
        self.uc.reg_write(X.UC_X86_REG_RCX, self.rdmsr_raw(0xC0000103) & 0xFFFFFFFF)

    def _h_rdpmc(self, address, insn):
        raise _Fault(13, 0)    # no performance counters are modelled (CPUID leaf 0xA is 0)

    def _h_hlt(self, address, insn):
        self._require_cpl0()
        self._skip(address, insn)
        monitor.end_wait(self)
        self.state = State.HALTED
        self.request_stop("halt")

    def _h_monitor(self, address, insn):
        """MONITOR (see platform/monitor.py): #UD outside CPL 0, #GP(0) for ECX != 0."""
        if self.cpl() != 0:
            raise _Fault(6)
        if self.probe.gpr(1) & 0xFFFFFFFF:
            raise _Fault(13, 0)
        linear = self.mem_operand_linear(insn, address)
        if self.probe.hflags() & HF_CS64 and not is_canonical(linear):
            raise _Fault(13, 0)
        try:
            monitor.do_monitor(self, linear)
        except PageFault as pf:
            raise _Fault(14, pf.error_code, pf.linear) from None
        self._skip(address, insn)

    def _h_mwait(self, address, insn):
        """MWAIT (see platform/monitor.py): #UD outside CPL 0, #GP(0) for ECX[31:1] != 0."""
        if self.cpl() != 0:
            raise _Fault(6)
        ecx = self.probe.gpr(1) & 0xFFFFFFFF
        if ecx & ~monitor.MWAIT_ECX_INTERRUPT_BREAK:
            raise _Fault(13, 0)
        self._skip(address, insn)
        if monitor.do_mwait(self, ecx):
            self.state = State.HALTED
            self.request_stop("halt")

    def _h_io(self, address, insn):
        self._require_iopl()
        probe = self.probe
        port = insn.port if insn.port is not None else probe.gpr(2) & 0xFFFF
        size = insn.io_size
        mask = (1 << (8 * size)) - 1
        if insn.kind is _KIND_IN:
            v = self.machine.io_read(self, port, size) & mask
            # IN EAX zero-extends into RAX (as every 32-bit destination); AX and AL merge
            probe.set_gpr(0, v if size == 4 else (probe.gpr(0) & ~mask) | v)
        else:
            self.machine.io_write(self, port, size, probe.gpr(0) & mask)
        self._skip(address, insn)

    def _h_string_io(self, address, insn):
        self._require_iopl()
        uc = self.uc
        port = self.probe.reg(X.UC_X86_REG_DX)
        size = insn.io_size
        amask = (1 << (8 * insn.addr_size)) - 1
        creg = {8: X.UC_X86_REG_RCX, 4: X.UC_X86_REG_ECX, 2: X.UC_X86_REG_CX}[insn.addr_size]
        count = self.probe.reg(creg) if insn.rep else 1
        step = -size if self.probe.reg(X.UC_X86_REG_EFLAGS) & X86_EFLAGS_DF else size
        is_in = insn.kind is Kind.INS
        ireg = {8: X.UC_X86_REG_RDI, 4: X.UC_X86_REG_EDI, 2: X.UC_X86_REG_DI}[insn.addr_size] if is_in else \
            {8: X.UC_X86_REG_RSI, 4: X.UC_X86_REG_ESI, 2: X.UC_X86_REG_SI}[insn.addr_size]
        ptr = self.probe.reg(ireg)
        seg = 0 if is_in else (insn.mem.seg if insn.mem is not None else 3)
        base = self.segment_base(seg)
        # an access that may end in a VM exit taken inside it (a second stage, a watched
        # page) finds the registers of the iterations done so far
        exits_inside = bool(self._watched) or (self.vtlb is not None and self.vtlb.active)
        try:
            while count:
                lin = (base + ptr) & 0xFFFF_FFFF_FFFF_FFFF
                if exits_inside and insn.rep:
                    uc.reg_write(ireg, ptr)
                    uc.reg_write(creg, count)
                if is_in:
                    v = self.machine.io_read(self, port, size)
                    self.write_linear(lin, v.to_bytes(size, "little"))
                else:
                    v = int.from_bytes(self.read_linear(lin, size), "little")
                    self.machine.io_write(self, port, size, v)
                ptr = (ptr + step) & amask
                count -= 1
        except PageFault as pf:
            uc.reg_write(ireg, ptr)
            if insn.rep:
                uc.reg_write(creg, count)
            raise _Fault(14, pf.error_code, pf.linear) from None
        uc.reg_write(ireg, ptr)
        if insn.rep:
            uc.reg_write(creg, 0)
        self._skip(address, insn)

    def _h_mov_to_cr(self, address, insn):
        self._require_cpl0()
        if insn.cr == 2:
            self.cr2 = self.probe.reg(GPR_IDS[insn.gpr])
        if insn.cr == 8:
            try:
                self.lapic.write_cr8(self.probe.reg(GPR_IDS[insn.gpr]))
            except GeneralProtection:
                raise _Fault(13, 0) from None
            self._skip(address, insn)
            self.request_stop("check")
            return
        probe = self.probe
        if insn.cr == 4:
            self.check_mov_to_cr4(probe.reg(GPR_IDS[insn.gpr]))
        if insn.cr == 3 and probe.cr(4) & pcid.CR4_PCIDE:
            # (platform/pcid.py: bit 63 is not loaded; Unicorn would load it)
            self.uc.reg_write(X.UC_X86_REG_CR3, pcid.cr3_value(probe.reg(GPR_IDS[insn.gpr]),
                                                              probe.cr(4)))
            self._skip(address, insn)
            pcid.flush_all(self)
            self.request_stop("check")
            return
        # CR0/CR3/CR4: Unicorn executes it; afterwards re-arm (paging or mode may change).
        # With PAE paging the PDPTE registers are loaded first (a reserved bit: #GP(0)).
        if insn.cr in (0, 3, 4):
            self.pae.load_for_mov_cr(insn.cr, self.probe.reg(GPR_IDS[insn.gpr]))
        self.step_then_check(address)
        self._rearm_after_step = True

    def check_mov_to_cr4(self, new: int) -> None:
        """MOV to CR4's checks of the CPU model's features: #GP(0) for CR4.PCIDE
        set against the rules of platform/pcid.py."""
        probe = self.probe
        if pcid.cr4_write_problem(self.cpu.has("pcid"), probe.cr(4), new, probe.cr(3),
                                  self.rdmsr_raw(MSR_EFER)):
            raise _Fault(13, 0)

    def _h_invpcid(self, address, insn):
        """INVPCID (see platform/pcid.py): #GP(0) at CPL > 0 or for a bad type or descriptor."""
        if self.cpl() != 0:
            raise _Fault(13, 0)
        kind = self.probe.reg(GPR_IDS[insn.gpr])
        if not self.probe.hflags() & HF_CS64:
            kind &= 0xFFFFFFFF
        try:
            desc = self.read_linear(self.mem_operand_linear(insn, address), 16)
        except PageFault as pf:
            raise _Fault(14, pf.error_code, pf.linear) from None
        if pcid.invpcid_problem(kind, desc, self.probe.cr(4), is_canonical):
            raise _Fault(13, 0)
        self._skip(address, insn)
        pcid.flush_all(self)
        self.request_stop("check")

    def _h_mov_from_cr(self, address, insn):
        self._require_cpl0()
        if insn.cr == 8:
            self.uc.reg_write(GPR_IDS[insn.gpr], self.lapic.read_cr8())
            self._skip(address, insn)

    def _h_invlpg(self, address, insn):
        self._require_cpl0()
        self.step_then_check(address)
        self._rearm_after_step = True

    def _h_sti(self, address, insn):
        self._require_iopl()
        uc = self.uc
        fl = self.probe.reg(X.UC_X86_REG_EFLAGS)
        self._skip(address, insn)
        if not fl & X86_EFLAGS_IF:
            uc.reg_write(X.UC_X86_REG_EFLAGS, fl | X86_EFLAGS_IF)
            self.shadow_at = self.retired_now() + 1
            if self.interrupt_wanted():
                self.request_stop("check")

    def _require_iopl(self):
        """STI and I/O at CPL > IOPL: #GP(0) (no TSS I/O permission bitmap is modelled)."""
        probe = self.probe
        cpl = probe.cpl()
        if cpl and cpl > ((probe.system_flags() >> 12) & 3):
            raise _Fault(13, 0)

    def _h_mov_ss(self, address, insn):
        self.shadow_at = self.retired_now() + 1

    def _h_iret(self, address, insn):
        # Unicorn executes IRET itself (measured on 2.1.4, tests/test_legacy_delivery.py:
        # real mode, 32-bit protected mode to the same and to an outer privilege level,
        # into virtual-8086 mode); the core only unblocks NMIs and checks interrupts after it
        self.iret_unblocked_nmi = self.nmi_blocked     # for an EPT exit during the IRET
        self.nmi_blocked = False
        self.step_then_check(address)

    def _h_int(self, address, insn):
        # INT n / INT3 / INTO / INT1 retire once their handler is entered (a fault in
        # delivery is raised as _Fault and then the INT does not retire).
        kind = insn.kind
        if kind is Kind.INT:
            self.legacy.check_v86_int()         # IOPL-sensitive in virtual-8086 mode: #GP(0)
        etype = _SOFT_EVENT_TYPE.get(kind, EventType.PRIVILEGED_SOFTWARE_EXCEPTION)
        self.delivering = Delivery(insn.vector, etype, None, insn)
        try:
            self.deliver_event(insn.vector, None, address + insn.length, soft=kind is not Kind.INT1)
        except _Fault as f:
            # delivered while the INT is still being delivered, so that a VM exit on it
            # records the INT as IDT-vectoring information (SDM "Information for VM
            # Exits During Event Delivery")
            self._uncount += 1
            self.deliver_exception(f.vector, f.error_code, f.cr2)
        finally:
            self.delivering = None

    def _h_into(self, address, insn):
        """INTO (outside 64-bit mode, where it is not decoded as INTO): #OF, delivered
        as INT3 is (a software exception), if RFLAGS.OF = 1; else nothing."""
        if self.probe.reg(X.UC_X86_REG_EFLAGS) & X86_EFLAGS_OF:
            self._h_int(address, insn)
        else:
            self._skip(address, insn)

    def _h_pause(self, address, insn):
        """PAUSE takes PAUSE_NS of virtual time (the spin-wait hint's latency on
        recent Intel cores); a spinning core yields once it reaches the end of
        its slice, so that the core it waits for gets to run."""
        self._skip(address, insn)
        self._extra_ns += PAUSE_NS
        if self.now() >= self._time_limit:
            self.request_stop("yield")

    def _h_marker_begin(self, address, insn):
        self.markers.append([self.retired_now(), None])

    def _h_marker_end(self, address, insn):
        if self.markers and self.markers[-1][1] is None:
            self.markers[-1][1] = self.retired_now()

    # ------------------------------------------------------------------ event delivery
    def deliver_exception(self, vector: int, error_code: int | None = None, cr2: int | None = None) -> None:
        """Deliver a fault at the current RIP, applying the #DF and triple-fault rules
        (a VMX layer first decides, by the exception bitmap, whether it exits).

        While an event is being delivered, :attr:`delivering` describes it, so that a
        VM exit caused by a fault during its delivery reports it (VMX: as IDT-vectoring
        information, SDM "Information for VM Exits During Event Delivery")."""
        outer = self.delivering
        real_mode = not self.probe.cr(0) & 1        # where exceptions push no error code
        try:
            while True:
                if real_mode:
                    error_code = None
                if self.virt is not None and self.virt.on_exception(self, vector, error_code, cr2):
                    return
                try:
                    if cr2 is not None:
                        self.uc.reg_write(X.UC_X86_REG_CR2, cr2)
                        self.cr2 = cr2
                    self.delivering = Delivery(vector, EventType.HARDWARE_EXCEPTION, error_code)
                    self.deliver_event(vector, error_code, self.rip(), exception=True)
                    return
                except AccessAborted:
                    return          # the delivery ended in a VM exit (taken)
                except _Fault as f:
                    if vector == 8:
                        self.triple_fault()
                        return
                    if (vector in _CONTRIBUTORY and f.vector in _CONTRIBUTORY) or \
                            (vector == 14 and (f.vector in _CONTRIBUTORY or f.vector == 14)):
                        vector, error_code, cr2 = 8, 0, None
                    else:
                        vector, error_code, cr2 = f.vector, f.error_code, f.cr2
        finally:
            self.delivering = outer

    def inject_event(self, vector: int, etype: EventType, error_code: int | None,
                     return_rip: int) -> None:
        """Deliver an event a layer above injects (VM entry's event injection):
        through the IDT now, as :attr:`delivering` while it is delivered (so that a
        VM exit during it reports it), with the #DF and triple-fault rules for a
        fault on the way.  ``return_rip`` is the linear address the frame returns to
        (past the instruction, for a software event).  Wakes a halted core."""
        if self.state is State.HALTED:
            self.state = State.RUNNING
        outer = self.delivering
        self.delivering = Delivery(vector, etype, error_code)
        try:
            self.deliver_event(vector, error_code, return_rip,
                               exception=etype is EventType.HARDWARE_EXCEPTION,
                               soft=etype in (EventType.SOFTWARE_INTERRUPT,
                                              EventType.SOFTWARE_EXCEPTION))
        except _Fault as f:
            self.deliver_exception(f.vector, f.error_code, f.cr2)
        except AccessAborted:
            pass            # the delivery ended in a VM exit, taken
        finally:
            self.delivering = outer

    def triple_fault(self) -> None:
        self.count(Kind.TRIPLE_FAULT)
        if self.virt is not None and self.virt.on_event(
                self, Event(Kind.TRIPLE_FAULT, self.index, self.rip(), regs=self.lazy_regs())):
            return
        self.state = State.SHUTDOWN
        self.machine.shutdown(self, "triple fault")
        if self._in_run:
            self.request_stop("shutdown")

    def deliver_event(self, vector: int, error_code: int | None, return_rip: int, *,
                      exception: bool = False, soft: bool = False) -> None:
        """Push an interrupt frame and enter the handler of ``vector``: through a
        64-bit gate in IA-32e mode (here), else in real-address, protected or
        virtual-8086 mode (:mod:`devirt_emu.platform.delivery`).  ``return_rip``
        is the linear address the frame returns to; ``soft``: INT n, INT3 or INTO.

        Raises _Fault for an exception during delivery (the caller applies #DF rules).
        """
        if not self.rdmsr_raw(MSR_EFER) & (1 << 10):
            if self.legacy.deliver(vector, error_code, return_rip, soft=soft):
                self._delivered(vector, error_code, return_rip, exception, soft)
            return
        uc = self.uc
        ext = 0 if soft else 1   # EXT: the event is not a software interrupt
        _, idt_base, idt_limit, _ = uc.reg_read(X.UC_X86_REG_IDTR)
        if vector * 16 + 15 > idt_limit:
            raise _Fault(13, vector * 8 + 2 + ext)
        try:
            lo, hi = struct.unpack("<QQ", self.read_linear(idt_base + vector * 16, 16))
        except PageFault as pf:
            raise _Fault(14, pf.error_code, pf.linear) from None
        gtype = (lo >> 40) & 0xF
        dpl = (lo >> 45) & 3
        cpl = self.cpl()
        if gtype not in (0xE, 0xF):
            raise _Fault(13, vector * 8 + 2 + ext)
        if soft and dpl < cpl:
            raise _Fault(13, vector * 8 + 2)
        if not (lo >> 47) & 1:
            raise _Fault(11, vector * 8 + 2 + ext)
        selector = (lo >> 16) & 0xFFFF
        target = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000) | ((hi & 0xFFFFFFFF) << 32)
        ist = (lo >> 32) & 7
        desc = self._descriptor(selector)
        if desc is None or not (desc >> 47) & 1 or not (desc >> 53) & 1:
            raise _Fault(13, (selector & ~3) + ext)
        new_cpl = (desc >> 45) & 3
        old_ss = self.probe.reg(X.UC_X86_REG_SS)
        old_rsp = self.probe.reg(X.UC_X86_REG_RSP)
        old_cs = self.probe.reg(X.UC_X86_REG_CS)
        rflags = self.probe.reg(X.UC_X86_REG_EFLAGS)
        if ist or new_cpl < cpl:
            _, tss_base, _, _ = uc.reg_read(X.UC_X86_REG_TR)
            off = 0x24 + 8 * (ist - 1) if ist else 4 + 8 * new_cpl
            try:
                rsp = struct.unpack("<Q", self.read_linear(tss_base + off, 8))[0]
            except PageFault as pf:
                raise _Fault(14, pf.error_code, pf.linear) from None
        else:
            rsp = old_rsp
        rsp &= ~0xF
        frame = [old_ss, old_rsp, rflags, old_cs, return_rip]
        if error_code is not None:
            frame.append(error_code)
        rsp -= 8 * len(frame)
        try:
            if self._watched:
                # push by push, in the processor's order: the first push to reach a
                # watched page is the access its watcher sees
                for i, value in enumerate(frame):
                    self.write_linear(rsp + 8 * (len(frame) - 1 - i), value.to_bytes(8, "little"))
            else:
                self.write_linear(rsp, struct.pack(f"<{len(frame)}Q", *reversed(frame)))
        except PageFault as pf:
            raise _Fault(14, pf.error_code, pf.linear) from None
        new_flags = rflags & ~(X86_EFLAGS_TF | X86_EFLAGS_NT | X86_EFLAGS_RF | X86_EFLAGS_VM)
        if gtype == 0xE:
            new_flags &= ~X86_EFLAGS_IF
        if new_cpl < cpl:
            self.load_segment(2, new_cpl)
        if selector != old_cs:
            self.load_segment(1, selector)
        uc.reg_write(X.UC_X86_REG_RSP, rsp)
        uc.reg_write(X.UC_X86_REG_EFLAGS, new_flags)
        uc.reg_write(X.UC_X86_REG_RIP, target)
        self._delivered(vector, error_code, return_rip, exception, soft)

    def _delivered(self, vector: int, error_code: int | None, return_rip: int, exception: bool,
                   soft: bool) -> None:
        """An event's handler has been entered: NMIs blocked after an NMI, the
        exception counted and traced."""
        if vector == 2 and not soft:
            self.nmi_blocked = True
        if vector in self.stop_vectors:
            self.vector_hit = vector
            if self._in_run:
                self.request_stop("vector")
        if exception:
            self.count(Kind.EXCEPTION)
            if self.trace is not None:
                self.trace(self, Event(Kind.EXCEPTION, self.index, return_rip, vector=vector,
                                       error_code=error_code))

    # ------------------------------------------------------------------ interrupts at boundaries
    def wake_check(self) -> bool:
        """Between runs: INIT/SIPI/NMI and LAPIC interrupts; wakes a halted core.
        True when the VMX layer acted at this boundary (a VM exit and the L0's
        VM entry): the caller checks the boundary again before running, since
        the entry may have made another boundary event due at once (a
        VMX-preemption timer loaded with 0, a TPR-below-threshold exit)."""
        lapic = self.lapic
        if self.icount == self.shadow_at and self.state is State.RUNNING and self.interrupt_wanted():
            # interrupt shadow (STI, MOV SS): the next instruction runs first
            for _ in range(3):          # a fetch fault or a hook's stop retires nothing
                self._stop_reason = None
                if self._step_one():
                    break
                if self._stop_reason in _USER_STOPS:
                    # the stepping API stops here (a VM exit it asked for, a watchpoint, a
                    # vector): the instruction stays pending, not tried again
                    self._stop_reason = None
                    return False
            self._stop_reason = None
            if self.state is not State.RUNNING or self.machine.verdict is not None:
                return False
        if self.virt is not None and self.virt.boundary(self):
            return True
        if lapic.take_init():
            self.count(Kind.INIT)
            self.do_init()
        vec = lapic.take_sipi()
        if vec is not None:
            self.count(Kind.SIPI)
            if self.state is State.WAIT_SIPI:
                self.do_sipi(vec)
        if self.state in (State.WAIT_SIPI, State.SHUTDOWN):
            return False
        if self.icount == self.shadow_at:
            return False
        if self.state is State.HALTED and self.monitor.waiting and monitor.wake_due(
                self, lapic.pending_vector() is not None,
                bool(self.probe.reg(X.UC_X86_REG_EFLAGS) & X86_EFLAGS_IF)):
            self._wake()                # a break event ends MWAIT's wait
        if not self.nmi_blocked and lapic.take_nmi():
            self.count(Kind.NMI)
            self._wake()
            self._deliver_external(2, nmi=True)
            return False
        if self.probe.reg(X.UC_X86_REG_EFLAGS) & X86_EFLAGS_IF:
            vec = lapic.pending_vector()
            if vec is not None:
                self.count(Kind.INTERRUPT)
                if self.virt is not None and self.virt.on_event(
                        self, Event(Kind.INTERRUPT, self.index, self.rip(), vector=vec)):
                    return True
                lapic.acknowledge()
                self._wake()
                self._deliver_external(vec)
        return False

    def interrupt_wanted(self) -> bool:
        """Is something waiting for an interrupt window (pending interrupt or NMI,
        or a VMX interrupt/NMI-window exit)?"""
        lapic = self.lapic
        if lapic.nmi_pending or lapic.pending_vector() is not None:
            return True
        return self.virt is not None and self.virt.wants_window()

    def _wake(self):
        if self.state is State.HALTED:
            self.state = State.RUNNING
            monitor.end_wait(self)

    def _deliver_external(self, vector: int, nmi: bool = False) -> None:
        self.delivering = Delivery(vector, EventType.NMI if nmi else EventType.EXTERNAL_INTERRUPT)
        try:
            self.deliver_event(vector, None, self.rip())
            if self.trace is not None:
                self.trace(self, Event(Kind.NMI if nmi else Kind.INTERRUPT, self.index, self.rip(),
                                       vector=vector))
        except _Fault as f:
            self.deliver_exception(f.vector, f.error_code, f.cr2)
        except AccessAborted:
            pass            # the delivery ended in a VM exit (taken)
        finally:
            self.delivering = None

    def next_event_ns(self) -> int | None:
        """The earliest timer expiry for this core: its LAPIC's, or a VMX layer's."""
        d = self.lapic.next_event_ns()
        if self.virt is not None:
            v = self.virt.next_event_ns()
            if v is not None and (d is None or v < d):
                d = v
        return d

    def has_wakeup(self) -> bool:
        """Is there an event that takes this (halted or waiting) core out of its state now?"""
        if self.virt is not None:
            w = self.virt.has_wakeup()
            if w is not None:
                return w
        lapic = self.lapic
        if self.state is State.WAIT_SIPI:
            return lapic.init_pending or lapic.sipi_pending is not None
        if self.state is State.HALTED:
            if lapic.init_pending or (lapic.nmi_pending and not self.nmi_blocked):
                return True
            if_set = bool(self.probe.reg(X.UC_X86_REG_EFLAGS) & X86_EFLAGS_IF)
            if self.monitor.waiting:
                return monitor.wake_due(self, lapic.pending_vector() is not None, if_set)
            return if_set and lapic.pending_vector() is not None
        return self.state is State.RUNNING

    def reset_model_state(self) -> None:
        """Forget the state the core keeps beside Unicorn's CPU context (scans, the
        interrupt shadow, NMI blocking, MSRs it stores, TSC offsets, markers, CR2):
        for a caller that restores a saved CPU context and starts afresh."""
        self.rearm_all()
        self.nmi_blocked = False
        self.monitor.clear()
        self.shadow_at = -1
        self.msr_store.clear()
        self.tsc_offset = self.tsc_adjust = 0
        self.markers.clear()
        self.cr2 = self.probe.reg(X.UC_X86_REG_CR2)
        self.delivering = None
        self._skip_once = -1
        self._last_fetch_fault, self._last_fetch_icount = None, -1
        self._pending_rearm = self._rearm_after_step = False
        self._extra_ns = 0
        self.free_running = False
        self._watch_queue.clear()
        for ppage in list(self._watched):
            self.unwatch_page(ppage)
        self.iret_unblocked_nmi = False
        if self.vtlb is not None:
            self.vtlb.disable()
        self._drop_straddle_exit()
        self.pae.reset()
        self.task_switcher.stepping_from = None

    def do_init(self) -> None:
        """INIT: back to the reset state, waiting for SIPI (the BSP included)."""
        self.rearm_all()
        self.uc.context_restore(self.reset_context)
        self.pae.reset()
        self.monitor.clear()
        self.nmi_blocked = False
        self.lapic.init_reset()
        self.state = State.WAIT_SIPI

    def do_sipi(self, vector: int) -> None:
        """Start-up IPI: real mode at vector:0000."""
        self.write_segment(1, vector << 8, vector << 12, 0xFFFF, 0x9B)
        self.uc.reg_write(X.UC_X86_REG_IP, 0)
        self.state = State.RUNNING
