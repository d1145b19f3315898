"""The zero-exit property: a devirt-compliant guest program takes no VM exit
under KVM-devirt and ends as it does natively; under stock KVM it exits.

A :class:`DevirtProgram` is a list of :class:`Block`\\ s that every core runs
between ``steady_begin`` and ``steady_end`` (the machine's steady-state window,
see docs/guest-abi.md), using only what KVM-devirt passes through to a
devirtualized core: compute, memory, a page-table update (a 2 MiB alias
mapping written, used and removed, with INVLPG), the LAPIC timer (x2APIC
MSRs) with STI; HLT and the interrupt taken and EOIed, self-IPIs and IPIs to
the next core (the ICR MSR), PAUSE.  The window covers the whole program,
from guest_main's first instruction (after the firmware's devirtualization
request at the end of boot) to the last; the printing of the results comes
after it.

    >>> from devirt_emu.testing.zero_exit import Block, DevirtProgram, check_zero_exit
    >>> check_zero_exit(DevirtProgram((Block("compute", (3, 5)), Block("timer", (2000,)))), cores=2)

:func:`check_zero_exit` runs the program natively, under ``devirt`` and under
``stock`` and asserts the property; :func:`devirt_programs` is the hypothesis
strategy (``tests/test_toolkit_zero_exit.py`` is the shipped property test).
A user's own block is ``Block("custom", (asm,))``: Intel-syntax lines that may
use rax, rcx, rdx, rsi, rdi, r8-r11 (rbx holds this core's 256-byte slot, r12
the core id, r13 the number of cores; the slot's first 8 bytes are the
accumulator that is printed),
leave IF = 0, and touch nothing that exits under devirt.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Optional

__all__ = ["Block", "DevirtProgram", "devirt_programs", "run_program_text", "check_zero_exit",
           "STOCK_EXITING"]

SLOT = 256
ACC, MEM, IPIS, TIMERS, NEXT_IPIS = 0, 16, 200, 208, 216
IPI_VECTOR = 0x41                       # self-IPIs
NEXT_IPI_VECTOR = 0x42                  # IPIs from the previous core
TIMER_VECTOR = 0xEC                     # LOCAL_TIMER_VECTOR of firmware/defs.S
ALIAS_PD_INDEX = 0x100                  # 2 MiB pages at 512 MiB + core * 2 MiB: above RAM
#: Block kinds that exit under stock KVM (MSR writes of the timer or the ICR, HLT).
STOCK_EXITING = frozenset({"timer", "self_ipi", "next_ipi"})


@dataclass(frozen=True)
class Block:
    """One step of a devirt-compliant program: ``kind`` and its parameters.

    compute (a, b): acc = (acc * a + b) ^ core; memory (i, j): a store to the
    slot's word i and a load of word j into acc; page_table (k,): a 2 MiB alias
    of the slot's page, a store of k through it read back directly; timer
    (count,): a one-shot LAPIC timer, STI; HLT until it fired; self_ipi (): an
    IPI to this core taken after STI; next_ipi (): an IPI to the next core,
    waited for with interrupts on until that core took it; pause (); custom (asm,)."""

    kind: str
    params: tuple = ()

    def asm(self, label: str) -> str:
        k, p = self.kind, self.params
        if k == "compute":
            return (f"    mov rax, qword ptr [rbx + {ACC}]\n    imul rax, rax, {p[0]}\n"
                    f"    add rax, {p[1]}\n    xor rax, r12\n    mov qword ptr [rbx + {ACC}], rax\n")
        if k == "memory":
            return (f"    mov rax, qword ptr [rbx + {ACC}]\n    mov qword ptr [rbx + {MEM + 8 * p[0]}], rax\n"
                    f"    add rax, qword ptr [rbx + {MEM + 8 * p[1]}]\n    mov qword ptr [rbx + {ACC}], rax\n")
        if k == "page_table":
            return (f"    call zx_pd_entry\n"            # rax = address of this core's alias PDE
                    f"    mov rcx, rbx\n    and rcx, -0x200000\n    or rcx, 0x83\n"
                    f"    mov qword ptr [rax], rcx\n"
                    f"    mov rsi, r12\n    add rsi, {ALIAS_PD_INDEX}\n    shl rsi, 21\n"
                    f"    mov rdx, rbx\n    and rdx, 0x1FFFFF\n    add rsi, rdx\n"
                    f"    invlpg [rsi]\n"
                    f"    mov qword ptr [rsi + {MEM + 8 * 15}], {p[0]}\n"
                    f"    mov rdx, qword ptr [rbx + {MEM + 8 * 15}]\n"
                    f"    add qword ptr [rbx + {ACC}], rdx\n"
                    f"    mov qword ptr [rax], 0\n    invlpg [rsi]\n")
        if k == "timer":
            return (f"    mov r8, qword ptr [rbx + {TIMERS}]\n    cli\n"
                    f"    mov edi, {p[0]}\n    mov esi, {TIMER_VECTOR}\n    call timer_oneshot\n"
                    f"{label}:\n    sti\n    hlt\n    cli\n"
                    f"    cmp qword ptr [rbx + {TIMERS}], r8\n    je {label}\n")
        if k == "self_ipi":
            return (f"    cli\n    mov edi, r12d\n    mov esi, {IPI_VECTOR}\n    call send_ipi\n"
                    f"    sti\n    nop\n    cli\n")
        if k == "next_ipi":
            # wait, interrupts on, until the next core took it: a second IPI of one
            # vector while the first is still pending in IRR would be lost (SDM
            # vol. 3A "Interrupt Acceptance for Fixed Interrupts"), and the next
            # core may itself be waiting here, for its own successor
            return (f"    lea edi, [r12 + 1]\n    cmp edi, r13d\n    jb {label}\n    xor edi, edi\n"
                    f"{label}:\n    mov r9d, edi\n    imul r9, r9, {SLOT}\n    add r9, zx_slots\n"
                    f"    mov r10, qword ptr [r9 + {NEXT_IPIS}]\n"
                    f"    mov esi, {NEXT_IPI_VECTOR}\n    call send_ipi\n    sti\n"
                    f"{label}w:\n    pause\n    cmp qword ptr [r9 + {NEXT_IPIS}], r10\n"
                    f"    je {label}w\n    cli\n")
        if k == "pause":
            return "    pause\n"
        if k == "custom":
            return "\n".join("    " + line.strip() for line in p[0].splitlines()) + "\n"
        raise ValueError(f"no block kind {k!r}")


@dataclass(frozen=True)
class DevirtProgram:
    """Blocks every core runs in its steady-state window (see the module docstring)."""

    blocks: tuple

    def source(self) -> str:
        """The whole guest program (linked with the firmware by build_image)."""
        body = "".join(b.asm(f"zx_l{i}") for i, b in enumerate(self.blocks))
        return _TEMPLATE.format(body=body, slot=SLOT, acc=ACC, ipis=IPIS, timers=TIMERS,
                                next_ipis=NEXT_IPIS, ipi_vector=IPI_VECTOR,
                                next_vector=NEXT_IPI_VECTOR, timer_vector=TIMER_VECTOR,
                                alias=ALIAS_PD_INDEX,
                                expected_next=sum(b.kind == "next_ipi" for b in self.blocks))


_TEMPLATE = """\
# a devirt-compliant program of devirt_emu.testing.zero_exit
.text
guest_main:
    push rbx
    push r12
    push r13
    call steady_begin
    # core id
    mov r12, rdi
    # number of cores
    mov r13, rsi
    test r12, r12
    jnz 1f
    mov edi, {ipi_vector}
    mov rsi, zx_ipi_handler
    call set_handler
    mov edi, {timer_vector}
    mov rsi, zx_timer_handler
    call set_handler
    mov edi, {next_vector}
    mov rsi, zx_next_ipi_handler
    call set_handler
