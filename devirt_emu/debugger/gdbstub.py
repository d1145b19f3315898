"""A GDB remote-serial-protocol server on a :class:`Session`.

Protocol facts are GDB's manual, appendix "GDB Remote Serial Protocol"
(packet framing ``$data#cc`` with a modulo-256 checksum, ``+``/``-``
acknowledgements, ``}`` escapes, the ``0x03`` interrupt byte, the packets
below and the stop-reply ``T`` format) and its "Target Descriptions" appendix
(the ``org.gnu.gdb.i386.core``, ``.sse`` and ``.segments`` features).

Served: qSupported, QStartNoAckMode, qXfer:features:read (target.xml),
``?``, g/G, p/P, m/M, Z0-Z4/z0-z4, s, c, bs, bc (reverse step/continue
through the session's replay), H g/c, qfThreadInfo/qsThreadInfo, qC, T,
qThreadExtraInfo, qAttached, qRcmd (``monitor CMD`` runs a REPL command that
does not run the machine: vmcs, exits, why, why-not, explain, ...), D, k.
One thread per core, thread id = core + 1.  Anything else gets the empty
reply ("not supported"); malformed arguments get ``E01``; a packet with a
bad checksum gets ``-``.

The x87 registers read as their reset values and the SSE registers as
Unicorn holds them; writes to them are ignored (the model has no FPU state
of interest).
"""
from __future__ import annotations

import io
import select
import socket
import threading
from typing import Callable, Optional

from unicorn import x86_const as X

from ..stepping import Stop, StopKind
from .session import DebugError, Session

# ---------------------------------------------------------------- framing
INTERRUPT = "interrupt"
PACKET = "packet"
ACK = "ack"
NAK = "nak"
BAD = "bad"        # a packet whose checksum did not match

MAX_PACKET = 0x4000


class PacketReader:
    """Incremental parser of the byte stream from GDB: ``feed(data)`` returns
    the events completed so far, as (kind, payload) pairs.  Never raises."""

    def __init__(self):
        self._buf = bytearray()
        self._in_packet = False

    def feed(self, data: bytes) -> list[tuple[str, str]]:
        out = []
        for b in data:
            if not self._in_packet:
                if b == 0x03:
                    out.append((INTERRUPT, ""))
                elif b == ord("+"):
                    out.append((ACK, ""))
                elif b == ord("-"):
                    out.append((NAK, ""))
                elif b == ord("$"):
                    self._in_packet = True
                    self._buf.clear()
                continue                       # anything else between packets: noise
            self._buf.append(b)
            n = len(self._buf)
            if n > MAX_PACKET + 3:
                self._in_packet = False
                out.append((BAD, "too long"))
                continue
            if n >= 3 and self._buf[-3] == ord("#") and not _escaped_at(self._buf, n - 3):
                body, cs = bytes(self._buf[:-3]), bytes(self._buf[-2:])
                self._in_packet = False
                try:
                    want = int(cs.decode("ascii"), 16)
                except (ValueError, UnicodeDecodeError):
                    out.append((BAD, "checksum is not hex"))
                    continue
                if sum(body) & 0xFF != want:
                    out.append((BAD, "checksum mismatch"))
                    continue
                out.append((PACKET, unescape(body).decode("latin-1")))
        return out


def _escaped_at(buf: bytearray, i: int) -> bool:
    """Is buf[i] the byte after an (unescaped) ``}``?"""
    n = 0
    j = i - 1
    while j >= 0 and buf[j] == ord("}"):
        n += 1
        j -= 1
    return n % 2 == 1


def unescape(body: bytes) -> bytes:
    out = bytearray()
    it = iter(body)
    for b in it:
        if b == ord("}"):
            nxt = next(it, None)
            if nxt is None:
                break
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def frame(payload: str) -> bytes:
    """``$payload#cc`` with ``$ # } *`` escaped."""
    raw = bytearray()
    for b in payload.encode("latin-1"):
        if b in (ord("$"), ord("#"), ord("}"), ord("*")):
            raw += bytes((ord("}"), b ^ 0x20))
        else:
            raw.append(b)
    return b"$" + bytes(raw) + b"#" + f"{sum(raw) & 0xFF:02x}".encode()


