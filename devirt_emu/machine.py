"""The machine: N cores, one RAM, local APICs, a UART and an exit port.

It runs natively or, with ``arch="vmx"``, with every core in VMX non-root
operation under the L0 (:mod:`devirt_emu.hypervisor`); it boots the firmware
and a guest program, schedules the cores on one deterministic clock, and is
the stepping API (:meth:`Machine.boot`, :meth:`Machine.step`,
:meth:`Machine.run_until`, breakpoints, watchpoints and stops on VM exits and
vectors; see :mod:`devirt_emu.stepping`).

Scheduling and time (deterministic mode, the default)
-----------------------------------------------------
Every core has a clock in virtual nanoseconds (one retired instruction is one
nanosecond; the TSC and the LAPIC timers count the same nanoseconds).  The
scheduler always runs the core whose clock is earliest (ties: lowest index),
for at most ``quantum`` instructions beyond the earliest other runnable core,
and never past that core's next timer expiry, so that timer interrupts arrive
at the exact instruction.  A halted core sleeps until its next timer expiry or
until another core's IPI reaches it (its clock then jumps to the sender's).
The same program and options therefore give the same run, event for event.

Fast mode (``fast=True``) runs a lone runnable core free, without Unicorn's
instruction counting (about 10x faster); its instruction count and clock are
then estimated from wall-clock time (one instruction per nanosecond).  While
two or more cores are runnable, fast mode schedules exactly as deterministic
mode does.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .cpumodels import get_model
from .cpu.scan import scan_page
from .platform.core import Core, GuestError, State
from .platform.debug_exit import DebugExit
from .platform.lapic import ApicBus, LocalApic
from .platform.memory import PAGE_SIZE, PhysMem
from .platform.uart import Uart16550
from .stepping import Stop, StopKind

#: Where the machine puts things for the firmware (see docs/guest-abi.md).
LOADER_GDT = 0x500
BOOT_INFO = 0x5000
MULTIBOOT_INFO = 0x6000
BOOT_INFO_MAGIC = 0x4D455644   # "DVEM"
MULTIBOOT_MAGIC = 0x2BADB002
UART_BASE = 0x3F8
DEBUG_EXIT_PORT = 0xF4
TSC_HZ = 1_000_000_000

#: Page scans kept by the page's contents (each key holds the page's 4 KiB).
SCANS_BY_CONTENT_KEPT = 256
#: Instructions a lone core runs per counted emu_start (the wall-clock limit is
#: checked between slices, and a slice without events sheds idle code pages'
#: hooks: see Core._keep_only_current_page).
LONE_CORE_SLICE = 200_000
#: Fast mode: wall-clock microseconds of one free-running slice, and the counted
#: instructions a lone core must run without an event before it runs free.
FAST_SLICE_US = 200_000
FAST_WARMUP = 1_000_000

#: Exit records a run keeps by default (the first ones; counts are always
#: complete): a long run must not grow in memory with its length.
EXIT_RECORDS_KEPT = 10_000
#: Exit records kept for the debugger (the most recent ones).
RECENT_EXITS = 64


@dataclass
class RunResult:
    """What a run produced (``to_json`` gives the CLI's ``--json`` object)."""

    verdict: str
    serial: str
    cores: int
    instructions: list[int]
    virtual_ns: int
    events: dict[str, int]
    wall_s: float
    exit_status: int
    markers: list[list[list[int | None]]] = field(default_factory=list)
    message: str = ""
    mode: str = "deterministic"
    arch: str = "none"
    config: str | None = None
    #: The CPU model's name (its spec, e.g. "nehalem,+pcid").
    cpu: str = "skylake-server"
    exits: list[dict] = field(default_factory=list)
    #: Exit records not kept in ``exits`` (see Machine's ``record_exits``).
    exits_dropped: int = 0
    exit_counts: dict[str, int] = field(default_factory=dict)
    window_exit_counts: dict[str, int] = field(default_factory=dict)
    #: exit_counts split by core (one dict per core; empty without a hypervisor).
    exit_counts_per_core: list[dict[str, int]] = field(default_factory=list)

    @property
    def mips(self) -> float:
        return sum(self.instructions) / self.wall_s / 1e6 if self.wall_s > 0 else 0.0

    def to_json(self) -> dict:
        d = asdict(self)
        d["mips"] = round(self.mips, 3)
        return d


class Machine:
    """An x86-64 machine of N cores, natively or under a hypervisor model
    (``arch="vmx"`` or ``"svm"``: the KVM L0 for Intel or AMD in configuration
    ``config``).

    ``load_image`` / ``load_elf`` put a guest in RAM; ``run`` boots and runs it
    to a verdict.  The stepping API does the same in steps: ``boot``, then
    ``step`` / ``run_until`` with breakpoints, watchpoints and stops on VM
    exits and vectors, each returning a :class:`~devirt_emu.stepping.Stop`;
    ``result`` gives the RunResult at any point.  ``run`` is built on it.

    ``record_exits``: None (the default) keeps the first EXIT_RECORDS_KEPT exit
    records, True all of them, False none, a number that many; ``exit_counts`` are always complete
    and ``recent_exits`` holds the last RECENT_EXITS.
    """

    #: A set that :meth:`write_phys` adds the page address of every page it
    #: writes to, or None (no log).  A harness that restores RAM between runs
    #: (the direct case API) sets it to find the pages the platform wrote.
    write_log: set[int] | None = None

    def __init__(self, cores: int = 1, mem_mb: int = 64, *, fast: bool = False,
                 quantum: int = 20_000, max_ns: int = 1_000_000_000,
                 wall_timeout_s: float = 300.0, trace=None, on_serial=None,
                 arch: str = "none", config: str | None = None,
                 record_exits: bool | int | None = None, cpu=None):
        if not 1 <= cores <= 64:
            raise ValueError(f"cores must be between 1 and 64, not {cores}")
        if not 16 <= mem_mb <= 3072:
            raise ValueError(f"memory must be between 16 and 3072 MiB, not {mem_mb}")
        if quantum < 1:
            raise ValueError("quantum must be at least 1 instruction")
        #: The CPU model every core is (a CpuModel; ``cpu`` may be one, a spec
        #: string such as "nehalem,+pcid", or None for skylake-server, or
        #: epyc-rome with ``arch="svm"``).
        self.cpu = get_model("epyc-rome" if cpu is None and arch == "svm" else cpu)
        if arch == "vmx" and not self.cpu.has_vmx:
            raise ValueError(f"CPU model {self.cpu.name} has no VMX; --arch vmx needs an Intel model")
        if arch == "svm" and not self.cpu.has_svm:
            raise ValueError(f"CPU model {self.cpu.name} has no SVM; --arch svm needs an AMD model "
                             "(epyc-rome, the default with --arch svm)")
        self.mem = PhysMem(mem_mb << 20)
        self.deterministic = not fast
        self.fast = fast
        self.fast_rate = measure_raw_rate() if fast else 1.0
        self.quantum = quantum
        self.max_ns = max_ns
        self.wall_timeout_s = wall_timeout_s
        self.trace = trace
        self.uart = Uart16550(UART_BASE, on_byte=on_serial)
        self.debug_exit = DebugExit(DEBUG_EXIT_PORT, iosize=4)
        self._debug_exit_ports = range(DEBUG_EXIT_PORT, DEBUG_EXIT_PORT + 4)   # (every OUT looks)
        self.bus = ApicBus()
        self.bus.on_deliver = self._on_deliver
        self.code_pages: set[int] = set()
        self._scans: dict[tuple[int, int, int], dict] = {}
        self._scans_by_content: dict[tuple[bytes, int, int], dict] = {}
        self.cores: list[Core] = []
        self.current: Core | None = None
        for i in range(cores):
            lapic = LocalApic(i, now=self._clock_of(i), bus=self.bus, bsp=(i == 0),
                              maxphyaddr=self.cpu.maxphyaddr)
            self.cores.append(Core(self, i, lapic))
        self.verdict: str | None = None
        self.message = ""
        self.entry32: int | None = None
        self.exits: list = []
        if record_exits is None or record_exits is True or record_exits is False:
            self._exits_kept = {None: EXIT_RECORDS_KEPT, True: None, False: 0}[record_exits]
        elif isinstance(record_exits, int) and record_exits >= 0:
            self._exits_kept = record_exits
        else:
            raise ValueError(f"record_exits is None, True, False or a count, not {record_exits!r}")
        self.exits_dropped = 0
        self.recent_exits: deque = deque(maxlen=RECENT_EXITS)
        self.exit_counts: dict[str, int] = {}
        self.window_exit_counts: dict[str, int] = {}
        self.exit_counts_per_core: list[dict[str, int]] = [{} for _ in range(cores)]
        self.arch, self.config, self.l0 = arch, None, None
        if arch == "vmx":
            from .hypervisor.kvm import KvmL0
            self.config = config or "stock"
            self.l0 = KvmL0(self, self.config)
        elif arch == "svm":
            from .hypervisor.kvm_svm import KvmSvmL0
            self.config = config or "stock"
            self.l0 = KvmSvmL0(self, self.config)
        elif arch != "none":
            raise ValueError(f"unknown architecture {arch!r} (have: none, vmx, svm)")
        elif config is not None:
            raise ValueError("a configuration needs --arch vmx or svm")
        # the stepping API
        self.booted = False
        self._wall_used = 0.0
        self._interrupt = threading.Event()
        self._breakpoints: dict[int, tuple[int, int | None]] = {}   # id -> (linear, core)
        self._watchpoints: dict[int, tuple] = {}    # id -> (address, size, access, physical)
        self._phys_watch_pages: dict[int, int] = {}  # page -> physical watchpoints on it
        self._next_id = 1
        self._exit_stop: frozenset | str | None = None
        self._stop: Stop | None = None          # set by a callback during a run
        self._slice: tuple[Core, int] | None = None   # a planned slice a stop cut short

    def _clock_of(self, i: int):
        return lambda: self.cores[i].now() if i < len(self.cores) else 0

    # ------------------------------------------------------------------ loading
    def load_image(self, image) -> None:
        """Load an assembled firmware image (devirt_emu.asm.Image)."""
        self.write_phys(image.base, image.data)
        self.entry32 = image.entry32

    def load_elf(self, path: str | os.PathLike) -> int:
        """Load an ELF executable's PT_LOAD segments at their physical addresses.

        Returns the entry point; ``elf_class`` (32 or 64) is kept in ``self.elf_class``.
        """
        from elftools.elf.elffile import ELFFile
        from elftools.common.exceptions import ELFError
        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                if elf["e_machine"] not in ("EM_X86_64", "EM_386"):
                    raise GuestError(f"{path}: not an x86 ELF ({elf['e_machine']})")
                for seg in elf.iter_segments():
                    if seg["p_type"] != "PT_LOAD":
                        continue
                    pa = seg["p_paddr"]
                    data = seg.data()
                    if not self.mem.contains(pa, seg["p_memsz"]):
                        raise GuestError(f"{path}: segment at {pa:#x}+{seg['p_memsz']:#x} outside RAM")
                    self.write_phys(pa, data + bytes(seg["p_memsz"] - len(data)))
                self.elf_class = elf.elfclass
                return elf["e_entry"]
        except ELFError as e:
            raise GuestError(f"{path}: not a valid ELF file: {e}") from None

    def guest_ram(self) -> int:
        """Bytes of RAM the guest owns (under a hypervisor, the L0 keeps the top)."""
        return self.l0.guest_ram if self.l0 is not None else self.mem.size

    def record_exit(self, rec) -> None:
        """Called by the VMX layer for every VM exit."""
        kept = self._exits_kept
        if kept is None or len(self.exits) < kept:
            self.exits.append(rec)
        else:
            self.exits_dropped += 1
        self.recent_exits.append(rec)
        self.exit_counts[rec.name] = self.exit_counts.get(rec.name, 0) + 1
        per_core = self.exit_counts_per_core[rec.core]
        per_core[rec.name] = per_core.get(rec.name, 0) + 1
        if rec.in_window:
            self.window_exit_counts[rec.name] = self.window_exit_counts.get(rec.name, 0) + 1

    def _write_boot_info(self, elf_entry: int = 0) -> None:
        m = self.mem
        ram = self.guest_ram()
        m.write(BOOT_INFO, struct.pack("<IIQQQ", BOOT_INFO_MAGIC, len(self.cores), ram,
                                       elf_entry, TSC_HZ))
        # multiboot v1 info: flags bit 0 -> mem_lower / mem_upper (KiB)
        m.write(MULTIBOOT_INFO, struct.pack("<III", 1, 640, (ram >> 10) - 1024))
        # loader GDT: null, flat 32-bit code (0x08), flat data (0x10)
        m.write(LOADER_GDT, struct.pack("<QQQ", 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF))

    def _start_bsp(self, entry: int) -> None:
        from unicorn import x86_const as X
        bsp = self.cores[0]
        uc = bsp.uc
        uc.reg_write(X.UC_X86_REG_GDTR, (0, LOADER_GDT, 0x17, 0))
        uc.reg_write(X.UC_X86_REG_CR0, 0x11)
        bsp.load_segment(1, 0x08)
        for seg in (0, 2, 3, 4, 5):
            bsp.load_segment(seg, 0x10)
        uc.reg_write(X.UC_X86_REG_EAX, MULTIBOOT_MAGIC)
        uc.reg_write(X.UC_X86_REG_EBX, MULTIBOOT_INFO)
        uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)
        uc.reg_write(X.UC_X86_REG_RIP, entry)
        bsp.state = State.RUNNING

    # ------------------------------------------------------------------ memory and code pages
    def write_phys(self, pa: int, data: bytes) -> None:
        """A store by the platform into RAM, keeping code-page scans honest."""
        self.mem.write(pa, data)
        first, last = pa & ~0xFFF, (pa + len(data) - 1) & ~0xFFF
        if self.write_log is not None:
            self.write_log.update(range(first, last + 1, PAGE_SIZE))
        for page in range(first, last + 1, PAGE_SIZE):
            if page in self.code_pages:
                self.invalidate_code_page(page)

    def scan_cache(self, ppage: int, code: bytes, lpage: int, mode: int) -> dict:
        key = (ppage, lpage, mode)
        sites = self._scans.get(key)
        if sites is None:
            # scan_page is a pure function of its inputs: a page rewritten with
            # bytes it held before (a harness running case after case) reuses that scan
            by_content = self._scans_by_content
            sites = by_content.get((code, lpage, mode))
            if sites is None:
                sites = scan_page(code, lpage, mode)
                if len(by_content) >= SCANS_BY_CONTENT_KEPT:
                    del by_content[next(iter(by_content))]     # (the oldest)
                by_content[(code, lpage, mode)] = sites
            self._scans[key] = sites
        return sites

    def mark_code_page(self, ppage: int) -> None:
        """A core executes from ``ppage``: write-protect it in every core that
        does not execute it (a core that does watches its stores instead)."""
        if ppage in self.code_pages:
            return
        self.code_pages.add(ppage)
        for c in self.cores:
            c.protect_page(ppage, writable=False)

    def is_code_page(self, ppage: int) -> bool:
        return ppage in self.code_pages

    def forget_scans(self, ppage: int) -> None:
        """Drop the cached scans of ``ppage`` (its bytes changed)."""
        for key in [k for k in self._scans if k[0] == ppage]:
            del self._scans[key]

    def invalidate_code_page(self, ppage: int) -> None:
        """``ppage`` was written: drop every scan of it, make it writable again."""
        self.code_pages.discard(ppage)
        self.forget_scans(ppage)
        for c in self.cores:
            c.disarm_page(ppage)
            c.protect_page(ppage, writable=True)    # (a page a core watches keeps no access)

    # ------------------------------------------------------------------ devices
    def io_read(self, core: Core, port: int, size: int) -> int:
        if UART_BASE <= port < UART_BASE + 8:
            return self.uart.io_read(port - UART_BASE, size)
        return (1 << (8 * size)) - 1          # nothing there: the bus floats high

    def io_write(self, core: Core, port: int, size: int, value: int) -> None:
        if UART_BASE <= port < UART_BASE + 8:
            self.uart.io_write(port - UART_BASE, size, value)
        elif port in self._debug_exit_ports and port + size <= self.debug_exit.port + 4:
            self.debug_exit.io_write(port - self.debug_exit.port, size, value)
            self.finish(self.debug_exit.verdict,
                        f"core {core.index} wrote {value:#x} to the exit port {port:#x}")
            core.request_stop("exit")

    def _on_deliver(self, apic_id: int) -> None:
        if apic_id >= len(self.cores):
            return
        target = self.cores[apic_id]
        src = self.current
        if src is not None and src is not target and target.state is not State.RUNNING:
            target.clock = max(target.clock, src.now())
        if src is not None:
            # the sender stops so that the scheduler plans again: the target may
            # have woken (another core), or an interrupt be due here (self-IPI)
            # (between runs, as after a stepping stop, the request tells the loop)
            src.request_stop("check")

    # ------------------------------------------------------------------ outcomes
    def finish(self, verdict: str, message: str = "") -> None:
        if self.verdict is None:
            self.verdict = verdict
            self.message = message

    def shutdown(self, core: Core, why: str) -> None:
        self.finish("shutdown", f"core {core.index}: {why} at RIP {core.rip():#x}")

    def guest_error(self, message: str) -> None:
        self.finish("error", message)

    def internal_error(self, core: Core, exc: BaseException) -> None:
        """A Python exception inside the emulator: verdict error, with where it happened."""
        import traceback
        where = traceback.extract_tb(exc.__traceback__)[-1]
        self.finish("error", f"internal error on core {core.index} at RIP {core.rip():#x}: "
                             f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})")

    # ------------------------------------------------------------------ running
    def _wake_time(self, c: Core) -> int | None:
        """When core ``c`` can next run, or None if nothing will wake it."""
        if c.state is State.RUNNING:
            return c.clock
        if c.state is State.SHUTDOWN:
            # natively nothing here wakes a core in shutdown; in VMX non-root operation
            # the preemption timer counts on and its expiry (or a pending MTF exit) does
            d = c.virt.next_event_ns() if c.virt is not None else None
            return None if d is None else max(c.clock, d)
        if c.has_wakeup():
            return c.clock
        if c.state is State.HALTED:
            d = c.next_event_ns()
            if d is not None:
                return max(c.clock, d)
        return None

    # ------------------------------------------------------------------ the stepping API
    def boot(self, *, entry32: int | None = None, elf_entry: int = 0,
             prepared: bool = False) -> None:
        """Make the machine ready to run: the boot information, the BSP at the
        loaded image's 32-bit entry (or ``entry32``), the L0's VM setup.  No
        guest instruction runs yet.  ``prepared``: the caller has put the cores
        (and the L0, if any) in their starting state itself, as a test entering
        long mode directly does: nothing is written."""
        if self.booted:
            raise RuntimeError("the machine has booted already")
        if prepared:
            self.booted = True
            return
        entry = entry32 if entry32 is not None else self.entry32
        if entry is None:
            raise ValueError("nothing loaded: call load_image or pass entry32")
        self.booted = True
        self._write_boot_info(elf_entry)
        self._start_bsp(entry)
        if self.l0 is not None:
            self._guarded(self._launch_l0)

    def new_run(self) -> None:
        """Forget the verdict and the wall time used (a harness that runs case
        after case on one machine)."""
        self.verdict, self.message = None, ""
        self._wall_used = 0.0
        self._slice = None

    def _launch_l0(self) -> None:
        self.l0.attach()
        self.l0.launch()

    def _guarded(self, fn, *args):
        """Run ``fn``: a guest error or a bug of ours becomes a verdict, not a traceback."""
        try:
            return fn(*args)
        except GuestError as e:
            self.finish("error", str(e))
        except Exception as e:
            self.internal_error(self.current or self.cores[0], e)
        return None

    def _new_id(self) -> int:
        ident, self._next_id = self._next_id, self._next_id + 1
        return ident

    def _cores_of(self, core: int | None) -> list[Core]:
        if core is None:
            return self.cores
        if not 0 <= core < len(self.cores):
            raise ValueError(f"no core {core} (the machine has {len(self.cores)})")
        return [self.cores[core]]

    def add_breakpoint(self, linear: int, *, core: int | None = None) -> int:
        """Stop before the instruction at linear address ``linear`` executes (on
        ``core``, or any core); returns the breakpoint's id.  Continuing from it
        executes that instruction."""
        if not 0 <= linear < 1 << 64:
            raise ValueError(f"breakpoint address {linear:#x} is not a 64-bit address")
        ident = self._new_id()
        self._breakpoints[ident] = (linear, core)
        for c in self._cores_of(core):
            c.add_breakpoint(linear)
        return ident

    def remove_breakpoint(self, ident: int) -> None:
        linear, core = self._breakpoints.pop(ident)
        for c in self._cores_of(core):
            if not any(a == linear and (k is None or k == c.index)
                       for a, k in self._breakpoints.values()):
                c.remove_breakpoint(linear)

    def breakpoints(self) -> dict[int, tuple[int, int | None]]:
        """id -> (linear address, core or None for any)."""
        return dict(self._breakpoints)

    def add_watchpoint(self, address: int, size: int = 1, access: str = "w", *,
                       physical: bool = False) -> int:
        """Stop after a guest instruction reads (``access`` "r"), writes ("w") or
        either ("rw") a byte of ``[address, address + size)``, on every core.
        Returns the watchpoint's id.

        Linear addresses (the default) are watched as the guest's instructions
        access them; the platform's own accesses (an interrupt frame's pushes,
        say) are not seen.  With ``physical`` the range is in the machine's RAM
        (host-physical: under EPT, where guest-physical addresses are
        translated, the RAM behind them): every access to its pages is seen,
        the platform's included (which then stop the run after the instruction
        or event delivery they belong to).  A physical watchpoint cannot share a
        page with the VMX layer's own page watching (the APIC-access page), nor
        watch a page the guest executes from: a fetch from it removes the
        watchpoint and stops with access "fetch"."""
        if access not in ("r", "w", "rw"):
            raise ValueError(f"watchpoint access must be r, w or rw, not {access!r}")
        if not 1 <= size <= 1 << 20 or not 0 <= address < (1 << 64) - size:
            raise ValueError(f"bad watch range {address:#x}+{size:#x}")
        pages = range(address & ~0xFFF, address + size, PAGE_SIZE)
        if physical:
            if not self.mem.contains(address, size):
                raise ValueError(f"physical watch range {address:#x}+{size:#x} is outside RAM")
            for ppage in pages:
                if self.is_code_page(ppage):
                    raise ValueError(f"physical page {ppage:#x} holds code the guest runs: a "
                                     f"physical watchpoint there is not supported")
                for c in self.cores:
                    if c.watches(ppage, 1) and ppage not in self._phys_watch_pages:
                        raise ValueError(f"physical page {ppage:#x} is watched by the "
                                         f"virtualization layer already")
        ident = self._new_id()
        self._watchpoints[ident] = (address, size, access, physical)
        if physical:
            for ppage in pages:
                self._phys_watch_pages[ppage] = self._phys_watch_pages.get(ppage, 0) + 1
                for c in self.cores:
                    c.watch_page(ppage, self._physical_watcher)
        else:
            for c in self.cores:
                c.add_watch(ident, address, size, access)
        return ident

    def remove_watchpoint(self, ident: int) -> None:
        address, size, _, physical = self._watchpoints.pop(ident)
        if not physical:
            for c in self.cores:
                c.remove_watch(ident)
            return
        for ppage in range(address & ~0xFFF, address + size, PAGE_SIZE):
            left = self._phys_watch_pages.pop(ppage, 1) - 1
            if left:
                self._phys_watch_pages[ppage] = left
            else:
                for c in self.cores:
                    c.unwatch_page(ppage)

    def watchpoints(self) -> dict[int, tuple[int, int, str, bool]]:
        """id -> (address, size, access, physical)."""
        return dict(self._watchpoints)

    def _physical_watcher(self, c: Core, access) -> None:
        """An access to a page with a physical watchpoint (see watch_page): an
        instruction's runs at once (step_watched); one that touches a watched range
        of its kind records the hit and stops the run after it."""
        if access.access == "fetch":
            ppage = access.pa & ~0xFFF
            hit = next((i for i, (a, n, _, phys) in self._watchpoints.items()
                        if phys and a & ~0xFFF <= ppage < a + n), None)
            if hit is not None:
                self.remove_watchpoint(hit)
            c.watch_hit = (hit, access.pa, "fetch")
            c.request_stop("watch")
            return None
        kind = "w" if access.access == "write" else "r"
        first, last = access.pa, access.pa + max(access.size, 1) - 1
        hit = next((i for i, (a, n, acc, phys) in self._watchpoints.items()
                    if phys and kind in acc and first < a + n and a <= last), None)
        if hit is not None and c.watch_hit is None:
            c.watch_hit = (hit, access.pa, "write" if kind == "w" else "read")
            c.request_stop("watch")
        if access.platform:
            return None             # the platform's access goes to memory
        c.step_watched(access.pa & ~0xFFF, writable=True)
        return None

    def stop_on_exit(self, reasons) -> None:
        """Stop at VM exits of these basic reasons (an iterable of ints; "all" for
        every exit; None for none): after the processor wrote the exit
        information, before the L0 handles the exit (the next run hands it
        over)."""
        if reasons is None:
            self._exit_stop = None
        elif reasons == "all":
            self._exit_stop = "all"
        else:
            self._exit_stop = frozenset(int(r) for r in reasons)
        for c in self.cores:
            if c.virt is not None:
                c.virt.stop_on_exit = None if reasons is None else self._exit_wanted

    def _exit_wanted(self, reason: int) -> bool:
        stops = self._exit_stop
        return stops is not None and (stops == "all" or reason in stops)

    def stop_on_vector(self, vectors) -> None:
        """Stop when an interrupt or exception of one of ``vectors`` (None: none)
        has been delivered (the handler's first instruction is next)."""
        vs = frozenset() if vectors is None else frozenset(int(v) for v in vectors)
        if any(not 0 <= v < 256 for v in vs):
            raise ValueError("vectors are 0-255")
        for c in self.cores:
            c.stop_vectors = vs

    def interrupt(self) -> None:
        """Ask a running ``run_until`` to stop (thread-safe; a signal handler may
        call it): it returns a Stop of kind INTERRUPTED at the next slice."""
        self._interrupt.set()

    def step(self, n: int = 1, core: int = 0) -> Stop:
        """Run until core ``core`` has retired exactly ``n`` more instructions
        (VM exits, entries and event deliveries are not instructions).  The
        other cores run as the deterministic schedule has them, so a stepped
        run is the same run as a free one.  Returns early at another stop
        (breakpoint, watchpoint, VM exit, vector, verdict)."""
        if n < 0:
            raise ValueError("n must be at least 0")
        c = self._cores_of(core)[0]
        return self.run_until(_core=c, _target=c.icount + n)

    def run_until(self, *, max_instructions: int | None = None,
                  until_ns: int | None = None, _core: Core | None = None,
                  _target: int | None = None) -> Stop:
        """Run the deterministic schedule until a stop: a breakpoint, watchpoint,
        VM exit or vector asked for, ``max_instructions`` more retired on all
        cores together, virtual time ``until_ns`` reached, ``interrupt()``, or a
        verdict."""
        if not self.booted:
            self.boot()
        if self.verdict is not None:
            return self._verdict_stop()
        self._stop = None
        self._interrupt.clear()
        for c in self.cores:
            if c.virt is not None and c.virt.exit_pending:
                self.current = c
                c.take_stop_request()
                self._guarded(c.virt.complete_exit)
                self.current = None
                asked = c.take_stop_request()
                if asked == "step":
                    # the L0 left the instruction to a lone step (as a hook does),
                    # after which the scheduler plans again
                    self._slice = (c, 1, c.clock + 1)
                elif (asked is not None or c.interrupt_wanted()) and self._slice is not None \
                        and self._slice[0] is c:
                    # the L0 asked the scheduler to plan again, or the entry left an
                    # interrupt or window due at the next boundary
                    self._slice = None
        total = sum(c.icount for c in self.cores)
        goal = None if max_instructions is None else total + max(0, max_instructions)
        wall0 = time.perf_counter()
        try:
            stop = self._guarded(self._loop, wall0, goal, until_ns, _core, _target)
        finally:
            self._wall_used += time.perf_counter() - wall0
        return stop if stop is not None else self._verdict_stop()

    def run(self, *, entry32: int | None = None, elf_entry: int = 0) -> RunResult:
        """Boot (BSP at ``entry32`` in 32-bit protected mode) and run to a verdict."""
        if not self.booted:
            self.boot(entry32=entry32, elf_entry=elf_entry)
        while self.verdict is None:
            self.run_until()
        return self.result()

    def result(self) -> RunResult:
        """What the run has produced so far (verdict "running" before it ends)."""
        verdict = self.verdict or "running"
        if verdict == "pass":
            status = 0
        elif verdict == "fail" and self.debug_exit.exited:
            status = self.debug_exit.exit_status & 0xFF or 1
        else:
            status = {"shutdown": 3, "halted": 4, "timeout": 5, "fail": 1}.get(verdict, 2)
        events: dict[str, int] = {}
        for c in self.cores:
            for k, v in c.events.items():
                events[k] = events.get(k, 0) + v
        return RunResult(
            verdict=verdict, serial=self.uart.output.decode("latin-1"), cores=len(self.cores),
            instructions=[c.icount for c in self.cores],
            virtual_ns=max(c.clock for c in self.cores), events=dict(sorted(events.items())),
            wall_s=self._wall_used, exit_status=status, markers=[c.markers for c in self.cores],
            message=self.message, mode="fast" if self.fast else "deterministic",
            arch=self.arch, config=self.config, cpu=self.cpu.name,
            exits=[e.to_json() for e in self.exits],
            exits_dropped=self.exits_dropped,
            exit_counts=dict(sorted(self.exit_counts.items())),
            window_exit_counts=dict(sorted(self.window_exit_counts.items())),
            exit_counts_per_core=[dict(sorted(c.items())) for c in self.exit_counts_per_core]
            if self.arch != "none" else [])

    def _verdict_stop(self) -> Stop:
        c = self.current or self.cores[0]
        return Stop(StopKind.VERDICT, c.index, c.rip(), verdict=self.verdict or "error")

    def _core_stop(self, c: Core, why: str | None) -> Stop | None:
        """A Stop for what ended core ``c``'s run, if it is one the user asked for."""
        if c.watch_hit is not None:
            ident, address, access = c.watch_hit
            c.watch_hit = None
            return Stop(StopKind.WATCHPOINT, c.index, c.rip(), ident=ident, address=address,
                        access=access)
        if c.vector_hit is not None:
            vector, c.vector_hit = c.vector_hit, None
            return Stop(StopKind.VECTOR, c.index, c.rip(), vector=vector)
        if c.virt is not None and c.virt.exit_pending:
            d = c.virt.last_exit
            return Stop(StopKind.VM_EXIT, c.index, c.rip(), reason=d.reason, name=d.name)
        if why == "break":
            rip = c.rip()
            ident = next((i for i, (a, k) in self._breakpoints.items()
                          if a == rip and (k is None or k == c.index)), None)
            return Stop(StopKind.BREAKPOINT, c.index, rip, ident=ident)
        return None

    def _loop(self, wall0: float, goal: int | None, until_ns: int | None,
              only: Core | None, target: int | None) -> Stop | None:
        """The one run loop (see the module docstring for the schedule)."""
        cores = self.cores
        while self.verdict is None:
            if self._interrupt.is_set():
                self._interrupt.clear()
                c = self.current or cores[0]
                return Stop(StopKind.INTERRUPTED, c.index, c.rip())
            if only is not None and only.icount >= target:
                return Stop(StopKind.STEP, only.index, only.rip())
            if goal is not None and sum(c.icount for c in cores) >= goal:
                c = self.current or cores[0]
                return Stop(StopKind.INSTRUCTIONS, c.index, c.rip())
            if self._slice is not None:
                # a slice a stop cut short goes on as planned (the schedule stays
                # the free run's)
                c, budget, time_limit = self._slice
                self._slice = None
                if c.state is not State.RUNNING:
                    continue
                others = True
                d = None
            else:
                best, best_t = None, None
                for c in cores:
                    t = self._wake_time(c)
                    if t is None:
                        continue
                    if best_t is None or t < best_t:
                        best, best_t = c, t
                if best is None:
                    self.finish("halted", "every core is halted or waiting with nothing to wake it")
                    break
                if best_t >= self.max_ns:
                    self.finish("timeout", f"virtual time limit of {self.max_ns} ns reached")
                    break
                if until_ns is not None and best_t >= until_ns:
                    return Stop(StopKind.TIME, best.index, best.rip())
                if self._wall_used + time.perf_counter() - wall0 > self.wall_timeout_s:
                    self.finish("timeout", f"wall-clock limit of {self.wall_timeout_s} s reached")
                    break
                c = best
                c.clock = max(c.clock, best_t)
                c.lapic.update(c.clock)
                self.current = c
                acted = c.wake_check()
                stop = self._core_stop(c, None)
                if stop is not None:
                    return stop
                if acted:
                    continue                       # a VM exit and entry: the boundary once more
                if c.state is not State.RUNNING:
                    if c.state is State.HALTED and self._wake_time(c) == c.clock:
                        # a wake-up is pending but cannot be taken (e.g. IF=0 with a timer
                        # interrupt): let virtual time move on to avoid spinning
                        c.clock += 1
                    continue
                others = [self._wake_time(o) for o in cores if o is not c]
                others = [t for t in others if t is not None]
                if others:
                    budget = max(1, min(self.quantum, min(others) + self.quantum - c.clock))
                else:
                    # nobody to interleave with: only timers cut the run (the slices are
                    # short enough for a compute phase to shed the hooks of pages it left)
                    budget = LONE_CORE_SLICE
                d = c.next_event_ns()
                if d is not None and d > c.clock:
                    budget = min(budget, d - c.clock)
                if c.virt is not None and c.virt.single_step():
                    budget = 1                     # monitor trap flag: a boundary after each one
                budget = max(1, min(budget, self.max_ns - c.clock))
                time_limit = c.clock + budget
            planned = budget
            if only is c:
                budget = min(budget, target - c.icount)
            if goal is not None:
                budget = min(budget, max(1, goal - sum(k.icount for k in cores)))
            if until_ns is not None:
                budget = min(budget, max(1, until_ns - c.clock))
            self.current = c
            icount = c.icount
            if self.fast and not others and d is None and not c.interrupt_wanted() \
                    and budget == planned:
                # A lone core with no timer armed: nothing can interrupt it but itself.
                # It runs free once a counted warm-up slice ran out without an event
                # (compute-bound, code translated), and counts again after an event.
                if c.free_running:
                    c.free_running = c.run(None, FAST_SLICE_US) is None
                else:
                    c.free_running = c.run(min(budget, FAST_WARMUP)) is None
                why = None
            else:
                c.free_running = False
                why = c.run(budget, time_limit=time_limit)
            left = planned - (c.icount - icount)
            stop = self._core_stop(c, why)
            if (stop is not None or budget < planned) \
                    and why in (None, "break", "watch", "vm-exit", "vector") \
                    and left > 0 and c.state is State.RUNNING:
                self._slice = (c, left, time_limit)
            if stop is not None:
                return stop
        return None


