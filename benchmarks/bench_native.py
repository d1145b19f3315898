#!/usr/bin/env python3
"""Native-machine speed, measured side by side in one run.

The same 64-bit guest compute loop (paging on: identity 2 MiB pages, the
fresh state of devirt_emu.platform.longmode) runs on:

1. raw Unicorn, free-running                    -> MIPS
2. devirt-emu fast mode (one core)              -> MIPS and ratio to 1.
3. raw Unicorn with emu_start(count=N)          -> MIPS
4. devirt-emu deterministic mode (one core)     -> MIPS and ratio to 3.

then an MSR- and port-heavy loop (RDMSR of IA32_TSC, an OUT and an IN to an
empty port, each a sensitive event the platform handles in Python) on
devirt-emu deterministic mode -> sensitive events per second.

MIPS are computed from the loop's own instruction count, the same for every
row.  Targets (issue 2): fast >= 0.8x raw, deterministic >= 0.8x count mode.

    python benchmarks/bench_native.py [--iterations N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc  # noqa: E402
from unicorn import x86_const as X  # noqa: E402

from devirt_emu.asm import assemble  # noqa: E402
from devirt_emu.machine import Machine  # noqa: E402
from devirt_emu.platform import longmode as LM  # noqa: E402

CODE_BASE = 0x200000
COMPUTE = """
    mov rcx, {n}
1:  add rax, rcx
    xor rbx, rax
    dec rcx
    jnz 1b
    mov al, 0
    out 0xf4, al
"""
SENSITIVE = """
    mov r8, {n}
1:  mov ecx, 0x10
    rdmsr
    out 0x80, al
    in al, 0x80
    dec r8
    jnz 1b
    mov al, 0
    out 0xf4, al
"""


def compute_insns(n: int) -> int:
    return 1 + 4 * n + 2


def run_machine(code: bytes, fast: bool):
    m = Machine(cores=1, fast=fast, max_ns=10**13)
    LM.write_environment(m)
    m.write_phys(CODE_BASE, code)
    LM.enter(m.cores[0], CODE_BASE)
    t = time.perf_counter()
    m.boot(prepared=True)
    m.run()
    wall = time.perf_counter() - t
    if m.verdict != "pass":
        raise SystemExit(f"benchmark guest did not pass: {m.verdict} {m.message}")
    return wall, m


def run_raw(code: bytes, count: int | None):
    m = Machine(cores=1)             # only for its RAM and page tables
    LM.write_environment(m)
    m.write_phys(CODE_BASE, code)
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map_ptr(0, m.mem.size, UC_PROT_ALL, m.mem.ptr)
    uc.reg_write(X.UC_X86_REG_CR3, LM.PML4)
    uc.reg_write(X.UC_X86_REG_CR4, LM.CR4)
    uc.reg_write(X.UC_X86_REG_MSR, (0xC0000080, LM.EFER & ~0x400))
    uc.reg_write(X.UC_X86_REG_CR0, LM.CR0)
    uc.reg_write(X.UC_X86_REG_RSP, LM.STACK_TOP)
    end = CODE_BASE + len(code) - 4     # stop at "mov al, 0"
    t = time.perf_counter()
    if count is None:
        uc.emu_start(CODE_BASE, end)
    else:
        uc.emu_start(CODE_BASE, end, 0, count)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=25_000_000,
                    help="compute-loop iterations (4 instructions each; default 25e6)")
    ap.add_argument("--sensitive", type=int, default=20_000,
                    help="sensitive-loop iterations (3 events each; default 20000)")
    args = ap.parse_args()
    n = args.iterations
    code, _ = assemble(COMPUTE.format(n=n), CODE_BASE, "compute")
    insns = compute_insns(n)
    n_det = max(1, n // 8)            # count mode is ~10x slower: a shorter run
    code_det, _ = assemble(COMPUTE.format(n=n_det), CODE_BASE, "compute")
    insns_det = compute_insns(n_det)

    raw = insns / run_raw(code, None) / 1e6
    fast_wall, _ = run_machine(code, fast=True)
    fast = insns / fast_wall / 1e6
    count = insns_det / run_raw(code_det, insns_det) / 1e6
    det_wall, m = run_machine(code_det, fast=False)
    det = insns_det / det_wall / 1e6
    exact = m.cores[0].icount == insns_det

    s_code, _ = assemble(SENSITIVE.format(n=args.sensitive), CODE_BASE, "sensitive")
    s_wall, sm = run_machine(s_code, fast=False)
    events = sum(sm.cores[0].events.get(k, 0) for k in ("RDMSR", "OUT", "IN"))

    print(f"compute loop, paging on, {insns:,} instructions ({insns_det:,} in count modes)")
    print(f"  raw Unicorn                  {raw:8.1f} MIPS")
    print(f"  devirt-emu --fast            {fast:8.1f} MIPS   ratio {fast / raw:5.2f}  (target >= 0.80)")
    print(f"  raw Unicorn count mode       {count:8.1f} MIPS")
    print(f"  devirt-emu deterministic     {det:8.1f} MIPS   ratio {det / count:5.2f}  (target >= 0.80)")
    print(f"  deterministic count exact:   {exact} ({m.cores[0].icount:,} retired)")
    print(f"MSR/port loop: {events:,} sensitive events in {s_wall:.3f} s = "
          f"{events / s_wall:,.0f} events/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
