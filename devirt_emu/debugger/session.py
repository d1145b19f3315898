"""The debugging API: a :class:`Session` over a :class:`~devirt_emu.machine.Machine`.

Both front ends (the REPL of :mod:`devirt_emu.debugger.repl` and the GDB stub
of :mod:`devirt_emu.debugger.gdbstub`) drive it, and a Python user can too::

    from devirt_emu.debugger import Session
    s = Session("guest_tests/lapic_timer.S", cores=2, arch="vmx", config="stock")
    s.break_at("timer_handler")
    stop = s.cont()                 # -> devirt_emu.stepping.Stop
    s.regs()["rip"], s.why().lines()

Execution is the machine's stepping API (a stepped run is the free run).
Time travel is built on that determinism: a :class:`Position` names a point
of the run by the instructions retired on all cores together and the VM
exits taken; ``restore`` builds a fresh machine from the same program and
options and runs it to that point with no stops armed, then re-arms the
session's breakpoints and stops.  ``reverse_stepi`` is a restore to the
selected core's instruction count minus N; ``reverse_cont`` replays from
boot to the current point with the stops armed and restores the last stop
before it.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..machine import Machine, is_elf
from ..stepping import Stop, StopKind
from ..vmx import exit_reasons as ER
from . import state as S
from .symbols import SymbolTable
from .views import ViewError, view_for


class DebugError(ValueError):
    """Bad input to the debugger: the message is one line for the user."""


@dataclass(frozen=True)
class Position:
    """A point of the deterministic run."""

    total: int                 # instructions retired on all cores together
    icounts: tuple             # per core (checked after a replay)
    exits: int                 # VM exits taken on all cores
    pending: Optional[str] = None    # "vm-exit" / "vector": stopped inside a boundary
    vector: Optional[int] = None
    core: int = 0              # the selected core


@dataclass
class Breakpoint:
    address: int
    core: Optional[int]
    spec: str
    temporary: bool = False
    hits: int = 0


@dataclass
class Watchpoint:
    address: int
    size: int
    access: str
    spec: str
    hits: int = 0
    #: the machine RAM address of a physical watchpoint (``address`` is then guest-physical)
    hpa: Optional[int] = None


_ACCESS = {"w": "write", "r": "read", "rw": "access"}
#: Instructions ``finish`` steps at most when it cannot read the return address
#: (measured: about 0.5 ms each, a step and a disassembly).
FINISH_STEPS = 200_000


class Session:
    """A debugging session of one guest program on one machine configuration."""

    def __init__(self, program: str | Path, *, cores: int = 1, arch: str = "none",
                 config: str | None = None, mem_mb: int = 64, max_ns: int = 1_000_000_000,
                 quantum: int = 20_000, cpu=None):
        self.program = Path(program)
        if not self.program.is_file():
            raise DebugError(f"no such file: {program}")
        self.options = dict(cores=cores, arch=arch, config=config, mem_mb=mem_mb, max_ns=max_ns,
                            quantum=quantum, cpu=cpu)
        self.symbols = SymbolTable()
        self._image = None
        self._elf_entry = None
        self._load_program()
        self.machine: Machine = self._new_machine()
        self.core = 0
        self.breakpoints: dict[int, Breakpoint] = {}
        self.watchpoints: dict[int, Watchpoint] = {}
        self._machine_ids: dict[int, int] = {}       # session id -> machine id
        self._next_id = 1
        self.exit_stops: Optional[set | str] = None
        self.vector_stops: set[int] = set()
        self.entry_failure_stop = False
        self.snapshots: dict[str, Position] = {}
        self.last_stop: Optional[Stop] = None
        self._over_breakpoint: Optional[int] = None  # a replay left this core at a breakpoint
        #: reverse-continue found no earlier stop and went back to the boot state
        self.at_history_begin = False
        #: the user wrote registers, memory or the VMCS since boot (or the last replay):
        #: a replay runs the program as loaded, without those writes
        self.modified = False
        #: the last replay dropped such writes
        self.dropped_writes = False

    # ------------------------------------------------------------------ building
    def _load_program(self) -> None:
        from ..asm import build_image
        if is_elf(self.program):
            self._image = build_image(None)
            self.symbols = SymbolTable(self._image.symbols)
            self.symbols.add_elf(self.program)
        else:
            self._image = build_image(self.program)
            self.symbols = SymbolTable(self._image.symbols)

    def _new_machine(self) -> Machine:
        o = self.options
        m = Machine(cores=o["cores"], mem_mb=o["mem_mb"], arch=o["arch"], config=o["config"],
                    max_ns=o["max_ns"], quantum=o["quantum"], record_exits=True, cpu=o["cpu"])
        m.load_image(self._image)
        if is_elf(self.program):
            entry = m.load_elf(self.program)
            if m.elf_class == 32:
                m.boot(entry32=entry)
            else:
                m.boot(elf_entry=entry)
        else:
            m.boot()
        return m

    def _arm(self) -> None:
        """Put the session's breakpoints, watchpoints and stops on the machine."""
        m = self.machine
        self._machine_ids.clear()
        for ident, bp in self.breakpoints.items():
            self._machine_ids[ident] = m.add_breakpoint(bp.address, core=bp.core)
        for ident, wp in self.watchpoints.items():
            if wp.hpa is None:
                self._machine_ids[ident] = m.add_watchpoint(wp.address, wp.size, wp.access)
            else:
                self._machine_ids[ident] = m.add_watchpoint(wp.hpa, wp.size, wp.access,
                                                            physical=True)
        self._arm_exits()
        m.stop_on_vector(self.vector_stops or None)

    def _arm_exits(self) -> None:
        if self.options["arch"] == "none":
            return
        self.machine.stop_on_exit(self.exit_stops)

    # ------------------------------------------------------------------ helpers
    @property
    def cores(self) -> int:
        return len(self.machine.cores)

    def cur(self):
        return self.machine.cores[self.core]

    def select_core(self, n: int) -> None:
        if not 0 <= n < self.cores:
            raise DebugError(f"no core {n} (the machine has {self.cores})")
        self.core = n

    def resolve(self, text: str) -> int:
        """An address from a number, a symbol, ``symbol+offset``, or a register
        name prefixed with ``$`` (``$rip``, ``$rsp+8``)."""
        text = text.strip()
        if not text:
            raise DebugError("an address is needed")
        total = 0
        for sign, part in _terms(text):
            total += sign * self._term(part)
        if not 0 <= total < 1 << 64:
            raise DebugError(f"address {text!r} is outside 64 bits")
        return total

    def _term(self, part: str) -> int:
        if part.startswith("$"):
            name = part[1:].lower()
            regs = S.gprs(self.cur())
            regs.update(S.control_regs(self.cur()))
            if name not in regs:
                raise DebugError(f"no register {part!r}")
            return regs[name]
        if part in self.symbols:
            return self.symbols[part]
        try:
            return int(part, 0)
        except ValueError:
            raise DebugError(f"not an address or a known symbol: {part!r}") from None

    def write_symbol_file(self, path: str | Path) -> None:
        """An ELF file of the session's symbols for GDB's ``symbol-file``."""
        from .symbols import write_symbol_elf
        code_end = 1 << 63 if is_elf(self.program) else self._image.code_end
        write_symbol_elf(path, self.symbols.by_name, code_end)

    def where(self, address: int) -> str:
        sym = self.symbols.describe(address)
        return f"{address:#x} <{sym}>" if sym else f"{address:#x}"

    def position(self) -> Position:
        m = self.machine
        st = self.last_stop
        pending = None
        vector = None
        if st is not None and st.kind is StopKind.VM_EXIT:
            pending = "vm-exit"
        elif st is not None and st.kind is StopKind.VECTOR:
            pending, vector = "vector", st.vector
        return Position(sum(c.icount for c in m.cores), tuple(c.icount for c in m.cores),
                        sum(m.exit_counts.values()), pending, vector, self.core)

    # ------------------------------------------------------------------ breakpoints
    def _new_id(self) -> int:
        ident, self._next_id = self._next_id, self._next_id + 1
        return ident

    def break_at(self, spec: str, core: Optional[int] = None, temporary: bool = False) -> int:
        if core is not None and not 0 <= core < self.cores:
            raise DebugError(f"no core {core}")
        addr = self.resolve(spec)
        ident = self._new_id()
        self.breakpoints[ident] = Breakpoint(addr, core, spec, temporary)
        self._machine_ids[ident] = self.machine.add_breakpoint(addr, core=core)
        return ident

    def watch(self, spec: str, size: int = 1, access: str = "w", *,
              physical: bool = False) -> int:
        """A watchpoint on ``size`` bytes at ``spec``: a linear address (every core's
        guest instructions), or with ``physical`` a guest-physical one (translated
        through the selected core's EPT once, now): every access to the RAM behind
        it, the platform's own included (see Machine.add_watchpoint)."""
        if access not in _ACCESS:
            raise DebugError(f"watch access is r, w or rw, not {access!r}")
        addr = self.resolve(spec)
        if not 1 <= size <= 1 << 20:
            raise DebugError(f"watch size {size} is not 1 .. 1 MiB")
        hpa = None
        if physical:
            hpa = self._gpa_to_hpa(addr)
            last = addr + size - 1
            if self._gpa_to_hpa(last) != hpa + size - 1:
                raise DebugError(f"guest-physical {addr:#x}+{size} is not contiguous in RAM "
                                 f"(split it at the page boundary)")
        ident = self._new_id()
        try:
            if hpa is None:
                mid = self.machine.add_watchpoint(addr, size, access)
            else:
                mid = self.machine.add_watchpoint(hpa, size, access, physical=True)
        except ValueError as e:
            raise DebugError(str(e)) from None
        self.watchpoints[ident] = Watchpoint(addr, size, access, spec, hpa=hpa)
        self._machine_ids[ident] = mid
        return ident

    def delete(self, ident: Optional[int] = None) -> None:
        idents = list(self.breakpoints) + list(self.watchpoints) if ident is None else [ident]
        for i in idents:
            if i in self.breakpoints:
                self.breakpoints.pop(i)
                self.machine.remove_breakpoint(self._machine_ids.pop(i))
            elif i in self.watchpoints:
                self.watchpoints.pop(i)
                self.machine.remove_watchpoint(self._machine_ids.pop(i))
            else:
                raise DebugError(f"no breakpoint or watchpoint {i}")

    def break_exit(self, reasons=None) -> str:
        """Stop at VM exits of these reasons (names or numbers; none: every exit;
        ``"off"``: no longer)."""
        if self.options["arch"] == "none":
            raise DebugError("break-exit needs --arch vmx (the machine runs natively)")
        if reasons == "off":
            self.exit_stops = None
        elif not reasons:
            self.exit_stops = "all"
        else:
            out = set() if not isinstance(self.exit_stops, set) else set(self.exit_stops)
            for r in reasons:
                try:
                    out.add(ER.reason(int(r, 0) if isinstance(r, str) and r[:1].isdigit()
                                      else (r.upper() if isinstance(r, str) else r)).number)
                except (KeyError, ValueError):
                    raise DebugError(f"no VM exit reason {r!r}") from None
            self.exit_stops = out
        self._arm_exits()
        return self.exit_stops_text()

    def exit_stops_text(self) -> str:
        if self.exit_stops is None:
            return "no exit stops"
        if self.exit_stops == "all":
            return "stop at every VM exit"
        return "stop at VM exits " + ", ".join(ER.name_of(r) for r in sorted(self.exit_stops))

    def break_interrupt(self, vectors=None) -> str:
        if vectors == "off":
            self.vector_stops = set()
        elif not vectors:
            self.vector_stops = set(range(256))
        else:
            for v in vectors:
                if not 0 <= v < 256:
                    raise DebugError(f"vector {v} is not 0-255")
            self.vector_stops |= set(vectors)
        self.machine.stop_on_vector(self.vector_stops or None)
        if not self.vector_stops:
            return "no vector stops"
        if len(self.vector_stops) == 256:
            return "stop at every interrupt and exception"
        return "stop at vectors " + ", ".join(f"{v:#x}" for v in sorted(self.vector_stops))

    # ------------------------------------------------------------------ running
    def _run(self, fn, step_core: Optional[int] = None, steps: Optional[int] = None) -> Stop:
        """Run ``fn`` (a machine run returning a Stop).  ``step_core``/``steps``:
        ``fn`` steps that core that many instructions (a step over a restored
        breakpoint counts as one of them)."""
        m = self.machine
        if m.verdict is not None:
            raise DebugError(f"the run has ended (verdict {m.verdict}); restore a snapshot or "
                             "use reverse-stepi / reverse-continue / restart")
        over = self._over_breakpoint
        self._over_breakpoint = None
        if over is not None and steps != 0:
            # a replay left this core in front of the breakpoint it had stopped at: the
            # machine would stop there again at once, so its instruction runs first (as
            # continuing from a breakpoint stop does)
            c = m.cores[over]
            hits = [(i, bp) for i, bp in self.breakpoints.items()
                    if bp.address == c.rip() and bp.core in (None, over)]
            if hits:
                for i, _ in hits:
                    m.remove_breakpoint(self._machine_ids.pop(i))
                try:
                    st = m.step(1, core=over)
                finally:
                    for i, bp in hits:
                        self._machine_ids[i] = m.add_breakpoint(bp.address, core=bp.core)
                if st.kind is not StopKind.STEP:
                    return self._stopped(st)
                if step_core == over:
                    if steps == 1:
                        return self._stopped(st)
                    fn = (lambda k=over, n=steps - 1: m.step(n, core=k))
        return self._stopped(fn())

    def _stopped(self, st: Stop) -> Stop:
        self.at_history_begin = False
        if st.kind is StopKind.BREAKPOINT:
            for i, bp in list(self.breakpoints.items()):
                if self._machine_ids.get(i) == st.ident:
                    bp.hits += 1
                    st = Stop(st.kind, st.core, st.rip, ident=i)
                    if bp.temporary:
                        self.delete(i)
                        st = Stop(StopKind.STEP, st.core, st.rip)   # until/next/finish arrived
        elif st.kind is StopKind.WATCHPOINT:
            for i in self.watchpoints:
                if self._machine_ids.get(i) == st.ident:
                    self.watchpoints[i].hits += 1
                    st = Stop(st.kind, st.core, st.rip, ident=i, address=st.address,
                              access=st.access)
        if st.kind is not StopKind.VERDICT and st.kind is not StopKind.INTERRUPTED:
            self.core = st.core
        self.last_stop = st
        return st

    def entry_failure(self):
        """(core, EntryFailure) of the VM-entry failure that ended the run, if one did."""
        for c in self.machine.cores:
            f = getattr(c.virt, "last_failure", None)
            if f is not None:
                return c.index, f
        return None

    def stepi(self, n: int = 1) -> Stop:
        if n < 0:
            raise DebugError("a step count is at least 0")
        return self._run(lambda: self.machine.step(n, core=self.core), self.core, n)

    def cont(self) -> Stop:
        return self._run(self.machine.run_until)

    def run_for(self, instructions: int) -> Stop:
        return self._run(lambda: self.machine.run_until(max_instructions=instructions))

    def interrupt(self) -> None:
        """Stop a running ``cont`` (thread-safe; the REPL's Ctrl-C calls it)."""
        self.machine.interrupt()

    def _insn(self, address: int):
        c = self.cur()
        try:
            code = c.read_linear(address, 16, peek=True)
        except Exception:
            return None
        got = S.disassemble(code, address, c.code_size(), 1)
        return got[0] if got else None

    def next(self) -> Stop:
        """One instruction on the selected core, over a CALL (it runs until the
        instruction after the call on this core)."""
        c = self.cur()
        rip = c.rip()
        insn = self._insn(rip)
        if insn is None or insn[2] != "call":
            return self.stepi(1)
        return self.until(f"{rip + len(insn[1]):#x}")

    def until(self, spec: str) -> Stop:
        """Continue until the selected core reaches ``spec`` (or another stop)."""
        addr = self.resolve(spec)
        ident = self.break_at(f"{addr:#x}", core=self.core, temporary=True)
        try:
            return self.cont()
        finally:
            if ident in self.breakpoints:
                self.delete(ident)

    def finish(self) -> Stop:
        """Run until the current function returns.  At a function's first
        instruction (a symbol's address) the return address is at [RSP]; else
        the core is stepped, counting CALLs and RETs, until the RET that leaves
        the current function (at most FINISH_STEPS instructions; Ctrl-C stops it)."""
        c = self.cur()
        rip = c.rip()
        hit = self.symbols.lookup(rip)
        if hit is not None and hit[1] == 0:
            ret = struct.unpack("<Q", self.read_virtual(c.read_reg("rsp"), 8))[0]
            return self.until(f"{ret:#x}")
        depth = 0
        st = None
        for _ in range(FINISH_STEPS):
            insn = self._insn(self.cur().rip())
            st = self.stepi(1)
            if st.kind is not StopKind.STEP:
                return st
            if insn is None:
                continue
            if insn[2] == "call":
                depth += 1
            elif insn[2].startswith("ret"):
                depth -= 1
                if depth < 0:
                    return st
        return st

    # ------------------------------------------------------------------ time travel
    def snapshot(self, name: str) -> Position:
        if not name:
            raise DebugError("a snapshot needs a name")
        pos = self.snapshots[name] = self.position()
        return pos

    def restore(self, name: str) -> Position:
        pos = self.snapshots.get(name)
        if pos is None:
            raise DebugError(f"no snapshot {name!r} (have: {', '.join(self.snapshots) or 'none'})")
        self._replay(pos)
        return pos

    def restart(self) -> None:
        """Back to the boot state (nothing has run)."""
        self._replay(Position(0, (0,) * self.cores, 0))

    def _fresh(self) -> Machine:
        """A new machine for a replay (the user's writes are not replayed)."""
        self.dropped_writes, self.modified = self.modified, False
        return self._new_machine()

    def set_field(self, name: str, value: int) -> str:
        """Write a field or control bit of the selected core's VMCS/VMCB view."""
        out = self.need_view().set(name, value)
        self.modified = True
        return out

    def _replay(self, pos: Position) -> None:
        """A fresh machine run, with no stop armed, to ``pos``."""
        self.machine = m = self._fresh()
        self._machine_ids.clear()
        while m.verdict is None:
            total = sum(c.icount for c in m.cores)
            if total >= pos.total:
                break
            m.run_until(max_instructions=pos.total - total)
        st = self._settle(pos)
        self._arm()
        if tuple(c.icount for c in m.cores) != pos.icounts and m.verdict is None:
            raise DebugError("the replay did not reach the same point (a nondeterministic stop)")
        self.core = pos.core
        c = m.cores[self.core]
        self.last_stop = st if st is not None else Stop(StopKind.STEP, self.core, c.rip())
        if any(bp.address == c.rip() and bp.core in (None, self.core)
               for bp in self.breakpoints.values()):
            self._over_breakpoint = self.core

    def _settle(self, pos: Position) -> Optional[Stop]:
        """After the instructions of ``pos``: the VM exits and the delivery the
        position had taken at that instruction boundary."""
        m = self.machine
        st = None
        if pos.exits > sum(m.exit_counts.values()) and m.verdict is None:
            m.stop_on_exit("all")
            while sum(m.exit_counts.values()) < pos.exits and m.verdict is None:
                st = m.run_until(max_instructions=1)
                if st.kind is not StopKind.VM_EXIT:
                    break
            m.stop_on_exit(None)
            if pos.pending != "vm-exit" and st is not None and st.kind is StopKind.VM_EXIT:
                m.run_until(max_instructions=0)        # hand the last one to the L0
                st = None
        if pos.pending == "vector" and m.verdict is None:
            m.stop_on_vector({pos.vector})
            st = m.run_until(max_instructions=1)
            m.stop_on_vector(None)
        return st

    def reverse_stepi(self, n: int = 1) -> Stop:
        """The selected core ``n`` instructions back (the other cores where the
        schedule had them then)."""
        if n < 1:
            raise DebugError("reverse-stepi needs a count of at least 1")
        k = self.core
        target = max(0, self.cur().icount - n)
        self.machine = m = self._fresh()
        self._machine_ids.clear()
        st = None
        while m.verdict is None and m.cores[k].icount < target:
            st = m.step(target - m.cores[k].icount, core=k)
        self._arm()
        self.core = k
        self.last_stop = st if st is not None else Stop(StopKind.STEP, k, m.cores[k].rip())
        c = m.cores[k]
        if any(bp.address == c.rip() and bp.core in (None, k) for bp in self.breakpoints.values()):
            self._over_breakpoint = k
        return self.last_stop

    def reverse_cont(self) -> Stop:
        """Back to the last stop (breakpoint, watchpoint, exit, vector) before
        the current point, or to the boot state if there was none."""
        here = self.position()
        saved_bps = dict(self.breakpoints)
        self.machine = m = self._fresh()
        dropped = self.dropped_writes
        self._arm()
        found: Optional[tuple[Position, Stop]] = None
        self.last_stop = None
        while m.verdict is None:
            total = sum(c.icount for c in m.cores)
            exits = sum(m.exit_counts.values())
            if (total, exits) >= (here.total, here.exits):
                break
            st = m.run_until(max_instructions=max(1, here.total - total)
                             if total < here.total else 1)
            if st.kind in (StopKind.BREAKPOINT, StopKind.WATCHPOINT, StopKind.VM_EXIT,
                           StopKind.VECTOR):
                self.last_stop = st
                pos = self.position()
                if (pos.total, pos.exits) < (here.total, here.exits):
                    found = (pos, st)
        self.breakpoints = saved_bps
        self.modified = dropped           # (the replays below must report them too)
        if found is None:
            self.restart()
            self.at_history_begin = True
            return self.last_stop
        self._replay(found[0])
        st = found[1]
        self.core = st.core
        return self._stopped(st) if st.kind is not StopKind.BREAKPOINT else self._bp_stop(st)

    def _bp_stop(self, st: Stop) -> Stop:
        ident = next((i for i, bp in self.breakpoints.items() if bp.address == st.rip), None)
        self.last_stop = Stop(st.kind, st.core, st.rip, ident=ident)
        return self.last_stop

    # ------------------------------------------------------------------ state
    def regs(self, core: Optional[int] = None) -> dict[str, int]:
        c = self.machine.cores[self.core if core is None else core]
        out = S.gprs(c)
        out.update(S.control_regs(c))
        for name, msr in (("fs_base", S.MSR_FS_BASE), ("gs_base", S.MSR_GS_BASE),
                          ("kernel_gs_base", S.MSR_KERNEL_GS_BASE)):
            out[name] = c.rdmsr_raw(msr)
        return out

    def write_register(self, name: str, value: int) -> None:
        """Write a GPR, RIP, RFLAGS or CR0/2/3/4 of the selected core (a stopped
        machine: the next run uses it)."""
        from .gdbstub import write_named_register
        if not 0 <= value < 1 << 64:
            raise DebugError(f"{value:#x} does not fit a 64-bit register")
        write_named_register(self.cur(), name.lower().lstrip("$"), value)
        self.modified = True

    def read_virtual(self, address: int, n: int, core: Optional[int] = None) -> bytes:
        from ..platform.paging import PageFault, UnsupportedPaging
        c = self.machine.cores[self.core if core is None else core]
        try:
            return c.read_linear(address, n, peek=True)
        except (PageFault, UnsupportedPaging) as e:
            raise DebugError(f"cannot read {address:#x}: {e}") from None
        except Exception as e:
            raise DebugError(f"cannot read {address:#x}: {e}") from None

    def _gpa_to_hpa(self, gpa: int) -> int:
        eptp = self.eptp()
        if eptp is None:
            return gpa
        from ..vmx.ept import EptTranslation
        r = S.ept_translate(self.machine.mem, eptp, gpa)
        if not isinstance(r, EptTranslation):
            raise DebugError(f"guest-physical {gpa:#x} is not mapped by the EPT (yet)")
        return r.hpa

    def read_physical(self, address: int, n: int) -> bytes:
        """Guest-physical memory (through the EPT when the selected core uses one)."""
        out = b""
        while n:
            chunk = min(n, 0x1000 - (address & 0xFFF))
            hpa = self._gpa_to_hpa(address)
            if not self.machine.mem.contains(hpa, chunk):
                raise DebugError(f"physical {address:#x} is outside RAM")
            out += self.machine.mem.read(hpa, chunk)
            address += chunk
            n -= chunk
        return out

    def write_virtual(self, address: int, data: bytes) -> None:
        try:
            self.cur().write_linear(address, data)
        except Exception as e:
            raise DebugError(f"cannot write {address:#x}: {e}") from None
        self.modified = True

    def write_physical(self, address: int, data: bytes) -> None:
        hpa = self._gpa_to_hpa(address)
        if not self.machine.mem.contains(hpa, len(data)):
            raise DebugError(f"physical {address:#x} is outside RAM")
        self.machine.write_phys(hpa, data)
        self.modified = True

    def eptp(self) -> Optional[int]:
        """The EPT pointer the selected core's vCPU uses, None without EPT."""
        view = self.view()
        if view is None or getattr(view, "kind", "") != "vmcs":
            return None
        from ..vmx import controls as C
        primary = view.get("CPU_BASED_VM_EXEC_CONTROL")
        if not primary & C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS:
            return None
        if not view.get("SECONDARY_VM_EXEC_CONTROL") & C.SECONDARY_EXEC_ENABLE_EPT:
            return None
        return view.get("EPT_POINTER")

    def page(self, address: int) -> dict:
        return S.page_walk(self.cur(), address, self.eptp())

    def disas(self, address: Optional[int] = None, count: int = 8):
        c = self.cur()
        addr = c.rip() if address is None else address
        code = b""
        for off in range(0, 16 * count, 16):        # stop at the first unreadable page
            try:
                code += c.read_linear(addr + off, 16, peek=True)
            except Exception:
                break
        if not code:
            raise DebugError(f"cannot read code at {addr:#x}")
        return S.disassemble(code, addr, c.code_size(), count)

    # ------------------------------------------------------------------ virtualization
    def view(self, core: Optional[int] = None):
        return view_for(self.machine.cores[self.core if core is None else core])

    def need_view(self):
        v = self.view()
        if v is None:
            raise DebugError("the machine runs natively: no VMCS or VMCB (use --arch vmx)")
        return v

    def why(self):
        return self.need_view().why()

    def why_not(self):
        return self.need_view().why_not()

    def exits(self, core: Optional[int] = None, reason: Optional[str] = None, last: int = 20):
        """The last ``last`` exit records (the machine keeps all of them in a
        session), filtered by core and reason name or number."""
        recs = self.machine.exits
        if core is not None:
            recs = [r for r in recs if r.core == core]
        if reason is not None:
            try:
                want = ER.reason(int(reason, 0) if reason[:1].isdigit() else reason.upper()).number
            except (KeyError, ValueError):
                raise DebugError(f"no VM exit reason {reason!r}") from None
            recs = [r for r in recs if r.reason == want]
        return list(recs)[-last:] if last else list(recs)


def _terms(text: str):
    """Split ``a+b-c`` into signed terms (a leading ``-`` is not allowed)."""
    out = []
    sign = 1
    cur = ""
    for ch in text:
        if ch in "+-" and cur:
            out.append((sign, cur.strip()))
            sign = 1 if ch == "+" else -1
            cur = ""
        else:
            cur += ch
    if not cur.strip():
        raise DebugError(f"bad address expression {text!r}")
    out.append((sign, cur.strip()))
    return out


__all__ = ["Session", "DebugError", "Position", "ViewError"]
