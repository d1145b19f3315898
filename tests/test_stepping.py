"""The machine's stepping API: exact steps, breakpoints, watchpoints, stops on
VM exits and vectors, interrupt(), and that a stepped run is the free run."""
from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest
from unicorn import x86_const as X

from devirt_emu.asm import build_image
from devirt_emu.machine import Machine
from devirt_emu.stepping import StopKind
from devirt_emu.vmx.fields import VmcsField as F

GUESTS = Path(__file__).resolve().parent.parent / "guest_tests"
PASS_RET = "    xor eax, eax\n    ret\n"


def machine(source: str | Path, tmp_path=None, **kw) -> tuple[Machine, dict]:
    if isinstance(source, str):
        path = tmp_path / "guest.S"
        path.write_text(".text\nguest_main:\n" + source)
    else:
        path = source
    image = build_image(path)
    m = Machine(**kw)
    m.load_image(image)
    m.boot()
    return m, image.symbols


def summary(res):
    return (res.verdict, res.serial, res.instructions, res.virtual_ns, res.events,
            res.exit_counts)


@pytest.mark.parametrize("cores", [1, 4])
def test_step_retires_exactly_n_instructions_on_the_chosen_core(cores):
    m, _ = machine(GUESTS / "spinlock.S", cores=cores)
    for i, n in enumerate([1, 1, 7, 1000, 1, 12345, 3]):
        k = i % cores
        before = [c.icount for c in m.cores]
        s = m.step(n, core=k)
        assert s.kind is StopKind.STEP and s.core == k
        assert m.cores[k].icount - before[k] == n
        assert s.rip == m.cores[k].rip()
    assert m.step(0, core=0).kind is StopKind.STEP


@pytest.mark.parametrize("cores", [1, 4])
def test_a_stepped_run_is_the_free_run(cores):
    free = Machine(cores=cores)
    free.load_image(build_image(GUESTS / "spinlock.S"))
    ref = free.run()
    m, _ = machine(GUESTS / "spinlock.S", cores=cores)
    i = 0
    while m.verdict is None:
        m.step([1, 777, 3, 2001][i % 4], core=i % cores)
        i += 1
    assert i > 5
    assert summary(m.result()) == summary(ref)
    # in slices of the whole machine's instructions
    m, _ = machine(GUESTS / "spinlock.S", cores=cores)
    i = 0
    while m.verdict is None:
        m.run_until(max_instructions=[997, 1, 5003][i % 3])
        i += 1
    assert i > 30
    assert summary(m.result()) == summary(ref)


def test_stops_then_continuing_give_the_free_run_under_vmx():
    free = Machine(cores=2, arch="vmx", config="stock")
    free.load_image(build_image(GUESTS / "lapic_timer.S"))
    ref = free.run()
    m, syms = machine(GUESTS / "lapic_timer.S", cores=2, arch="vmx", config="stock")
    m.add_breakpoint(syms["timer_handler"])
    m.stop_on_exit("all")
    kinds = set()
    while m.verdict is None:
        kinds.add(m.run_until().kind)
    assert {StopKind.BREAKPOINT, StopKind.VM_EXIT} <= kinds
    assert summary(m.result()) == summary(ref)


def test_stops_on_hlt_exits_in_an_interrupt_shadow_give_the_free_run():
    # ipi_pingpong's cores wait with STI; HLT: the HLT exit is taken in STI's interrupt
    # shadow, at the boundary where the core steps the shadowed instruction alone, and the
    # stop there must leave the HLT to the L0 once (it must not also be executed natively)
    free = Machine(cores=2, arch="vmx", config="stock")
    free.load_image(build_image(GUESTS / "ipi_pingpong.S"))
    ref = free.run()
    m, _ = machine(GUESTS / "ipi_pingpong.S", cores=2, arch="vmx", config="stock")
    m.stop_on_exit({12})                                 # EXIT_REASON_HLT
    stops = 0
    while m.verdict is None:
        s = m.run_until()
        if s.kind is StopKind.VM_EXIT:
            assert s.reason == 12 and m.cores[s.core].read_linear(s.rip, 1, peek=True) == b"\xf4"
            stops += 1
    assert stops == ref.exit_counts["HLT"]
    assert summary(m.result()) == summary(ref)


