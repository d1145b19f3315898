"""The debugger's command language and its REPL.

:class:`Repl` executes one command line at a time on a :class:`Session` and
prints with rich; :func:`interactive` reads lines with prompt_toolkit (history
across sessions, completion of commands, symbols and VMCS field names).  Each
command is one entry of :data:`COMMANDS` with its usage and help; bad input
prints one line (``error: ...``) and the session goes on.
"""
from __future__ import annotations

import os
import shlex
import signal
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.table import Table

from ..stepping import StopKind
from . import state as S
from .session import DebugError, Session
from .views import ViewError


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    help: str
    run: Callable
    aliases: tuple = ()
    running: bool = False       # runs the machine (Ctrl-C stops it)


COMMANDS: dict[str, Command] = {}
ALIASES: dict[str, str] = {}


def command(name: str, usage: str, help: str, aliases: tuple = (), running: bool = False):
    def deco(fn):
        COMMANDS[name] = Command(name, usage, help, fn, aliases, running)
        for a in aliases:
            ALIASES[a] = name
        return fn
    return deco


def _int(text: str, what: str = "number") -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise DebugError(f"not a {what}: {text!r}") from None


def _count(args: list[str], default: int = 1) -> int:
    if not args:
        return default
    if len(args) > 1:
        raise DebugError("one count at most")
    n = _int(args[0], "count")
    if n < 0:
        raise DebugError("a count is at least 0")
    return n


class Repl:
    """Executes command lines on a Session; ``console`` is where output goes."""

    def __init__(self, session: Session, console: Optional[Console] = None):
        self.s = session
        self.out = console or Console(highlight=False,
                                      width=None if os.isatty(1) else 160)
        self.errors = 0
        self.done = False

    # ------------------------------------------------------------------ dispatch
    def execute(self, line: str) -> None:
        line = line.strip()
        if not line or line.startswith("#"):
            return
        word, _, rest = line.partition(" ")
        fmt = ""
        if "/" in word:                 # x/8gx, xp/4w
            word, _, fmt = word.partition("/")
        name = ALIASES.get(word, word)
        cmd = COMMANDS.get(name)
        if cmd is None:
            self.error(f"unknown command {word!r} (try help)")
            return
        try:
            args = shlex.split(rest)
        except ValueError as e:
            self.error(f"{name}: {e}")
            return
        try:
            if cmd.running:
                self._with_ctrl_c(lambda: cmd.run(self, args, fmt) if fmt else cmd.run(self, args))
            elif fmt:
                cmd.run(self, args, fmt)
            else:
                cmd.run(self, args)
        except TypeError as e:
            if "positional argument" in str(e):
                self.error(f"{name}: bad arguments (usage: {cmd.usage})")
            else:
                raise
        except (DebugError, ViewError) as e:
            self.error(f"{name}: {e}")
        except (KeyError, ValueError) as e:
            self.error(f"{name}: {e.args[0] if e.args else e}")
        except Exception as e:          # a bug of ours: one line, the session goes on
            self.error(f"{name}: internal error: {type(e).__name__}: {e}")

    def _with_ctrl_c(self, fn) -> None:
        """Run ``fn`` with SIGINT stopping the machine instead of the process."""
        try:
            old = signal.signal(signal.SIGINT, lambda *_: self.s.interrupt())
        except ValueError:          # not the main thread
            old = None
        try:
            fn()
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)

    def error(self, text: str) -> None:
        self.errors += 1
        self.out.print(f"error: {text}", markup=False, highlight=False)

    def say(self, text: str) -> None:
        self.out.print(text, markup=False, highlight=False)

    def show_stop(self, st) -> None:
        s = self.s
        if s.dropped_writes:
            s.dropped_writes = False
            self.say("note: the replay ran the program as loaded: your register, memory and "
                     "VMCS writes since then are not in it")
        text = st.describe()
        sym = s.symbols.describe(st.rip)
        if sym:
            text += f" <{sym}>"
        if st.kind is StopKind.VERDICT:
            failure = s.entry_failure()
            if failure is not None and s.entry_failure_stop:
                core, f = failure
                s.select_core(core)
                text = (f"VM-entry failure on core {core}: {f.check}"
                        + (f" (field {f.field}: see vmcs {f.field})" if f.field else "")
                        + "; the L0 ended the run (verdict error)")
            elif s.machine.message:
                text += f" ({s.machine.message})"
        self.say(text)
        if st.kind is not StopKind.VERDICT:
            self._current_insn()

    def _current_insn(self) -> None:
        try:
            got = self.s.disas(count=1)
        except DebugError:
            return
        for addr, raw, mn, ops in got:
            self.say(f"=> {self.s.where(addr)}: {mn} {ops}")


