"""Self-modifying code executed as on hardware (SDM Vol. 3A "Self-Modifying Code"):
a store into code lands, and the instructions after it are fetched from the
modified bytes, also when the store is into the storing instruction itself or
into the next one; the sensitive instructions the store creates or destroys
exit, or no longer exit, as their new bytes say.  Under EPT as without it, and
a stepped run retires exactly what a free run does."""
from __future__ import annotations

import pytest

from devirt_emu.asm import build_image
from devirt_emu.machine import Machine
from devirt_emu.testing.vmx_case import SCRATCH_BASE, CaseRunner

EPT = [None, "identity"]
ZEROS = {SCRATCH_BASE: bytes(3 * 4096)}


@pytest.fixture(scope="module")
def runner():
    return CaseRunner()


@pytest.mark.parametrize("ept", EPT)
@pytest.mark.parametrize("k", [1, 2, 50, 2100])
def test_zeroed_memory_runs_as_add_that_stores_into_its_own_bytes(runner, ept, k):
    # 00 00 is "add [rax], al".  With RAX = SCRATCH_BASE + 1 and AL = 1 the first
    # one adds 1 to its own ModRM byte, and each later one adds 1 to that byte
    # again: after k of them it holds k (mod 256), RIP is 2k further on (2100 of
    # them cross into the next page), and each retired as one instruction
    r = runner.run(f"mov eax, {SCRATCH_BASE + 1}\nmov ecx, {SCRATCH_BASE}\njmp rcx",
                   max_steps=3 + k, ept=ept, memory=ZEROS)
    assert r.outcome == "no_exit" and r.no_exit.why == "step limit", r
    assert r.steps == 3 + k
    assert r.no_exit.guest_rip == SCRATCH_BASE + 2 * k
    assert runner.machine.mem.read(SCRATCH_BASE, 3) == bytes([0, k & 0xFF, 0])


@pytest.mark.parametrize("ept", EPT)
def test_a_store_that_writes_cpuid_over_the_next_instruction_makes_it_exit(runner, ept):
    r = runner.run("""
        lea rax, [rip + next]
        mov word ptr [rax], 0xA20F     # next: nop; nop -> cpuid (0F A2)
    next:
        nop
        nop
    """, ept=ept)
    assert r.outcome == "exit" and r.exit.name == "CPUID", r
    assert r.exit.guest_rip == r.symbols["next"]
    assert r.steps == 2


@pytest.mark.parametrize("ept", EPT)
def test_a_store_over_a_sensitive_instruction_that_ran_before_removes_it(runner, ept):
    # RDTSC (hooked, not exiting under these controls) runs once, then is
    # overwritten by NOP NOP: the second pass must leave EAX and EDX alone
    r = runner.run("""
        lea rdi, [rip + site]
        mov ecx, 2
    again:
        mov eax, 0x1234
        xor edx, edx
    site:
        rdtsc
        mov word ptr [rdi], 0x9090     # rdtsc (0F 31) -> nop; nop
        dec ecx
        jnz again
    """, ept=ept)
    assert r.outcome == "no_exit" and r.no_exit.why == "halted", r
    assert (r.no_exit.regs["rax"], r.no_exit.regs["rdx"]) == (0x1234, 0)
    assert r.steps == 2 + 6 + 7 + 1      # the second pass runs two NOPs; HLT retires


@pytest.mark.parametrize("ept", EPT)
def test_a_store_over_a_sensitive_instruction_before_it_runs_removes_it(runner, ept):
    # the page scan found the CPUID before the store changed it
    r = runner.run("""
        lea rax, [rip + site]
        mov word ptr [rax], 0x9090     # cpuid -> nop; nop
    site:
        cpuid
    """, ept=ept)
    assert r.outcome == "no_exit" and r.no_exit.why == "halted", r
    assert r.steps == 5                  # lea, mov, nop, nop, hlt


@pytest.mark.parametrize("ept", EPT)
def test_an_instruction_that_rewrites_its_own_immediate_runs_the_new_bytes(runner, ept):
    # "add byte ptr [rax + 3], imm8" with RAX at it adds imm8 to its own imm8:
    # fetched anew each pass the immediate goes 1 -> 2 -> 4 -> 8 (a processor that
    # kept running the first bytes would give 1 -> 2 -> 3 -> 4)
    r = runner.run("""
        lea rax, [rip + insn]
        mov ecx, 3
    again:
    insn:
        add byte ptr [rax + 3], 1
        dec ecx
        jnz again
        movzx ebx, byte ptr [rax + 3]
        cpuid
    """, ept=ept)
    assert r.outcome == "exit" and r.exit.name == "CPUID", r
    assert r.exit.regs["rbx"] == 8
    assert r.steps == 2 + 3 * 3 + 1


@pytest.mark.parametrize("ept", EPT)
@pytest.mark.parametrize("where", ["data", "later"])
def test_stores_into_the_code_page_retire_one_instruction_each(runner, ept, where):
    # a loop storing into its own page: into data after the code, or into the
    # immediate of an instruction later in the same basic block; each loop pass
    # retires 4 instructions whatever the store does to the engine's translations
    r = runner.run(f"""
        mov ecx, 300
    again:
        mov byte ptr [rip + {'data' if where == 'data' else 'later + 1'}], cl
        nop
    later:
        mov ebx, 0x11
        dec ecx
        jnz again
        cpuid
        .align 64
    data:
        .quad 0
    """, ept=ept)
    assert r.outcome == "exit" and r.exit.name == "CPUID", r
    assert r.steps == 1 + 300 * 5
    # the last store wrote CL = 1: into the MOV's immediate, it ran as mov ebx, 1
    assert r.exit.regs["rbx"] == (1 if where == "later" else 0x11)