def test_breakpoint_stops_before_the_instruction_and_continuing_executes_it(tmp_path):
    m, syms = machine("""
    mov eax, 1
target:
    mov eax, 2
after:
""" + PASS_RET, tmp_path)
    bp = m.add_breakpoint(syms["target"])
    s = m.run_until()
    assert (s.kind, s.ident, s.rip) == (StopKind.BREAKPOINT, bp, syms["target"])
    core = m.cores[0]
    assert core.uc.reg_read(X.UC_X86_REG_RAX) == 1          # not executed yet
    s = m.step(1)
    assert s.kind is StopKind.STEP and s.rip == syms["after"]
    assert core.uc.reg_read(X.UC_X86_REG_RAX) == 2
    assert m.run_until().kind is StopKind.VERDICT and m.verdict == "pass"


def test_breakpoints_survive_disarm_rearm_and_self_modifying_code(tmp_path):
    # the function with the breakpoint lives on its own page; between calls a long
    # compute phase on another page makes the core disarm idle pages, a CR3 reload
    # re-arms every page, and a store rewrites the function's own page
    m, syms = machine("""
    push rbx
    call func
    mov ecx, 300000
1:  dec ecx
    jnz 1b
    call func
    mov rax, cr3
    mov cr3, rax
    call func
    lea rax, [rip + patched]
    mov byte ptr [rax + 1], 5       # patched: mov eax, 1 -> mov eax, 5
    call func
    pop rbx
    cmp eax, 5
    jne 2f
""" + PASS_RET + """
2:  mov eax, 1
    ret
.balign 4096
func:
patched:
    mov eax, 1
    ret
""", tmp_path)
    m.add_breakpoint(syms["func"])
    hits = []
    while m.verdict is None:
        s = m.run_until()
        if s.kind is StopKind.BREAKPOINT:
            hits.append(s.rip)
    assert m.verdict == "pass", m.message
    assert hits == [syms["func"]] * 4


def test_removed_breakpoint_no_longer_stops(tmp_path):
    m, syms = machine("call f\n    call f\n" + PASS_RET + "f:  ret\n", tmp_path)
    bp = m.add_breakpoint(syms["f"])
    assert m.run_until().kind is StopKind.BREAKPOINT
    m.remove_breakpoint(bp)
    assert m.run_until().kind is StopKind.VERDICT
    assert m.verdict == "pass"
    with pytest.raises(ValueError):
        m.add_breakpoint(-1)


@pytest.mark.parametrize("access, after, kind", [("w", "after_store", "write"),
                                                  ("r", "after_load", "read")])
def test_watchpoint_stops_after_the_accessing_instruction(tmp_path, access, after, kind):
    m, syms = machine("""
    mov qword ptr [value], 5
after_store:
    mov rax, qword ptr [value]
after_load:
    add rax, 1
""" + PASS_RET + """
.data
value: .quad 0
""", tmp_path)
    wp = m.add_watchpoint(syms["value"], 8, access)
    s = m.run_until()
    assert (s.kind, s.ident, s.access, s.address) == (StopKind.WATCHPOINT, wp, kind, syms["value"])
    assert s.rip == syms[after]
    assert m.mem.read(syms["value"], 8) == struct.pack("<Q", 5)   # the store has happened
    m.remove_watchpoint(wp)
    assert m.run_until().kind is StopKind.VERDICT and m.verdict == "pass"


@pytest.mark.parametrize("access, after, kind", [("w", "after_store", "write"),
                                                  ("r", "after_load", "read")])