# ---------------------------------------------------------------------- help
@command("help", "help [COMMAND]", "List the commands, or show one command's usage and help.",
         aliases=("h", "?"))
def _help(r: Repl, args):
    if args:
        name = ALIASES.get(args[0], args[0])
        cmd = COMMANDS.get(name)
        if cmd is None:
            raise DebugError(f"no command {args[0]!r}")
        alias = f"  (aliases: {', '.join(cmd.aliases)})" if cmd.aliases else ""
        r.say(f"usage: {cmd.usage}{alias}\n{cmd.help}")
        return
    t = Table(title="commands", show_lines=False)
    t.add_column("usage")
    t.add_column("what it does")
    for cmd in COMMANDS.values():
        t.add_row(cmd.usage, cmd.help.split(". ")[0].rstrip("."))
    r.out.print(t)


@command("quit", "quit", "Leave the debugger.", aliases=("q", "exit"))
def _quit(r: Repl, args):
    r.done = True


# ---------------------------------------------------------------------- execution
@command("stepi", "stepi [N]", "Execute N instructions (default 1) on the selected core; the "
         "other cores run as the deterministic schedule has them.", aliases=("si",), running=True)
def _stepi(r: Repl, args):
    r.show_stop(r.s.stepi(_count(args)))


@command("step", "step", "Execute one instruction on the selected core, into a CALL.",
         aliases=("s",), running=True)
def _step(r: Repl, args):
    r.show_stop(r.s.stepi(1))


@command("next", "next", "Execute one instruction on the selected core, over a CALL.",
         aliases=("n",), running=True)
def _next(r: Repl, args):
    r.show_stop(r.s.next())


@command("continue", "continue", "Run until a breakpoint, watchpoint, exit or vector stop, "
         "Ctrl-C, or the verdict.", aliases=("c", "cont"), running=True)
def _continue(r: Repl, args):
    r.show_stop(r.s.cont())


@command("until", "until ADDR", "Run until the selected core reaches ADDR (or another stop).",
         aliases=("u",), running=True)
def _until(r: Repl, args):
    if len(args) != 1:
        raise DebugError("usage: until ADDR")
    r.show_stop(r.s.until(args[0]))


@command("finish", "finish", "Run until the current function returns.", running=True)
def _finish(r: Repl, args):
    r.show_stop(r.s.finish())


@command("core", "core [N]", "Select the core that stepping and state commands act on "
         "(no argument: show the cores).", aliases=("thread",))
def _core(r: Repl, args):
    s = r.s
    if args:
        s.select_core(_int(args[0], "core number"))
    for c in s.machine.cores:
        mark = "*" if c.index == s.core else " "
        r.say(f"{mark} core {c.index}: {c.state.value}, {c.icount} instructions, "
              f"at {s.where(c.rip())}")


# ---------------------------------------------------------------------- breakpoints
def _core_opt(args: list[str]) -> tuple[list[str], Optional[int]]:
    if len(args) >= 2 and args[-2] == "core":
        return args[:-2], _int(args[-1], "core number")
    return args, None


@command("break", "break ADDR|SYMBOL [core N]", "Stop before the instruction at ADDR (a "
         "number, a symbol, symbol+offset, $reg) on any core or on core N.", aliases=("b",))
def _break(r: Repl, args):
    args, core = _core_opt(args)
    if len(args) != 1:
        raise DebugError("usage: break ADDR|SYMBOL [core N]")
    ident = r.s.break_at(args[0], core=core)
    r.say(f"breakpoint {ident} at {r.s.where(r.s.breakpoints[ident].address)}")


@command("tbreak", "tbreak ADDR|SYMBOL [core N]", "A breakpoint deleted when it is hit.")
def _tbreak(r: Repl, args):
    args, core = _core_opt(args)
    if len(args) != 1:
        raise DebugError("usage: tbreak ADDR|SYMBOL [core N]")
    ident = r.s.break_at(args[0], core=core, temporary=True)
    r.say(f"temporary breakpoint {ident} at {r.s.where(r.s.breakpoints[ident].address)}")