# ---------------------------------------------------------------- registers
#: (name, bits, reader kind): the order is GDB's register numbering.
REGISTERS: tuple = (
    *((n, 64, "gpr") for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
                               "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")),
    ("rip", 64, "rip"), ("eflags", 32, "rflags"),
    *((n, 32, "seg") for n in ("cs", "ss", "ds", "es", "fs", "gs")),
    *((f"st{i}", 80, "x87") for i in range(8)),
    *((n, 32, "x87") for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff",
                               "fop")),
    *((f"xmm{i}", 128, "xmm") for i in range(16)),
    ("mxcsr", 32, "mxcsr"),
    ("fs_base", 64, "msr"), ("gs_base", 64, "msr"), ("k_gs_base", 64, "msr"),
    ("cr0", 64, "cr"), ("cr2", 64, "cr"), ("cr3", 64, "cr"), ("cr4", 64, "cr"),
    ("cr8", 64, "cr"), ("efer", 64, "msr"),
)
_MSRS = {"fs_base": 0xC0000100, "gs_base": 0xC0000101, "k_gs_base": 0xC0000102,
         "efer": 0xC0000080}
_SEG_IDS = {"cs": X.UC_X86_REG_CS, "ss": X.UC_X86_REG_SS, "ds": X.UC_X86_REG_DS,
            "es": X.UC_X86_REG_ES, "fs": X.UC_X86_REG_FS, "gs": X.UC_X86_REG_GS}
_GPR_IDS = {n: getattr(X, f"UC_X86_REG_{n.upper()}") for n in
            ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
             "r12", "r13", "r14", "r15")}
_CR_IDS = {"cr0": X.UC_X86_REG_CR0, "cr2": X.UC_X86_REG_CR2, "cr3": X.UC_X86_REG_CR3,
           "cr4": X.UC_X86_REG_CR4}


def target_xml() -> str:
    def reg(name, bits, kind, extra=""):
        t = {"gpr": "int64", "rip": "code_ptr", "rflags": "i386_eflags", "seg": "int32",
             "x87": "i387_ext" if bits == 80 else "int", "xmm": "vec128", "mxcsr": "i386_mxcsr",
             "msr": "int64", "cr": "int64"}[kind]
        if name == "rsp" or name == "rbp":
            t = "data_ptr"
        return f'<reg name="{name}" bitsize="{bits}" type="{t}"{extra}/>'

    core = [reg(*r) for r in REGISTERS[:40]]
    sse = [reg(*r) for r in REGISTERS[40:57]]
    segs = [reg(*r) for r in REGISTERS[57:59]]
    sys = [reg(*r, extra=' group="system"') for r in REGISTERS[59:]]
    flags = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in (
        ("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9),
        ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19),
        ("VIP", 20), ("ID", 21)))
    vec = ('<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" '
           'count="2"/><vector id="v16i8" type="int8" count="16"/><vector id="v8i16" '
           'type="int16" count="8"/><vector id="v4i32" type="int32" count="4"/><vector '
           'id="v2i64" type="int64" count="2"/><union id="vec128"><field name="v4_float" '
           'type="v4f"/><field name="v2_double" type="v2d"/><field name="v16_int8" '
           'type="v16i8"/><field name="v8_int16" type="v8i16"/><field name="v4_int32" '
           'type="v4i32"/><field name="v2_int64" type="v2i64"/><field name="uint128" '
           'type="uint128"/></union><flags id="i386_mxcsr" size="4"><field name="IE" start="0" '
           'end="0"/></flags>')
    return ('<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
            '<target version="1.0"><architecture>i386:x86-64</architecture>'
            '<feature name="org.gnu.gdb.i386.core">'
            f'<flags id="i386_eflags" size="4">{flags}</flags>' + "".join(core) + '</feature>'
            f'<feature name="org.gnu.gdb.i386.sse">{vec}' + "".join(sse) + '</feature>'
            '<feature name="org.gnu.gdb.i386.segments">' + "".join(segs) + '</feature>'
            '<feature name="org.devirt-emu.x86.sys">' + "".join(sys) + '</feature></target>')