def test_physical_watchpoint_stops_after_the_accessing_instruction(tmp_path, access, after, kind):
    # the store and the load go through a second linear mapping of the page (the
    # firmware maps RAM 1:1, and the guest aliases the page 1 GiB higher), which a
    # linear watch on the page's own address would not see
    m, syms = machine("""
    mov rax, value
    add rax, 0x40000000
    mov qword ptr [rax], 5
after_store:
    mov rbx, qword ptr [rax]
after_load:
""" + PASS_RET + """
.data
.balign 4096
value: .quad 0
""", tmp_path)
    pa = syms["value"]
    # once the firmware has built its page tables (1:1, 2 MiB pages), alias the first
    # GiB at 1 GiB: PDPT[1] = PDPT[0] (RAM is 64 MiB, so nothing else maps there)
    m.add_breakpoint(syms["guest_main"])
    assert m.run_until().kind is StopKind.BREAKPOINT
    assert pa < 1 << 30 and m.mem.size <= 1 << 30
    pdpt = syms["fw_pdpt"]
    m.mem.write(pdpt + 8, m.mem.read(pdpt, 8))
    wp = m.add_watchpoint(pa, 8, access, physical=True)
    assert m.watchpoints()[wp] == (pa, 8, access, True)
    s = m.run_until()
    assert (s.kind, s.ident, s.access, s.address) == (StopKind.WATCHPOINT, wp, kind, pa)
    assert s.rip == syms[after]
    assert m.mem.read(pa, 8) == struct.pack("<Q", 5)
    m.remove_watchpoint(wp)
    assert m.cores[0].watched_pages() == frozenset()
    assert m.run_until().kind is StopKind.VERDICT and m.verdict == "pass"


def test_physical_watchpoint_sees_the_platforms_pushes_of_an_interrupt_frame(tmp_path):
    # INT 0x40 in 64-bit mode: the core pushes SS, RSP, RFLAGS, CS and RIP onto the
    # stack (SDM "64-Bit Mode Stack Frame"); the first push, SS, is the 8 bytes below
    # the stack top.  A linear watchpoint does not see the platform's accesses, a
    # physical one does: the run stops after the delivery, in the handler.
    source = """
    push rbx
    mov edi, 0x40
    mov rsi, handler
    call set_handler
    mov rbx, rsp
    mov rsp, stack_top
    int 0x40
after_int:
    mov rsp, rbx
    pop rbx
""" + PASS_RET + """
handler:
    ret
.data
.balign 4096
stack: .space 4096
stack_top:
"""
    m, syms = machine(source, tmp_path)
    top = syms["stack_top"]
    m.add_watchpoint(top - 8, 8, "w")                   # linear: not seen
    assert m.run_until().kind is StopKind.VERDICT and m.verdict == "pass"
    m, syms = machine(source, tmp_path)
    wp = m.add_watchpoint(top - 8, 8, "w", physical=True)
    s = m.run_until()
    assert (s.kind, s.ident, s.access) == (StopKind.WATCHPOINT, wp, "write")
    assert top - 8 <= s.address < top
    assert m.mem.read(top - 16, 8) == struct.pack("<Q", top)    # the old RSP is pushed: done
    m.remove_watchpoint(wp)
    assert m.run_until().kind is StopKind.VERDICT and m.verdict == "pass"


def test_physical_watchpoint_errors(tmp_path):
    m, syms = machine("    nop\n" + PASS_RET, tmp_path)
    m.add_breakpoint(syms["guest_main"])
    assert m.run_until().kind is StopKind.BREAKPOINT
    m.step(1)                                             # its page is fetched from: code
    with pytest.raises(ValueError, match="outside RAM"):
        m.add_watchpoint(m.mem.size, 4, "w", physical=True)
    with pytest.raises(ValueError, match="holds code"):
        m.add_watchpoint(syms["guest_main"], 1, "r", physical=True)
    with pytest.raises(ValueError, match="access must be"):
        m.add_watchpoint(0x1000, 1, "x", physical=True)