def _watch(r: Repl, args, access):
    physical = bool(args) and args[0] in ("-p", "-phys")
    if physical:
        args = args[1:]
    if not 1 <= len(args) <= 2:
        raise DebugError("usage: watch [-p] ADDR [SIZE]")
    size = _int(args[1], "size") if len(args) == 2 else 1
    ident = r.s.watch(args[0], size, access, physical=physical)
    wp = r.s.watchpoints[ident]
    where = f"guest-physical {wp.address:#x}" if physical else r.s.where(wp.address)
    r.say(f"watchpoint {ident} ({ {'w': 'write', 'r': 'read', 'rw': 'access'}[access]}) "
          f"on {where}+{size}")


@command("watch", "watch [-p] ADDR [SIZE]", "Stop after an instruction writes a byte of [ADDR, "
         "ADDR+SIZE) (linear addresses, every core; -p: guest-physical, which also sees the "
         "platform's own accesses such as interrupt frames).")
def _watch_w(r: Repl, args):
    _watch(r, args, "w")


@command("rwatch", "rwatch [-p] ADDR [SIZE]", "Stop after an instruction reads the range.")
def _watch_r(r: Repl, args):
    _watch(r, args, "r")


@command("awatch", "awatch [-p] ADDR [SIZE]", "Stop after an instruction reads or writes the range.")
def _watch_a(r: Repl, args):
    _watch(r, args, "rw")


@command("delete", "delete [ID]", "Delete breakpoint or watchpoint ID (no ID: all of them).",
         aliases=("d",))
def _delete(r: Repl, args):
    if len(args) > 1:
        raise DebugError("usage: delete [ID]")
    r.s.delete(_int(args[0], "breakpoint id") if args else None)


@command("info", "info breakpoints|registers|cores|stops|snapshots",
         "Show breakpoints and watchpoints, the registers, the cores, the exit and vector "
         "stops, or the snapshots.", aliases=("i",))
def _info(r: Repl, args):
    what = args[0] if args else ""
    s = r.s
    if what in ("breakpoints", "b", "break", "watchpoints"):
        if not s.breakpoints and not s.watchpoints:
            r.say("no breakpoints or watchpoints")
            return
        t = Table()
        for col in ("id", "type", "where", "core", "hits"):
            t.add_column(col)
        for i, bp in s.breakpoints.items():
            t.add_row(str(i), "tbreak" if bp.temporary else "break", s.where(bp.address),
                      "any" if bp.core is None else str(bp.core), str(bp.hits))
        for i, wp in s.watchpoints.items():
            t.add_row(str(i), {"w": "watch", "r": "rwatch", "rw": "awatch"}[wp.access],
                      f"{s.where(wp.address)}+{wp.size}", "any", str(wp.hits))
        r.out.print(t)
    elif what in ("registers", "r", "reg"):
        _regs(r, [])
    elif what in ("cores", "threads"):
        _core(r, [])
    elif what == "stops":
        r.say(s.exit_stops_text() if s.options["arch"] != "none" else "no VMX: no exit stops")
        r.say("vector stops: " + (", ".join(f"{v:#x}" for v in sorted(s.vector_stops)) or "none"))
        r.say("entry-failure stop: " + ("on" if s.entry_failure_stop else "off"))
    elif what == "snapshots":
        for name, p in s.snapshots.items():
            r.say(f"{name}: {p.total} instructions (per core {list(p.icounts)}), {p.exits} exits")
        if not s.snapshots:
            r.say("no snapshots")
    else:
        raise DebugError("info what? breakpoints, registers, cores, stops or snapshots")


@command("break-exit", "break-exit [REASON...|off]", "Stop at VM exits of these reasons (names "
         "such as MSR_WRITE or numbers; under SVM #VMEXIT codes such as MSR or IOIO; none: every "
         "exit; off: no longer), after the processor wrote the exit information and before the "
         "L0 handles it.")
def _break_exit(r: Repl, args):
    r.say(r.s.break_exit("off" if args == ["off"] else args))


@command("break-interrupt", "break-interrupt [VECTOR...|off]", "Stop when an interrupt or "
         "exception of these vectors has been delivered (the handler's first instruction is "
         "next); none: every vector.")