1:  call barrier
    mov rbx, r12
    imul rbx, rbx, {slot}
    add rbx, zx_slots
    mov qword ptr [rbx + {acc}], r12
{body}
    # take the previous core's last IPIs: it waits for them
    sti
2:  cmp qword ptr [rbx + {next_ipis}], {expected_next}
    jae 3f
    pause
    jmp 2b
3:  cli
    call steady_end
    # every core has closed its window before core 0 prints
    call barrier
    test r12, r12
    jnz 5f
    # core 0 prints every core's results
    xor r12d, r12d
4:  mov rbx, r12
    imul rbx, rbx, {slot}
    add rbx, zx_slots
    mov rdi, zx_msg_core
    call print
    mov rdi, r12
    call print_hex
    mov rdi, zx_msg_acc
    call print
    mov rdi, qword ptr [rbx + {acc}]
    call print_hex
    mov rdi, zx_msg_timers
    call print
    mov rdi, qword ptr [rbx + {timers}]
    call print_hex
    mov rdi, zx_msg_ipis
    call print
    mov rdi, qword ptr [rbx + {ipis}]
    call print_hex
    mov rdi, zx_msg_next
    call print
    mov rdi, qword ptr [rbx + {next_ipis}]
    call print_hex
    mov rdi, zx_msg_nl
    call print
    inc r12
    cmp r12, r13
    jb 4b
