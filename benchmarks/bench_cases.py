#!/usr/bin/env python3
"""Direct VMX cases: reset time and cases per second, side by side in one run
(issue 11's targets: a reset of at most 200 us, at least 2,500 cases/s).

One :class:`~devirt_emu.testing.vmx_case.CaseRunner` runs a mix of cases in
turn, each with different code and controls: exits (CPUID, HLT, RDTSC, RDMSR
and IN through bitmaps, MOV to CR0 under a mask, #UD and #PF in the exception
bitmap, PAUSE), a VM-entry failure, and cases that leave work for the reset
(stores to the scratch area and the stack, a WRMSR, a page-table entry
written, a store followed by an exit).  Between two cases the runner restores
its snapshot (the CPU context, the pages written, the VMCS region):

* reset time: the median and the 90th percentile of ``runner.last_reset_us``
  over the timed cases (the reset of each case, measured inside ``run``);
* cases per second: timed cases / wall time, the best of ``--repeats``
  rounds (other load on a shared machine only ever slows a round down), the
  median beside it;
* fuzz cases per second (``--fuzz N``, default 0 = skipped): the property
  checks of ``devirt-emu fuzz --arch vmx`` over at least N cases, hypothesis
  included, as the command reports them.

    python benchmarks/bench_cases.py [--cases N] [--repeats N] [--fuzz N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from devirt_emu.testing.vmx_case import SCRATCH_BASE, CaseRunner, io_bitmaps  # noqa: E402

PROC = "CPU_BASED_VM_EXEC_CONTROL"
CASES = [
    ("cpuid", {}),
    ("hlt", {"vmcs": {PROC: 1 << 7}, "legal": True}),
    ("rdtsc", {"vmcs": {PROC: 1 << 12}, "legal": True}),
    ("mov ecx, 0x10\nrdmsr", {"vmcs": {PROC: 1 << 28}, "legal": True, "msr_bitmap": {"read": [0x10]}}),
    ("in al, 0x60", {"vmcs": {PROC: 1 << 25}, "legal": True, "io_bitmap_a": io_bitmaps([0x60])[0]}),
    ("mov rbx, cr0\nor rbx, 8\nmov cr0, rbx", {"vmcs": {"CR0_GUEST_HOST_MASK": 8,
                                                        "CR0_READ_SHADOW": 0x80010033}}),
    ("nop\nnop\nud2", {"vmcs": {"EXCEPTION_BITMAP": 1 << 6}}),
    ("pause", {"vmcs": {PROC: 1 << 30}, "legal": True}),
    ("hlt", {"vmcs": {PROC: 1 << 7}}),                  # VMfailValid 7
    ("mov rax, [rbx]", {"regs": {"rbx": 0x40000000}, "vmcs": {"EXCEPTION_BITMAP": 1 << 14}}),
    # cases that dirty memory and MSRs for the next reset
    ("mov [rbx], rax\npush rax\ncpuid", {"regs": {"rbx": SCRATCH_BASE + 0x1230, "rax": 7}}),
    ("mov ecx, 0xc0000102\nmov eax, 5\nxor edx, edx\nwrmsr\ncpuid", {}),
    ("mov rbx, 0x20000\nmov qword ptr [rbx + 8], 0\ncpuid", {}),     # a PML4 entry cleared
    ("mov rdi, rbx\nmov ecx, 64\nrep stosq\nhlt", {"regs": {"rbx": SCRATCH_BASE + 0x8000},
                                                   "vmcs": {PROC: 1 << 7}, "legal": True}),
]


def run_round(runner: CaseRunner, n: int) -> tuple[float, list[float]]:
    resets = []
    t = time.perf_counter()
    for i in range(n):
        code, kw = CASES[i % len(CASES)]
        runner.run(code, **kw)
        resets.append(runner.last_reset_us)
    return time.perf_counter() - t, resets


def fuzz_rate(examples: int) -> tuple[float, int]:
    from devirt_emu.testing.fuzz import FuzzSettings, run_fuzz
    report = run_fuzz(FuzzSettings(arch="vmx", examples=examples, seed=0, progress=False))
    return report.cases / report.wall_s, report.cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=2000, help="cases per round (default 2000)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--fuzz", type=int, default=0, help="also run N fuzz examples (default 0: no)")
    args = ap.parse_args()
    runner = CaseRunner()
    for code, kw in CASES:               # warm: the assembly cache
        runner.run(code, **kw)
    walls, resets = [], []
    for _ in range(args.repeats):
        wall, r = run_round(runner, args.cases)
        walls.append(wall)
        resets.extend(r)
    rates = sorted(args.cases / w for w in walls)
    resets.sort()
    med = statistics.median(resets)
    p90 = resets[int(len(resets) * 0.9)]
    ok_reset = "met" if med <= 200 else "MISSED"
    ok_rate = "met" if rates[-1] >= 2500 else "MISSED"
    print(f"{'reset (median / p90)':<28}{'direct cases/s (best / median)':<34}")
    print(f"{med:>7.0f} us / {p90:.0f} us {'':<10}{rates[-1]:>8,.0f} / {statistics.median(rates):,.0f}")
    print(f"target <= 200 us: {ok_reset:<10}target >= 2,500 cases/s: {ok_rate}")
    print(f"({args.repeats} rounds of {args.cases:,} cases, {len(CASES)} different cases in turn)")
    if args.fuzz:
        rate, n = fuzz_rate(args.fuzz)
        print(f"fuzz: {n:,} cases at {rate:,.0f} cases/s (each checked as devirt-emu fuzz does: "
              "a program case runs twice, a breakage twice)")


if __name__ == "__main__":
    main()