def _break_interrupt(r: Repl, args):
    if args == ["off"]:
        r.say(r.s.break_interrupt("off"))
    else:
        r.say(r.s.break_interrupt([_int(a, "vector") for a in args]))


@command("break-entry-failure", "break-entry-failure [off]", "Report a failed VM entry as a "
         "stop: the L0 ends the run there (verdict error) and the VMCS and the guest state stay "
         "for inspection.")
def _break_entry(r: Repl, args):
    if r.s.options["arch"] != "vmx":
        raise DebugError("break-entry-failure needs --arch vmx (under svm a failed VMRUN is "
                         "the #VMEXIT INVALID: break-exit INVALID)")
    r.s.entry_failure_stop = args != ["off"]
    r.say("entry-failure stop " + ("on" if r.s.entry_failure_stop else "off"))


# ---------------------------------------------------------------------- state
@command("regs", "regs", "GPRs, RIP, RFLAGS decoded, CR0/2/3/4/8 and EFER decoded, the "
         "segments with their descriptor caches, FS/GS base, GDTR and IDTR.",
         aliases=("registers",))
def _regs(r: Repl, args):
    s = r.s
    c = s.cur()
    regs = s.regs()
    t = Table(title=f"core {s.core}", show_header=False)
    t.add_column("a")
    t.add_column("b")
    t.add_column("c")
    t.add_column("d")
    names = list(regs)[:16]
    for i in range(0, 16, 2):
        t.add_row(names[i], f"{regs[names[i]]:#018x}", names[i + 1], f"{regs[names[i + 1]]:#018x}")
    r.out.print(t)
    r.say(f"rip    {regs['rip']:#018x} {s.symbols.describe(regs['rip'])}")
    r.say(f"rflags {regs['rflags']:#010x} [{S.rflags_text(regs['rflags'])}]")
    r.say(f"cr0    {regs['cr0']:#018x} [{S.bits_text(S.CR0_BITS, regs['cr0'])}]")
    r.say(f"cr2    {regs['cr2']:#018x}")
    r.say(f"cr3    {regs['cr3']:#018x}")
    r.say(f"cr4    {regs['cr4']:#018x} [{S.bits_text(S.CR4_BITS, regs['cr4'])}]")
    r.say(f"cr8    {regs['cr8']:#018x}")
    r.say(f"efer   {regs['efer']:#018x} [{S.bits_text(S.EFER_BITS, regs['efer'])}]")
    r.say(f"fs_base {regs['fs_base']:#x}  gs_base {regs['gs_base']:#x}  "
          f"kernel_gs_base {regs['kernel_gs_base']:#x}")
    for seg in S.segments(c):
        r.say(seg.describe())
    for name, (base, limit) in S.descriptor_tables(c).items():
        r.say(f"{name.upper()} base={base:#x} limit={limit:#x}")
    r.say(f"mode {c.code_size()}-bit, CPL {c.cpl()}, {c.state.value}, {c.icount} instructions")


_SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}


