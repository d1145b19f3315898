"""The GDB remote-serial-protocol stub: framing (GDB manual, "Overview" of the
remote protocol: $data#checksum, modulo-256 sum, } escapes, 0x03), packets on a
real session, a fuzz test of the parser and the packet handler, and the
machine's real gdb driving it in batch mode."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devirt_emu.asm import build_image
from devirt_emu.debugger import Session
from devirt_emu.debugger.gdbstub import (ACK, BAD, INTERRUPT, NAK, PACKET, REGISTERS, GdbStub,
                                         PacketReader, frame, target_xml)

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guest_tests"


def packet(body: bytes) -> bytes:
    return b"$" + body + b"#" + f"{sum(body) & 0xFF:02x}".encode()


def test_framing():
    r = PacketReader()
    assert r.feed(b"+" + packet(b"qSupported:x") + b"-\x03") == [
        (ACK, ""), (PACKET, "qSupported:x"), (NAK, ""), (INTERRUPT, "")]
    # a packet split anywhere is completed by the next bytes
    raw = packet(b"m1000,4")
    assert r.feed(raw[:3]) == [] and r.feed(raw[3:]) == [(PACKET, "m1000,4")]
    # a wrong checksum is reported, a good packet after it still parses
    assert r.feed(b"$g#00" + packet(b"g")) == [(BAD, "checksum mismatch"), (PACKET, "g")]
    # } escapes the next byte XOR 0x20: "}\x03" is '#'
    assert r.feed(packet(b"X0,1:}\x03")) == [(PACKET, "X0,1:#")]
    assert frame("a#b") == packet(b"a}\x03b")


def test_target_description_is_xml_with_the_registers():
    import xml.etree.ElementTree as ET
    root = ET.fromstring(target_xml().split("?>", 1)[1].split(">", 1)[1])
    names = [r.get("name") for r in root.iter("reg")]
    assert names[:3] == ["rax", "rbx", "rcx"] and names[16:18] == ["rip", "eflags"]
    for want in ("cs", "ss", "fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
        assert want in names
    assert len(names) == len(REGISTERS)


@pytest.fixture(scope="module")
def vmx_stub():
    return GdbStub(Session(GUESTS / "lapic_timer.S", cores=2, arch="vmx", config="stock"))


def test_packets_on_a_session(vmx_stub):
    stub = vmx_stub
    s = stub.s
    sym = build_image(GUESTS / "lapic_timer.S").symbols["timer_handler"]
    assert "qXfer:features:read+" in stub.handle("qSupported:multiprocess+")
    assert stub.handle("qfThreadInfo") == "m1,2" and stub.handle("qsThreadInfo") == "l"
    assert stub.handle(f"Z0,{sym:x},1") == "OK"
    reply = stub.handle("c")
    m = re.fullmatch(r"T05thread:([0-9a-f]+);swbreak:;", reply)
    assert m, reply
    core = int(m.group(1), 16) - 1
    stub.handle(f"Hg{core + 1:x}")
    # register 16 is rip, little-endian hex of 8 bytes
    assert int.from_bytes(bytes.fromhex(stub.handle("p10")), "little") == sym
    g = stub.handle("g")
    assert len(g) == sum(bits // 4 for _, bits, _ in REGISTERS)
    # memory reads are the guest's linear view
    assert bytes.fromhex(stub.handle(f"m{sym:x},4")) == s.read_virtual(sym, 4, core=core)
    # P writes a register: rax
    assert stub.handle("P0=" + (0x1234).to_bytes(8, "little").hex()) == "OK"
    assert s.regs(core)["rax"] == 0x1234
    # step: push rbx is one byte (53)
    assert bytes.fromhex(stub.handle(f"m{sym:x},1")) == b"\x53"
    stub.handle(f"Hc{core + 1:x}")
    assert stub.handle("s").startswith(f"T05thread:{core + 1:x};")
    assert int.from_bytes(bytes.fromhex(stub.handle("p10")), "little") == sym + 1
    assert stub.handle("bs").startswith("T05")
    assert int.from_bytes(bytes.fromhex(stub.handle("p10")), "little") == sym
    assert stub.handle(f"z0,{sym:x},1") == "OK"
    out = bytes.fromhex(stub.handle("qRcmd," + b"why".hex())).decode()
    assert out.startswith("VM exit")
    out = bytes.fromhex(stub.handle("qRcmd," + b"vmcs PIN_BASED".hex())).decode()
    assert "PIN_BASED_EXT_INTR_MASK" in out
    out = bytes.fromhex(stub.handle("qRcmd," + b"continue".hex())).decode()
    assert out.startswith("error:")                       # monitor does not run the machine


@pytest.mark.parametrize("payload", ["m", "mzz,4", "m10", "Mzz", "M0,4:zz", "p", "pzz", "P1",
                                     "P0=12", "Z0", "Z0,zz,1", "Hq1", "Hg99", "s1234", "cZZ",
                                     "qXfer:features:read:target.xml:zz", "qRcmd,zz", "T",
                                     "qThreadExtraInfo,99", "G12z"])
def test_malformed_packets_get_an_error_reply(vmx_stub, payload):
    assert vmx_stub.handle(payload).startswith("E")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=300))
def test_fuzz_the_packet_reader(data, cut):
    r = PacketReader()
    events = r.feed(data[:cut]) + r.feed(data[cut:])
    for kind, payload in events:
        assert kind in (ACK, NAK, INTERRUPT, PACKET, BAD)
        assert isinstance(payload, str)


_STUB = None


def _native_stub():
    global _STUB
    if _STUB is None:
        _STUB = GdbStub(Session(GUESTS / "hello.S"))
    return _STUB


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet="gGpPmMzZHTqQ?vDX0123456789abcdefxyz,:;=#$}-+.", max_size=40))
def test_fuzz_the_packet_handler(payload):
    stub = _native_stub()
    if payload[:1] in ("k", "D", "s", "c", "b"):       # the run and end-of-session packets
        return
    reply = stub.handle(payload)
    assert isinstance(reply, str)
    frame(reply)                                        # every reply can be framed


def test_the_server_survives_garbage_on_the_wire():
    import socket
    import threading
    from devirt_emu.debugger.gdbstub import serve
    ports = []
    ready = threading.Event()
    t = threading.Thread(target=serve, args=(Session(GUESTS / "hello.S"), "127.0.0.1", 0),
                         kwargs={"ready": lambda p: (ports.append(p), ready.set())}, daemon=True)
    t.start()
    assert ready.wait(10)
    with socket.create_connection(("127.0.0.1", ports[0]), timeout=10) as c:
        def exchange(data: bytes, want: bytes) -> bytes:
            c.sendall(data)
            got = b""
            while want not in got:
                chunk = c.recv(65536)
                assert chunk, got
                got += chunk
            return got
        # noise between packets, a truncated packet, then a bad checksum: a '-'
        c.sendall(b"garbage\x00\xff$m10")
        assert exchange(b"#zz", b"-") .endswith(b"-")
        assert exchange(b"$g#00", b"-").endswith(b"-")
        # a malformed argument: acknowledged, and an error reply
        got = exchange(packet(b"mzz,4"), b"#")
        assert got.startswith(b"+$E01#")
        # the server still answers properly
        got = exchange(packet(b"qfThreadInfo"), b"#")
        assert b"$m1#" in got
        c.sendall(b"+" + packet(b"k"))
    t.join(10)
    assert not t.is_alive()


def test_interrupt_byte_stops_a_running_continue(tmp_path):
    import socket
    import threading
    import time
    from devirt_emu.debugger.gdbstub import serve
    guest = tmp_path / "spin.S"
    guest.write_text(".text\nguest_main:\n    nop\nspin:\n    jmp spin\n")
    ports = []
    ready = threading.Event()
    t = threading.Thread(target=serve, args=(Session(guest, max_ns=10**12), "127.0.0.1", 0),
                         kwargs={"ready": lambda p: (ports.append(p), ready.set())}, daemon=True)
    t.start()
    assert ready.wait(10)
    with socket.create_connection(("127.0.0.1", ports[0]), timeout=30) as c:
        c.sendall(packet(b"QStartNoAckMode"))
        got = b""
        while b"#" not in got:
            got += c.recv(4096)
        c.sendall(packet(b"c"))
        time.sleep(1.0)
        c.sendall(b"\x03")
        got = b""
        while b"#" not in got:
            got += c.recv(4096)
        assert got.startswith(b"$T02thread:1;"), got      # SIGINT, on core 0's thread
        c.sendall(packet(b"k"))
    t.join(10)


# --------------------------------------------------------------------------
# the machine's real gdb
# --------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("gdb") is None, reason="no gdb on this machine")
def test_real_gdb_drives_the_stub(tmp_path):
    syms = build_image(GUESTS / "lapic_timer.S").symbols
    handler, ticks = syms["timer_handler"], syms["ticks"]
    symfile = tmp_path / "syms.elf"
    server = subprocess.Popen(
        [sys.executable, "-m", "devirt_emu", "debug", str(GUESTS / "lapic_timer.S"),
         "--cores", "2", "--arch", "vmx", "--gdb", "127.0.0.1:0", "--gdb-symbols", str(symfile)],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        port = None
        for _ in range(5):
            line = server.stderr.readline()
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port, "the stub did not start"
        cmds = [
            f"symbol-file {symfile}", f"target remote 127.0.0.1:{port}",
            "info threads", "break timer_handler", "continue", "info registers rip",
            "x/2gx $rsp", "stepi", "p/x $pc", "info registers cr0 efer fs_base gs_base",
            "thread 2", "p/x $pc", "monitor why", "reverse-stepi", "p/x $pc",
            "delete", f"watch *(long*){ticks:#x}", "continue", "kill",
        ]
        args = ["gdb", "-batch", "-nx", "-ex", "set pagination off"]
        for c in cmds:
            args += ["-ex", c]
        p = subprocess.run(args, capture_output=True, text=True, timeout=120)
        out = p.stdout + p.stderr
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=10)
    assert re.search(r"\* 1 +Thread 1", out) and re.search(r" 2 +Thread 2", out), out
    assert f"Breakpoint 1 at {handler:#x}" in out
    assert re.search(r"hit Breakpoint 1, .*timer_handler", out), out
    assert re.search(rf"rip +{handler:#x} +{handler:#x} <timer_handler>", out), out
    # push rbx is one byte: stepi lands on timer_handler+1, reverse-stepi back on it
    pcs = re.findall(r"\$\d+ = (0x[0-9a-f]+)", out)
    assert int(pcs[0], 16) == handler + 1, out
    assert re.search(r"cr0 +0x8001\w+", out) and re.search(r"efer +0x500", out), out
    assert "VM exit" in out and "rule: devirt_emu.vmx.rules" in out
    # the breakpoint was hit on thread 2 (core 1): back on it by one instruction
    assert "hit Breakpoint 1" in out and "Thread 2 hit" in out
    assert int(pcs[1], 16) == handler + 1 and int(pcs[2], 16) == handler, out
    assert "Hardware watchpoint 2" in out and "New value" in out, out