5:  xor eax, eax
    pop r13
    pop r12
    pop rbx
    ret

# rax = the PDE of this core's alias (PML4[0] -> PDPT[0] -> PD)
zx_pd_entry:
    mov rax, cr3
    and rax, -0x1000
    mov rax, qword ptr [rax]
    mov rcx, 0x000FFFFFFFFFF000
    and rax, rcx
    mov rax, qword ptr [rax]
    and rax, rcx
    lea rax, [rax + r12 * 8 + {alias} * 8]
    ret

zx_ipi_handler:
    call this_cpu
    imul rax, rax, {slot}
    add rax, zx_slots
    inc qword ptr [rax + {ipis}]
    jmp eoi

zx_next_ipi_handler:
    call this_cpu
    imul rax, rax, {slot}
    add rax, zx_slots
    inc qword ptr [rax + {next_ipis}]
    jmp eoi

zx_timer_handler:
    call this_cpu
    imul rax, rax, {slot}
    add rax, zx_slots
    inc qword ptr [rax + {timers}]
    jmp eoi

.rodata
zx_msg_core:   .asciz "core "
zx_msg_acc:    .asciz " acc "
zx_msg_timers: .asciz " timers "
zx_msg_ipis:   .asciz " ipis "
zx_msg_next:   .asciz " next "
zx_msg_nl:     .asciz "\\n"

.data
.balign 64
zx_slots: .fill 64 * {slot}, 1, 0
"""


def devirt_programs(*, max_blocks: int = 6):
    """Hypothesis strategy of :class:`DevirtProgram`: 1 to ``max_blocks`` blocks,
    at least one of which exits under stock (:data:`STOCK_EXITING`).  Shrinks to
    one timer block."""
    from hypothesis import strategies as st
    small = st.integers(0, 1 << 20)
    block = st.one_of(
        st.builds(lambda: Block("timer", (2000,))),
        st.builds(lambda a, b: Block("compute", (a, b)), st.integers(1, 1000), small),
        st.builds(lambda i, j: Block("memory", (i, j)), st.integers(0, 14), st.integers(0, 14)),
        st.builds(lambda k: Block("page_table", (k,)), st.integers(0, 0x7FFFFFFF)),
        st.integers(500, 20000).map(lambda n: Block("timer", (n,))),
        st.just(Block("self_ipi")),
        st.just(Block("next_ipi")),
        st.just(Block("pause")),
    )
    return (st.lists(block, min_size=1, max_size=max_blocks)
            .filter(lambda bs: any(b.kind in STOCK_EXITING for b in bs))
            .map(lambda bs: DevirtProgram(tuple(bs))))


def run_program_text(source: str, cores: int, arch: str = "none", config: Optional[str] = None,
                     **kwargs):
    """Assemble ``source`` with the firmware and run it; the RunResult."""
    from ..machine import run_program
    fd, path = tempfile.mkstemp(suffix=".S", prefix="zero_exit_")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        return run_program(path, cores=cores, arch=arch, config=config, **kwargs)
    finally:
        os.unlink(path)


def check_zero_exit(program: DevirtProgram, cores: int) -> None:
    """Assert the zero-exit property for ``program`` on ``cores`` cores: native,
    devirt and stock all pass with the same serial output; under devirt no VM
    exit in any core's window (and every core has closed its window); under
    stock the window has exits."""
    src = program.source()
    # (a program that hangs ends after 100 virtual ms, with verdict timeout)
    limits = {"max_ns": 100_000_000, "wall_timeout_s": 120.0}
    native = run_program_text(src, cores, **limits)
    assert native.verdict == "pass", f"native: {native.verdict} {native.message}\n{native.serial}"
    devirt = run_program_text(src, cores, "vmx", "devirt", record_exits=True, **limits)
    assert devirt.verdict == "pass", f"devirt: {devirt.verdict} {devirt.message}"
    assert all(len(w) == 1 and w[0][1] is not None for w in devirt.markers), devirt.markers
    in_window = [e for e in devirt.exits if e["in_window"]]
    assert devirt.window_exit_counts == {} and not in_window, (
        f"devirt exited in the window: {devirt.window_exit_counts}; first: {in_window[:3]}")
    assert devirt.serial == native.serial, f"devirt:\n{devirt.serial}\nnative:\n{native.serial}"
    stock = run_program_text(src, cores, "vmx", "stock", **limits)
    assert stock.verdict == "pass", f"stock: {stock.verdict} {stock.message}"
    assert stock.serial == native.serial, f"stock:\n{stock.serial}\nnative:\n{native.serial}"
    assert sum(stock.window_exit_counts.values()) > 0, "stock took no exit in the window"