_raw_rate: float | None = None


def measure_raw_rate() -> float:
    """Instructions per wall nanosecond that raw Unicorn retires on this machine
    (a tight loop, measured once per process): fast mode's time base."""
    global _raw_rate
    if _raw_rate is None:
        from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
        code = bytes.fromhex("48c7c140420f00" "4801c8" "48ffc9" "75f8")  # mov rcx,1e6; add; dec; jnz
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(0, 0x1000)
        uc.mem_write(0, code)
        uc.emu_start(0, len(code))               # warm the translation cache
        t = time.perf_counter_ns()
        uc.emu_start(0, len(code))
        _raw_rate = (1 + 3 * 1_000_000) / max(1, time.perf_counter_ns() - t)
    return _raw_rate


def run_program(path: str | os.PathLike, cores: int = 1, on_machine=None,
                **kwargs) -> RunResult:
    """Assemble (or load, for an ELF) ``path`` with the firmware and run it.

    ``kwargs`` are :class:`Machine`'s (``arch="vmx", config="devirt"``, ``fast``...);
    ``on_machine(machine)``, if given, is called once the machine exists, before
    anything is loaded (the timeline attaches there).
    """
    from .asm import build_image
    path = Path(path)
    m = Machine(cores=cores, **kwargs)
    if on_machine is not None:
        on_machine(m)
    if is_elf(path):
        entry = m.load_elf(path)
        if m.elf_class == 32:
            return m.run(entry32=entry)
        check_firmware_features(m.cpu)
        image = build_image(None)
        m.load_image(image)
        return m.run(elf_entry=entry)
    check_firmware_features(m.cpu)
    m.load_image(build_image(path))
    return m.run()


#: CPUID features the firmware (firmware/boot.S, lib.S) relies on: it runs the
#: local APICs in x2APIC mode and its timer on IA32_TSC_DEADLINE.
FIRMWARE_FEATURES = ("x2apic", "tsc_deadline_timer")


def check_firmware_features(cpu) -> None:
    """ValueError (one line) if CPU model ``cpu`` lacks what the firmware uses."""
    missing = [f for f in FIRMWARE_FEATURES if not cpu.has(f)]
    if missing:
        raise ValueError(f"the firmware uses {' and '.join(missing)}, which CPU model "
                         f"{cpu.name} does not advertise (add ,+{',+'.join(missing)})")


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False
