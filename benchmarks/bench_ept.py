#!/usr/bin/env python3
"""What EPT at run time costs: the same guest loop with and without EPT, side by side.

A direct case (devirt_emu.testing.vmx_case) whose code reads one quadword
from each of N 4-KiB pages, round after round, then exits with CPUID; run
once without EPT (Unicorn's own one-stage walker) and once with
``ept="identity"`` (virtual-TLB mode: a Python two-stage walk on every TLB
miss).  MIPS = retired guest instructions / wall time of the case; each is the
best of ``--repeats`` runs, the two configurations interleaved.  "fills" is
the number of TLB misses the EPT run took (``core.vtlb.fills``): one per page
touched while Unicorn's TLB keeps them, more once the working set stops
fitting in it.

    python benchmarks/bench_ept.py [--pages 16,64,256,1024] [--instructions N] [--repeats N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from devirt_emu.testing.vmx_case import SCRATCH_BASE, CaseRunner  # noqa: E402

LOOP = """
    mov r9, {rounds}
2:  mov rbx, {base}
    mov rcx, {pages}
1:  mov rax, [rbx]
    add rbx, 0x1000
    dec rcx
    jnz 1b
    dec r9
    jnz 2b
    cpuid
"""


def run(runner: CaseRunner, code: str, ept, steps: int) -> tuple[float, int]:
    t = time.perf_counter()
    r = runner.run(code, ept=ept, max_steps=steps)
    wall = time.perf_counter() - t
    if r.outcome != "exit" or r.exit.name != "CPUID":
        raise SystemExit(f"unexpected outcome: {r}")
    return wall, r.steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", default="16,256,1024,2048")
    ap.add_argument("--instructions", type=int, default=2_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    runner = CaseRunner()
    print("guest loop reading one quadword per 4 KiB page; MIPS without EPT vs with ept='identity'")
    for n in (int(x) for x in a.pages.split(",")):
        rounds = max(1, a.instructions // (3 * n + 3))
        code = LOOP.format(rounds=rounds, base=SCRATCH_BASE, pages=n)
        best = {}
        for _ in range(a.repeats):
            for ept in (None, "identity"):
                fills0 = runner.core.vtlb.fills if runner.core.vtlb is not None else 0
                wall, steps = run(runner, code, ept, 10 * a.instructions)
                key = "ept" if ept else "none"
                best[key] = min(best.get(key, wall), wall)
                if ept:
                    fills = runner.core.vtlb.fills - fills0
        mips = {k: steps / w / 1e6 for k, w in best.items()}
        print(f"   {n:5d} pages  no EPT {mips['none']:7.1f} MIPS   EPT {mips['ept']:7.1f} MIPS"
              f"   ratio {mips['ept'] / mips['none']:5.2f}   fills {fills:,}   ({steps:,} instructions)")


if __name__ == "__main__":
    main()
