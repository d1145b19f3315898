#!/usr/bin/env python3
"""Stores into code pages, and EPT cases against the same cases without EPT, side by side.

1. Per store: direct cases (devirt_emu.testing.vmx_case) whose loop stores N
   times, one store per pass, then exits with CPUID:

   - "elsewhere":     into a scratch page no code runs from;
   - "own page":      into a quadword on the page the loop runs from (a new
                      value each pass);
   - "own page, same value": the same with the value the quadword holds;
   - "own bytes":     zeroed memory run as "add [rax], al" with RAX pointing
                      at it: each instruction stores into its own bytes.

   Each loop is timed with N and with 2N stores and the difference divided by
   N (the case's fixed costs cancel; the median of ``--repeats``); "extra" is
   the cost beyond a store elsewhere.  Target (issue 14): at most 5 us extra per store.

2. Case rate: a list of short cases (VM exits of different kinds, a loop over
   memory, a guest page walk, a store into the code page) run through one
   CaseRunner without EPT and with ``ept="identity"``, in alternating blocks;
   cases per second and their ratio.  Target: EPT at least 0.8x.

Times are this process's CPU time (time.process_time: other processes on a
shared machine do not count); the
machine's speed still swings from minute to minute: compare the columns of one
run.

    python benchmarks/bench_smc.py [--stores N] [--repeats N] [--seconds S]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from devirt_emu.testing.vmx_case import SCRATCH_BASE, CaseRunner  # noqa: E402

STORE_LOOPS = {
    "elsewhere": f"""
        mov rbx, {SCRATCH_BASE + 0x100}
    1:  mov [rbx], rcx
        dec rcx
        jnz 1b
        cpuid
    """,
    "own page": """
        lea rbx, [rip + data]
    1:  mov [rbx], rcx
        dec rcx
        jnz 1b
        cpuid
        .align 64
    data:
        .quad 0
    """,
    "own page, same value": """
        lea rbx, [rip + data]
        xor edx, edx
    1:  mov [rbx], rdx
        dec rcx
        jnz 1b
        cpuid
        .align 64
    data:
        .quad 0
    """,
}
#: RCX (the number of stores) comes from the case's registers, so that the code, and its
#: assembly, is the same for every N.
#: zeroed memory from SCRATCH_BASE on, run as "add [rax], al" (2 bytes each, AL = 0)
OWN_BYTES = f"mov eax, {SCRATCH_BASE}\njmp rax"

CASES = [
    ("cpuid", {}),
    ("mov ecx, 0x10\nrdmsr", {"vmcs": {"CPU_BASED_VM_EXEC_CONTROL": 1 << 28}, "legal": True,
                               "msr_bitmap": {"read": [0x10]}}),
    ("hlt", {"vmcs": {"CPU_BASED_VM_EXEC_CONTROL": 1 << 7}, "legal": True}),
    ("mov dx, 0x80\nin al, dx", {"vmcs": {"CPU_BASED_VM_EXEC_CONTROL": 1 << 24}, "legal": True}),
    ("mov rax, cr3\nmov cr3, rax\ncpuid", {}),
    ("1: dec ecx\njnz 1b\ncpuid", {"regs": {"rcx": 200}}),
    (f"""mov rbx, {SCRATCH_BASE}
        mov ecx, 16
    1:  mov rax, [rbx]
        mov [rbx + 8], rax
        add rbx, 0x1000
        dec ecx
        jnz 1b
        cpuid""", {}),
    ("""lea rbx, [rip + data]
        mov ecx, 50
    1:  mov [rbx], ecx
        dec ecx
        jnz 1b
        cpuid
        .align 16
    data: .quad 0""", {}),
    ("mov rax, [0x1234567000]", {}),                       # #PF -> #DF -> triple fault
    ("vmcall", {}),
]


def time_case(runner: CaseRunner, code: str, **kw) -> float:
    t = time.process_time()
    runner.run(code, **kw)
    return time.process_time() - t


def per_store(runner: CaseRunner, n: int, repeats: int) -> dict[str, float]:
    """Per loop, the median over ``repeats`` of (time of 2n stores - time of n) / n."""
    zeros = {SCRATCH_BASE: bytes(8 * n + 64)}
    diffs: dict[str, list[float]] = {}
    for _ in range(repeats):
        for name, loop in STORE_LOOPS.items():
            one = time_case(runner, loop, regs={"rcx": n}, max_steps=10 * n)
            two = time_case(runner, loop, regs={"rcx": 2 * n}, max_steps=10 * n)
            diffs.setdefault(name, []).append((two - one) / n)
        one = time_case(runner, OWN_BYTES, max_steps=2 + n, memory=zeros)
        two = time_case(runner, OWN_BYTES, max_steps=2 + 2 * n, memory=zeros)
        diffs.setdefault("own bytes", []).append((two - one) / n)
    return {name: statistics.median(d) for name, d in diffs.items()}


def case_rate(runner: CaseRunner, seconds: float, repeats: int) -> dict[str, float]:
    """Cases per second without and with EPT: blocks of 5 passes over CASES
    each way, alternating (so that a change in the machine's speed hits both
    alike, while a block runs as a batch of such cases does), each way's time
    summed; the best of ``repeats`` rounds of about ``seconds``."""
    rate: dict[str, float] = {}
    for _ in range(repeats):
        spent = {"no EPT": 0.0, "EPT": 0.0}
        n, t0 = 0, time.process_time()
        while time.process_time() - t0 < seconds:
            for label, ept in (("no EPT", None), ("EPT", "identity")):
                t = time.process_time()
                for _ in range(5):
                    for code, kw in CASES:
                        r = runner.run(code, ept=ept, **kw)
                        assert r.outcome != "entry_failure", (code, r)
                spent[label] += time.process_time() - t
            n += 5 * len(CASES)
        for label, t in spent.items():
            rate[label] = max(rate.get(label, 0.0), n / t)
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args()
    runner = CaseRunner()
    stores = per_store(runner, a.stores, a.repeats)
    base = stores["elsewhere"]
    print(f"per store ({a.stores:,} and {2 * a.stores:,} stores, median of {a.repeats}):")
    for name, t in stores.items():
        extra = "" if name == "elsewhere" else f"   extra {1e6 * (t - base):7.2f} us"
        print(f"   {name:22s} {1e6 * t:8.2f} us{extra}")
    rate = case_rate(runner, a.seconds, a.repeats)
    print(f"case rate ({len(CASES)} kinds of case, best of {a.repeats} rounds of {a.seconds} s each):")
    print(f"   no EPT {rate['no EPT']:7.0f} cases/s   EPT {rate['EPT']:7.0f} cases/s   "
          f"ratio {rate['EPT'] / rate['no EPT']:5.2f}")


if __name__ == "__main__":
    main()