def read_register(core, index: int) -> bytes:
    name, bits, kind = REGISTERS[index]
    uc = core.uc
    if kind == "gpr":
        v = uc.reg_read(_GPR_IDS[name])
    elif kind == "rip":
        v = core.read_reg("rip")
    elif kind == "rflags":
        v = core.read_reg("rflags")
    elif kind == "seg":
        v = uc.reg_read(_SEG_IDS[name])
    elif kind == "x87":
        v = 0x37F if name == "fctrl" else (0xFFFF if name == "ftag" else 0)
    elif kind == "xmm":
        v = uc.reg_read(getattr(X, f"UC_X86_REG_{name.upper()}"))
    elif kind == "mxcsr":
        v = uc.reg_read(X.UC_X86_REG_MXCSR)
    elif kind == "msr":
        v = core.rdmsr_raw(_MSRS[name])
    else:
        v = core.read_reg(name)
    return (v & ((1 << bits) - 1)).to_bytes(bits // 8, "little")


def write_register(core, index: int, data: bytes) -> None:
    name, bits, kind = REGISTERS[index]
    v = int.from_bytes(data, "little")
    if kind in ("gpr", "rip", "rflags") or (kind == "cr" and name in _CR_IDS):
        if v != int.from_bytes(read_register(core, index), "little"):   # (G writes them all)
            write_named_register(core, name, v)
    # segments (their descriptor caches), MSRs, CR8, x87/SSE: not written from GDB


def write_named_register(core, name: str, value: int) -> None:
    """Write a GPR, RIP, RFLAGS (bit 1 stays 1) or CR0/CR2/CR3/CR4 of a stopped core."""
    uc = core.uc
    if name in _GPR_IDS:
        uc.reg_write(_GPR_IDS[name], value)
    elif name == "rip":
        uc.reg_write(X.UC_X86_REG_RIP, value)
    elif name in ("rflags", "eflags"):
        uc.reg_write(X.UC_X86_REG_EFLAGS, value | 2)
    elif name in _CR_IDS:
        uc.reg_write(_CR_IDS[name], value)
        if name != "cr2":
            core.after_mode_change()       # paging may differ: the scans are re-armed
    else:
        raise DebugError(f"register {name!r} cannot be written (GPRs, rip, rflags, cr0-cr4)")


# ---------------------------------------------------------------- the stub
class ProtocolError(ValueError):
    """A malformed packet argument: the reply is E01."""


def _hex(text: str) -> int:
    try:
        v = int(text, 16)
    except ValueError:
        raise ProtocolError(f"not hex: {text!r}") from None
    if v < 0:
        raise ProtocolError("negative")
    return v


def _thread(text: str) -> Optional[int]:
    """A thread id -> core index (None: any/all)."""
    if text in ("-1", "0", ""):
        return None
    if text.startswith("p"):          # multiprocess syntax pPID.TID
        text = text.split(".")[-1]
    return _hex(text) - 1


class GdbStub:
    """Packet handling on a Session, independent of the transport.

    ``handle(payload)`` returns the reply payload (None: no reply, for ``k``);
    the run packets call ``run(fn)``, which the server overrides to watch
    for the interrupt byte while the machine runs.
    """

    def __init__(self, session: Session):
        self.s = session
        self.g_core = 0
        self.c_core: Optional[int] = None
        self.no_ack = False
        self.z: dict[tuple[int, int, int], int] = {}      # (type, addr, kind) -> session id
        self.running_hook: Callable = lambda fn: fn()
        self.killed = False
        self.detached = False

    # ---- helpers
    def core(self, which: Optional[int] = None):
        i = self.g_core if which is None else which
        return self.s.machine.cores[i]

    def stop_reply(self, st: Optional[Stop]) -> str:
        s = self.s
        if st is None:
            return f"T05thread:{s.core + 1:x};"
        if st.kind is StopKind.VERDICT:
            status = s.machine.result().exit_status
            return f"W{status & 0xFF:02x}"
        self.g_core = st.core
        sig = "02" if st.kind is StopKind.INTERRUPTED else "05"
        extra = ""
        if st.kind is StopKind.BREAKPOINT:
            bp = s.breakpoints.get(st.ident) if st.ident is not None else None
            extra = "hwbreak:;" if bp is not None and bp.spec.startswith("hw:") else "swbreak:;"
        elif st.kind is StopKind.WATCHPOINT:
            wp = s.watchpoints.get(st.ident)
            kind = {"w": "watch", "r": "rwatch", "rw": "awatch"}[wp.access if wp else "w"]
            extra = f"{kind}:{st.address:x};"
        return f"T{sig}thread:{st.core + 1:x};{extra}"

    # ---- dispatch
    def handle(self, payload: str) -> Optional[str]:
        try:
            return self._handle(payload)
        except (ProtocolError, IndexError, KeyError):
            return "E01"
        except DebugError:
            return "E0E"
        except Exception:          # a bug of ours must not end the session
            return "E7F"

    def _handle(self, p: str) -> Optional[str]:
        if not p:
            return ""
        c = p[0]
        if c == "?":
            return self.stop_reply(self.s.last_stop if self.s.last_stop is not None and
                                   self.s.last_stop.kind is not StopKind.VERDICT else None)
        if c == "g":
            return "".join(read_register(self.core(), i).hex() for i in range(len(REGISTERS)))
        if c == "G":
            data = bytes.fromhex(p[1:]) if _is_hex(p[1:]) else None
            if data is None:
                raise ProtocolError("G: not hex")
            off = 0
            for i, (_, bits, _) in enumerate(REGISTERS):
                n = bits // 8
                if off + n > len(data):
                    break
                write_register(self.core(), i, data[off:off + n])
                off += n
            return "OK"
        if c == "p":
            i = _hex(p[1:])
            if i >= len(REGISTERS):
                return "E01"
            return read_register(self.core(), i).hex()
        if c == "P":
            num, _, val = p[1:].partition("=")
            i = _hex(num)
            if i >= len(REGISTERS) or not _is_hex(val) or len(val) != REGISTERS[i][1] // 4:
                return "E01"
            write_register(self.core(), i, bytes.fromhex(val))
            return "OK"
        if c == "m":
            addr, _, length = p[1:].partition(",")
            a, n = _hex(addr), _hex(length)
            if n > MAX_PACKET // 2:
                n = MAX_PACKET // 2
            try:
                return self.s.read_virtual(a, n, core=self.g_core).hex()
            except DebugError:
                return "E14"
        if c == "M":
            head, _, data = p[1:].partition(":")
            addr, _, length = head.partition(",")
            a, n = _hex(addr), _hex(length)
            if not _is_hex(data) or len(data) != 2 * n:
                return "E01"
            prev = self.s.core
            self.s.core = self.g_core
            try:
                self.s.write_virtual(a, bytes.fromhex(data))
            except DebugError:
                return "E14"
            finally:
                self.s.core = prev
            return "OK"
        if c in "Zz":
            return self._z(c == "Z", p[1:])
        if c == "H":
            op, tid = p[1:2], _thread(p[2:])
            if tid is not None and not 0 <= tid < self.s.cores:
                return "E01"
            if op == "g":
                self.g_core = self.s.core if tid is None else tid
            elif op == "c":
                self.c_core = tid
            else:
                return "E01"
            return "OK"
        if c == "T":
            tid = _thread(p[1:])
            return "OK" if tid is not None and 0 <= tid < self.s.cores else "E01"
        if c == "s":
            if len(p) > 1:
                raise ProtocolError("s with an address is not supported")
            core = self.c_core if self.c_core is not None else self.g_core
            return self._run(lambda: self._step(core))
        if c == "c":
            if len(p) > 1:
                raise ProtocolError("c with an address is not supported")
            return self._run(self.s.cont)
        if p == "bs":
            core = self.c_core if self.c_core is not None else self.g_core
            return self._run(lambda: self._reverse_step(core))
        if p == "bc":
            reply = self._run(self.s.reverse_cont)
            if self.s.at_history_begin and reply.startswith("T"):
                reply += "replaylog:begin;"       # GDB: no more reverse-execution history
            return reply
        if c == "D":
            self.detached = True
            return "OK"
        if c == "k":
            self.killed = True
            return None
        if c == "q" or c == "Q":
            return self._query(p)
        if p.startswith("vMustReplyEmpty") or p.startswith("vCont"):
            return ""
        return ""

    def _step(self, core: int) -> Stop:
        self.s.select_core(core)
        return self.s.stepi(1)

    def _reverse_step(self, core: int) -> Stop:
        self.s.select_core(core)
        return self.s.reverse_stepi(1)

    def _run(self, fn) -> str:
        if self.s.machine.verdict is not None:
            return f"W{self.s.machine.result().exit_status & 0xFF:02x}"
        st = self.running_hook(fn)
        return self.stop_reply(st)

    def _z(self, insert: bool, args: str) -> str:
        parts = args.split(",")
        if len(parts) < 3:
            raise ProtocolError("Z: type,addr,kind")
        t, a, k = _hex(parts[0]), _hex(parts[1]), _hex(parts[2].split(";")[0])
        if t > 4:
            return ""
        key = (t, a, k)
        if not insert:
            ident = self.z.pop(key, None)
            if ident is not None:
                self.s.delete(ident)
            return "OK"
        if key in self.z:
            return "OK"
        if t in (0, 1):
            ident = self.s.break_at(f"{a:#x}")
            if t == 1:
                self.s.breakpoints[ident].spec = f"hw:{a:#x}"
        else:
            if not 1 <= k <= 1 << 20:
                return "E01"
            ident = self.s.watch(f"{a:#x}", k, {2: "w", 3: "r", 4: "rw"}[t])
        self.z[key] = ident
        return "OK"

    def _query(self, p: str) -> str:
        s = self.s
        if p.startswith("qSupported"):
            return (f"PacketSize={MAX_PACKET:x};qXfer:features:read+;QStartNoAckMode+;"
                    "swbreak+;hwbreak+;ReverseStep+;ReverseContinue+")
        if p == "QStartNoAckMode":
            self.no_ack = True
            return "OK"
        if p.startswith("qXfer:features:read:"):
            rest = p[len("qXfer:features:read:"):]
            annex, _, span = rest.partition(":")
            if annex != "target.xml":
                return "E00"
            off, _, length = span.partition(",")
            o, n = _hex(off), _hex(length)
            xml = target_xml()
            chunk = xml[o:o + n]
            return ("l" if o + n >= len(xml) else "m") + chunk
        if p == "qfThreadInfo":
            return "m" + ",".join(f"{i + 1:x}" for i in range(s.cores))
        if p == "qsThreadInfo":
            return "l"
        if p == "qC":
            return f"QC{s.core + 1:x}"
        if p.startswith("qThreadExtraInfo,"):
            i = _thread(p.split(",", 1)[1])
            if i is None or not 0 <= i < s.cores:
                return "E01"
            c = s.machine.cores[i]
            return f"core {i} {c.state.value} at {s.where(c.rip())}".encode().hex()
        if p == "qAttached":
            return "1"
        if p.startswith("qRcmd,"):
            hexcmd = p[len("qRcmd,"):]
            if not _is_hex(hexcmd) or len(hexcmd) % 2:
                return "E01"
            return self.monitor(bytes.fromhex(hexcmd).decode("latin-1"))
        return ""

    def monitor(self, command: str) -> str:
        """``monitor CMD``: a REPL command that does not run the machine; its
        output goes back to GDB (hex of the text, then OK as the reply)."""
        from rich.console import Console
        from .repl import ALIASES, COMMANDS, Repl
        buf = io.StringIO()
        repl = Repl(self.s, Console(file=buf, width=160, highlight=False, color_system=None))
        word = command.strip().split(" ")[0].split("/")[0]
        cmd = COMMANDS.get(ALIASES.get(word, word))
        if cmd is not None and (cmd.running or cmd.name in ("restore", "restart", "quit")):
            repl.error(f"{cmd.name} runs the machine: use gdb's own commands "
                       "(continue, stepi, reverse-stepi)")
        else:
            prev = self.s.core
            self.s.core = self.g_core
            try:
                repl.execute(command)
            finally:
                self.s.core = prev
        text = buf.getvalue() or "\n"
        return text.encode("utf-8").hex()


def _is_hex(text: str) -> bool:
    return len(text) % 2 == 0 and all(ch in "0123456789abcdefABCDEF" for ch in text)


# ---------------------------------------------------------------- the server
class _Connection:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.reader = PacketReader()
        self.pending: list[tuple[str, str]] = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


def serve(session: Session, host: str = "127.0.0.1", port: int = 1234, *, log=None,
          ready: Optional[Callable[[int], None]] = None) -> int:
    """Listen on ``host:port`` (one GDB at a time) until GDB kills the target
    (``k``) or detaches; returns the exit status (0)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind((host, port))
    except OSError as e:
        if log is not None:
            print(f"devirt-emu: error: cannot listen on {host}:{port}: {e.strerror}", file=log)
        return 2
    srv.listen(1)
    bound = srv.getsockname()[1]
    if log is not None:
        print(f"devirt-emu: GDB stub listening on {host}:{bound} "
              f"(gdb -ex 'target remote {host}:{bound}')", file=log, flush=True)
    if ready is not None:
        ready(bound)
    stub = GdbStub(session)
    try:
        while not stub.killed:
            sock, _ = srv.accept()
            with sock:
                _session(stub, _Connection(sock))
            if stub.detached:
                break
    finally:
        srv.close()
    return 0


def _session(stub: GdbStub, conn: _Connection) -> None:
    stub.detached = False

    def run_watching_interrupt(fn):
        """Run ``fn`` in a worker thread; a 0x03 from GDB interrupts it."""
        result: list = []
        t = threading.Thread(target=lambda: result.append(_call(fn)), daemon=True)
        t.start()
        while t.is_alive():
            r, _, _ = select.select([conn.sock], [], [], 0.05)
            if r:
                data = conn.sock.recv(4096)
                if not data:
                    stub.s.interrupt()
                    t.join()
                    break
                for ev in conn.reader.feed(data):
                    if ev[0] == INTERRUPT:
                        stub.s.interrupt()
                    else:
                        conn.pending.append(ev)
        t.join()
        out = result[0] if result else None
        if isinstance(out, BaseException):
            raise out
        return out

    stub.running_hook = run_watching_interrupt
    while not stub.killed and not stub.detached:
        events, conn.pending = conn.pending, []
        if not events:
            try:
                data = conn.sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            events = conn.reader.feed(data)
        for kind, payload in events:
            if kind == BAD:
                conn.send(b"-")
                continue
            if kind != PACKET:
                continue                   # acks; an interrupt while stopped: nothing runs
            if not stub.no_ack:
                conn.send(b"+")
            reply = stub.handle(payload)
            if reply is not None:
                conn.send(frame(reply))
            if stub.killed or stub.detached:
                return


def _call(fn):
    try:
        return fn()
    except BaseException as e:          # handed back to the protocol thread
        return e