def test_stop_on_a_vm_exit_reason_comes_before_the_l0_handles_it():
    m, _ = machine(GUESTS / "hello.S", cores=1, arch="vmx", config="stock")
    m.stop_on_exit({10})                                # EXIT_REASON_CPUID
    s = m.run_until()
    assert (s.kind, s.reason, s.name) == (StopKind.VM_EXIT, 10, "CPUID")
    core = m.cores[0]
    vmcs = core.virt.vmcs
    assert vmcs.peek(F.VM_EXIT_REASON) == 10
    assert vmcs.peek(F.VM_EXIT_INSTRUCTION_LEN) == 2
    # the L0 has not emulated it: RIP is still at the CPUID (0F A2)
    assert core.read_linear(core.rip(), 2) == b"\x0f\xa2" and s.rip == core.rip()
    first = core.rip()
    s2 = m.run_until()
    assert s2.kind is StopKind.VM_EXIT and s2.reason == 10
    assert m.exit_counts["CPUID"] == 2
    m.stop_on_exit(None)
    assert m.run_until().kind is StopKind.VERDICT and m.verdict == "pass"
    assert first != 0


def test_stop_on_an_interrupt_vector_enters_the_handler():
    m, _ = machine(GUESTS / "lapic_timer.S", cores=1)
    m.stop_on_vector({0xEC})                            # LOCAL_TIMER_VECTOR
    s = m.run_until()
    assert s.kind is StopKind.VECTOR and s.vector == 0xEC
    core = m.cores[0]
    _, base, _, _ = core.uc.reg_read(X.UC_X86_REG_IDTR)
    lo, hi = struct.unpack("<QQ", core.read_linear(base + 0xEC * 16, 16))
    handler = (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF0000) | ((hi & 0xFFFFFFFF) << 32)
    assert s.rip == handler
    assert not core.uc.reg_read(X.UC_X86_REG_EFLAGS) & 0x200       # interrupt gate: IF=0
    with pytest.raises(ValueError):
        m.stop_on_vector({256})


def test_instruction_and_time_limits():
    m, _ = machine(GUESTS / "spinlock.S", cores=2)
    s = m.run_until(max_instructions=50_000)
    assert s.kind is StopKind.INSTRUCTIONS and sum(c.icount for c in m.cores) == 50_000
    limit = max(c.clock for c in m.cores) + 20_000
    s = m.run_until(until_ns=limit)
    assert s.kind is StopKind.TIME
    assert min(c.clock for c in m.cores if c.state.name == "RUNNING") >= limit


def test_interrupt_from_another_thread(tmp_path):
    m, _ = machine("1:  jmp 1b\n", tmp_path, wall_timeout_s=60)
    threading.Timer(0.3, m.interrupt).start()
    s = m.run_until()
    assert s.kind is StopKind.INTERRUPTED and m.verdict is None
    assert m.result().verdict == "running"


def test_exit_records_are_bounded_and_counts_complete():
    m, _ = machine(GUESTS / "ipi_pingpong.S", cores=2, arch="vmx", config="stock",
                   record_exits=100)
    res = m.run()
    assert len(res.exits) == 100
    assert res.exits_dropped == sum(res.exit_counts.values()) - 100 > 0
    assert len(m.recent_exits) == m.recent_exits.maxlen


def test_the_architecture_docs_example_runs(monkeypatch):
    root = GUESTS.parent
    text = (root / "docs" / "architecture.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(root)
    scope: dict = {}
    exec(compile(code, "docs/architecture.md", "exec"), scope)
    m = scope["m"]
    assert m.verdict == "pass"
    assert scope["stop"].kind in (StopKind.STEP, StopKind.BREAKPOINT, StopKind.VM_EXIT)