SMC_GUEST = """
    lea rdi, [rip + insn]
    mov ecx, 40
again:
insn:
    add byte ptr [rdi + 3], 1        # its own immediate: 1, 2, 4, 8, ...
    mov byte ptr [rip + next + 1], cl    # the next instruction's immediate
next:
    mov edx, 0x55
    add r8, rdx
    dec ecx
    jnz again
    xor eax, eax
    ret
"""


def _summary(res):
    return (res.verdict, res.instructions, res.virtual_ns, res.events)


def test_a_self_modifying_guest_stepped_one_instruction_at_a_time_is_the_free_run(tmp_path):
    path = tmp_path / "smc.S"
    path.write_text(".text\nguest_main:\n" + SMC_GUEST)
    image = build_image(path)
    free = Machine()
    free.load_image(image)
    ref = free.run()
    assert ref.verdict == "pass"
    m = Machine()
    m.load_image(image)
    m.boot()
    n = 0
    while m.verdict is None:
        m.step(1)
        n += 1
    assert _summary(m.result()) == _summary(ref)
    assert [n] == ref.instructions
    assert m.cores[0].probe.gpr(8) == free.cores[0].probe.gpr(8)


CROSS_CORE = """
    test rdi, rdi
    jnz other
1:  cmp byte ptr [ran], 0             # core 0 waits until core 1 has run probe once
    je 1b
    lea rax, [rip + probe]
    {patch}
    mov byte ptr [patched], 1
2:  cmp byte ptr [done], 0
    je 2b
    xor eax, eax
    ret
other:
    call probe
    mov byte ptr [ran], 1
3:  call probe                        # until it runs the patched bytes
    {until}
    mov byte ptr [done], 1
    xor eax, eax
    ret
probe:
    mov eax, 1
    nop
    nop
    ret
.data
ran: .byte 0
patched: .byte 0
done: .byte 0
"""


def _cross_core(tmp_path, patch: str, until: str):
    path = tmp_path / "xmc.S"
    path.write_text(".text\nguest_main:\n" + CROSS_CORE.format(patch=patch, until=until))
    m = Machine(cores=2, max_ns=50_000_000)
    m.load_image(build_image(path))
    return m, m.run()


def test_a_store_by_one_core_into_code_another_core_runs_is_seen_by_it(tmp_path):
    # cross-modifying code (SDM Vol. 3A "Cross-Modifying Code"): core 1 keeps
    # calling probe, which core 0 (running from the same page) patches from
    # "mov eax, 1" to "mov eax, 0"; core 1 must come to run the new bytes
    m, res = _cross_core(tmp_path, "mov byte ptr [rax + 1], 0", "test eax, eax\n    jnz 3b")
    assert res.verdict == "pass", res


def test_a_sensitive_instruction_one_core_writes_is_caught_on_the_other(tmp_path):
    # core 0 turns probe's NOP NOP into CPUID; core 1 calls probe once more after
    # it sees the patch done.  The platform completes (and counts) each CPUID it
    # catches: core 1 counts more of them than in the same run with a patch that
    # writes NOP NOP again (the firmware's own CPUIDs are the same in both)
    until = "cmp byte ptr [patched], 0\n    je 3b\n    call probe"
    m, res = _cross_core(tmp_path, "mov word ptr [rax + 5], 0xA20F", until)
    ref, ref_res = _cross_core(tmp_path, "mov word ptr [rax + 5], 0x9090", until)
    assert res.verdict == ref_res.verdict == "pass", (res, ref_res)
    assert m.cores[1].events.get("CPUID", 0) > ref.cores[1].events.get("CPUID", 0)


def test_consecutive_cases_with_different_ept_rights_see_their_own(runner):
    # the case runner lets a case start with the EPT translations of the last case
    # with the same EPT (same tables): a case with other rights must not see them
    store = f"mov rax, {SCRATCH_BASE}\nmov qword ptr [rax], 1\ncpuid"
    rw = runner.run(store, ept="identity")
    ro = runner.run(store, ept=["identity", {SCRATCH_BASE: (SCRATCH_BASE, 1)}])
    again = runner.run(store, ept="identity")
    assert rw.exit.name == again.exit.name == "CPUID", (rw, again)
    assert ro.exit.name == "EPT_VIOLATION" and ro.exit.qualification & 0b10, ro   # a data write


@pytest.mark.parametrize("ept", EPT)
def test_every_step_limit_stops_after_exactly_that_many_instructions(runner, ept):
    # an unaligned store (two bytes at an odd address) into its own translation
    # block, after the instruction it patches: stopped after each number of
    # instructions, the case has retired exactly that many and RIP is at the
    # next one of the sequence the SDM gives (pass 2 runs the patched bytes)
    code = """
        lea rdi, [rip + site]
        mov ecx, 2
    again:
        mov eax, 0x1234
        xor edx, edx
    site:
        rdtsc
        mov word ptr [rdi], 0x9090     # rdtsc -> nop; nop
    after:
        dec ecx
    last:
        jnz again
    """
    first = runner.run(code, ept=ept, max_steps=1)
    s = first.symbols
    assert s["site"] % 2, "the patched address must be odd for this test"
    nop2 = s["site"] + 1
    store = s["site"] + 2
    rips = [s["again"] - 5, s["again"],                                   # after lea, mov ecx
            s["again"] + 5, s["site"], store, s["after"], s["last"],      # pass 1
            s["again"], s["again"] + 5, s["site"], nop2, store, s["after"], s["last"],
            s["last"] + 2]                                                # falls through
    for n, rip in enumerate(rips, start=1):
        r = runner.run(code, ept=ept, max_steps=n)
        assert (r.steps, r.no_exit.guest_rip) == (n, rip), (n, r)