def _examine(r: Repl, args, fmt: str, physical: bool):
    if len(args) != 1:
        raise DebugError("usage: x/FMT ADDR (FMT: count, size b/h/w/g, format x/d/u/c/i/s)")
    count_text = "".join(ch for ch in fmt if ch.isdigit())
    letters = [ch for ch in fmt if not ch.isdigit()]
    count = int(count_text) if count_text else 1
    size, form = 4, "x"
    for ch in letters:
        if ch in _SIZES:
            size = _SIZES[ch]
        elif ch in "xduics":
            form = ch
        else:
            raise DebugError(f"bad format letter {ch!r} (sizes b h w g, formats x d u c i s)")
    if not 1 <= count <= 4096:
        raise DebugError("count is 1 .. 4096")
    s = r.s
    addr = s.resolve(args[0])
    if form == "i":
        if physical:
            raise DebugError("x/i takes a linear address (use x/i)")
        for a, raw, mn, ops in s.disas(addr, count):
            r.say(f"{s.where(a)}: {raw.hex():<20} {mn} {ops}")
        return
    read = s.read_physical if physical else s.read_virtual
    if form == "s":
        data = read(addr, min(256 * count, 4096))
        text = data.split(b"\0")[0].decode("latin-1")
        r.say(f"{addr:#x}: {text!r}")
        return
    if form == "c":
        size = 1
    data = read(addr, count * size)
    per_line = max(1, 16 // size)
    code = {1: "B", 2: "H", 4: "I", 8: "Q"}[size]
    values = struct.unpack(f"<{count}{code}", data)
    for i in range(0, count, per_line):
        chunk = values[i:i + per_line]
        if form == "x":
            text = " ".join(f"{v:#0{2 + 2 * size}x}" for v in chunk)
        elif form == "d":
            text = " ".join(str(v - (1 << 8 * size) if v >> (8 * size - 1) else v) for v in chunk)
        elif form == "u":
            text = " ".join(str(v) for v in chunk)
        else:
            text = " ".join(repr(chr(v)) for v in chunk)
        label = f"{addr + i * size:#x}" + ("" if physical else
                                             (f" <{s.symbols.describe(addr + i * size)}>"
                                              if s.symbols.describe(addr + i * size) else ""))
        r.say(f"{label}: {text}")


@command("x", "x/FMT ADDR", "Examine linear memory (through the guest's paging and the EPT): "
         "x/8gx $rsp, x/4i $rip, x/s msg; FMT = count, size (b h w g), format (x d u c i s).")
def _x(r: Repl, args, fmt: str = ""):
    _examine(r, args, fmt, False)


@command("xp", "xp/FMT ADDR", "Examine guest-physical memory (through the EPT when it is on; "
         "under SVM the L0's nested paging is the identity).")
def _xp(r: Repl, args, fmt: str = ""):
    _examine(r, args, fmt, True)


@command("disas", "disas [ADDR] [N]", "Disassemble N instructions (default 10) from ADDR "
         "(default: the selected core's RIP, marked =>), with symbols.", aliases=("disassemble",))
def _disas(r: Repl, args):
    if len(args) > 2:
        raise DebugError("usage: disas [ADDR] [N]")
    s = r.s
    addr = s.resolve(args[0]) if args else None
    n = _int(args[1], "count") if len(args) == 2 else 10
    if not 1 <= n <= 1000:
        raise DebugError("count is 1 .. 1000")
    rip = s.cur().rip()
    for a, raw, mn, ops in s.disas(addr, n):
        sym = s.symbols.lookup(a)
        if sym is not None and sym[1] == 0:
            r.say(f"{sym[0]}:")
        mark = "=>" if a == rip else "  "
        r.say(f"{mark} {a:#x}: {raw.hex():<20} {mn} {ops}")


@command("apic", "apic", "The selected core's local APIC registers, decoded.")
def _apic(r: Repl, args):
    t = Table(title=f"local APIC of core {r.s.core}")
    for col in ("register", "value", "decoded"):
        t.add_column(col)
    for name, value, text in S.apic_registers(r.s.cur().lapic):
        t.add_row(name, f"{value:#x}", text)
    r.out.print(t)


@command("page", "page ADDR", "The page walk of linear ADDR on the selected core, level by "
         "level, then the EPT (or, under SVM, the nested) walk of the guest-physical address "
         "when it is on.")
def _page(r: Repl, args):
    if len(args) != 1:
        raise DebugError("usage: page ADDR")
    s = r.s
    addr = s.resolve(args[0])
    w = s.page(addr)
    r.say(f"linear {addr:#x}: {w['mode']}")
    for lv in w["levels"]:
        where = f"{lv.entry_address:#x}" + (f" (host {lv.host_address:#x})"
                                            if lv.host_address not in (None, lv.entry_address)
                                            else "")
        r.say(f"  {lv.name:<15} at {where}: {lv.value:#018x} "
              f"[{S.bits_text(S.PTE_BITS, lv.value)}] -> {lv.value & 0xFFFFFFFFFF000:#x}")
    if w["fault"]:
        r.say(f"  {w['fault']}")
        return
    r.say(f"  guest-physical {w['gpa']:#x}" + (f" ({w['page_size'] >> 10} KiB page)"
                                                 if w.get("page_size") else ""))
    e = w["ept"]
    if e is not None:
        for step in e.path:
            r.say(f"  {step.name:<15} at {step.entry_pa:#x}: {step.entry:#018x} "
                  f"[{S.bits_text(S.EPT_BITS, step.entry)}]")
        if hasattr(e, "hpa"):
            r.say(f"  host-physical {e.hpa:#x} (EPT rights {e.rights:03b}b, "
                  f"memory type {e.memory_type})")
        else:
            r.say(f"  EPT: {type(e).__name__}")
    n = w.get("npt")
    if n is not None:
        for lv in n["levels"]:
            r.say(f"  {lv.name:<15} at {lv.entry_address:#x}: {lv.value:#018x} "
                  f"[{S.bits_text(S.PTE_BITS, lv.value)}]")
        if n["fault"]:
            r.say(f"  NPT: {n['fault']}")
        else:
            r.say(f"  host-physical {n['hpa']:#x} (NPT rights {n['rights']})")


@command("idt", "idt [FIRST [LAST]]", "The selected core's IDT: every present gate (of vectors "
         "FIRST..LAST).")
def _idt(r: Repl, args):
    if len(args) > 2:
        raise DebugError("usage: idt [FIRST [LAST]]")
    first = _int(args[0], "vector") if args else 0
    last = _int(args[1], "vector") if len(args) == 2 else (first if args else 255)
    if not 0 <= first <= last <= 255:
        raise DebugError("vectors are 0-255, FIRST <= LAST")
    for v, text in S.idt_entries(r.s.cur(), range(first, last + 1)):
        target = text.split(":")[-1].split()[0]
        sym = r.s.symbols.describe(int(target, 16)) if target.startswith("0x") else ""
        r.say(f"{v:#04x}: {text}" + (f" <{sym}>" if sym else ""))


@command("gdt", "gdt", "The selected core's GDT, one descriptor per line.")
def _gdt(r: Repl, args):
    for sel, text in S.gdt_entries(r.s.cur()):
        r.say(f"{sel:#06x}: {text}")


@command("symbols", "symbols [PATTERN]", "The symbols whose name contains PATTERN.")
def _symbols(r: Repl, args):
    pat = args[0] if args else ""
    for name in r.s.symbols.names():
        if pat in name:
            r.say(f"{r.s.symbols[name]:#x} {name}")


# ---------------------------------------------------------------------- virtualization
def _view_table(r: Repl, args, kind: str):
    if len(args) > 1:
        raise DebugError(f"usage: {kind} [GROUP|NAME]")
    view = r.s.need_view()
    if view.kind != kind:
        raise DebugError(f"core {r.s.core} has a {view.kind.upper()}, not a {kind.upper()}: "
                         f"use {view.kind}")
    rows = view.rows(args[0] if args else None)
    t = Table(title=f"{kind.upper()} of core {r.s.core}")
    for col in ("field", "value", "decoded"):
        t.add_column(col)
    for row in rows:
        t.add_row(row.name, f"{row.value:#x}", row.decoded)
    r.out.print(t)


@command("vmcs", "vmcs [GROUP|NAME]", "The selected core's VMCS by field name (GROUP: control, "
         "exit-info, guest, host; or part of a name), controls as named bits.")
def _vmcs(r: Repl, args):
    _view_table(r, args, "vmcs")


@command("vmcb", "vmcb [AREA|NAME]", "The selected core's VMCB by field name (AREA: control, "
         "save; or part of a name), intercept vectors as named bits (SVM cores only).")
def _vmcb(r: Repl, args):
    _view_table(r, args, "vmcb")


@command("set", "set FIELD|$REG VALUE", "Write a VMCS (or VMCB) field, or one control (or "
         "intercept) bit by its name (0 or 1): the processor uses it at the next VM entry, whose "
         "checks then apply; or a "
         "register of the selected core ($rax..$r15, $rip, $rflags, $cr0..$cr4).")
def _set(r: Repl, args):
    if len(args) != 2:
        raise DebugError("usage: set FIELD|$REG VALUE")
    value = _int(args[1], "value")
    if args[0].startswith("$"):
        r.s.write_register(args[0], value)
        r.say(f"{args[0]} = {value:#x}")
        return
    r.say(r.s.set_field(args[0], value))


@command("exits", "exits [core N] [reason R] [last N]", "The VM exits taken (the last 20 by "
         "default; last 0: all), filterable by core and reason.")
def _exits(r: Repl, args):
    if r.s.options["arch"] == "none":
        raise DebugError("the machine runs natively: no VM exits")
    opts = {"core": None, "reason": None, "last": "20"}
    if len(args) % 2:
        raise DebugError("usage: exits [core N] [reason R] [last N]")
    for k, v in zip(args[::2], args[1::2]):
        if k not in opts:
            raise DebugError(f"exits: unknown filter {k!r} (core, reason, last)")
        opts[k] = v
    core = _int(opts["core"], "core") if opts["core"] is not None else None
    recs = r.s.exits(core=core, reason=opts["reason"], last=_int(opts["last"], "count"))
    t = Table(title=f"{len(recs)} exits")
    svm = r.s.options["arch"] == "svm"
    for col in ("core", "exit code" if svm else "reason",
                "exit_info_1, exit_info_2" if svm else "qualification", "rip", "cause"):
        t.add_column(col)
    for rec in recs:
        if svm:
            t.add_row(str(rec.core), rec.name, f"{rec.exit_info_1:#x}, {rec.exit_info_2:#x}",
                      r.s.where(rec.rip), "; ".join(rec.cause))
        else:
            t.add_row(str(rec.core), rec.name + (" (entry failure)" if rec.entry_failure else ""),
                      f"{rec.qualification:#x}", r.s.where(rec.rip), "; ".join(rec.cause))
    r.out.print(t)


@command("why", "why", "For the selected core's last VM exit: the rule that fired and its "
         "exact cause (control bit, bitmap bit and its address, CR mask against shadow, "
         "exception bitmap and PFEC test).")
def _why(r: Repl, args):
    for line in r.s.why().lines():
        r.say(line)


@command("why-not", "why-not", "For the selected core's last sensitive instruction or "
         "exception that did not exit: why not.")
def _why_not(r: Repl, args):
    for line in r.s.why_not().lines():
        r.say(line)


@command("explain", "explain FIELD|CONTROL|REASON", "What a VMCS (or VMCB) field, a control "
         "(or intercept) bit or an exit reason is.")
def _explain(r: Repl, args):
    if len(args) != 1:
        raise DebugError("usage: explain FIELD|CONTROL|REASON")
    view = r.s.view()
    if view is None:
        raise DebugError("the machine runs natively: explain needs --arch vmx or svm")
    r.say(view.explain(args[0]))


# ---------------------------------------------------------------------- time travel
@command("snapshot", "snapshot NAME", "Remember the current point of the run as NAME.")
def _snapshot(r: Repl, args):
    if len(args) != 1:
        raise DebugError("usage: snapshot NAME")
    p = r.s.snapshot(args[0])
    r.say(f"snapshot {args[0]}: {p.total} instructions, {p.exits} exits")


@command("restore", "restore NAME", "Go back (or forward) to snapshot NAME: the run is "
         "replayed from boot to that point.")
def _restore(r: Repl, args):
    if len(args) != 1:
        raise DebugError("usage: restore NAME")
    r.s.restore(args[0])
    r.show_stop(r.s.last_stop)


@command("reverse-stepi", "reverse-stepi [N]", "Go N instructions (default 1) back on the "
         "selected core.", aliases=("rsi",), running=True)
def _rsi(r: Repl, args):
    r.show_stop(r.s.reverse_stepi(_count(args) or 1))


@command("reverse-continue", "reverse-continue", "Go back to the last breakpoint, watchpoint, "
         "exit or vector stop before this point (or to the start).", aliases=("rc",),
         running=True)
def _rc(r: Repl, args):
    r.show_stop(r.s.reverse_cont())


@command("restart", "restart", "Back to the boot state (breakpoints and stops stay).")
def _restart(r: Repl, args):
    r.s.restart()
    r.say("at the start")


# ---------------------------------------------------------------------- the prompt
def history_path() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return Path(base) / "devirt-emu" / "debug_history"


def completion_words(s: Session) -> list[str]:
    words = list(COMMANDS) + list(ALIASES) + s.symbols.names()
    view = s.view()
    if view is not None:
        words += view.field_names()
    return words


def interactive(repl: Repl) -> None:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(path))
    except OSError:
        history = InMemoryHistory()
    completer = WordCompleter(completion_words(repl.s), WORD=True)
    ps = PromptSession(history=history, completer=completer)
    while not repl.done:
        try:
            line = ps.prompt("(devirt) ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            break
        repl.execute(line)
