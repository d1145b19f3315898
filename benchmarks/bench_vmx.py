#!/usr/bin/env python3
"""VMX speed, measured side by side in one run (issue 3's targets).

1. Exits per second under the L0.  A guest loop whose every iteration exits
   (CPUID, then separately an OUT to an empty port) runs on one core under
   ``Machine(arch="vmx", config="stock")``: the fresh 64-bit state of
   devirt_emu.platform.longmode is written and loaded on the core, then the
   L0 attaches (the core's state becomes the VMCS guest state), launches and
   handles every exit (KvmL0: CPUID emulation, port I/O on the platform).  No
   firmware.  Rate = exits in ``machine.exit_counts`` / wall time of the run,
   the best of ``--repeats`` runs (as timeit takes the minimum: other load on
   a shared machine only ever slows a run down), with the median beside it
   and the best run's exits per CPU-second.  Target: 50,000 exits/s.
2. Direct cases per second: ``devirt_emu.testing.vmx_case.run_case`` in a
   loop over a mix of cases (CPUID, HLT, RDTSC, RDMSR with a bitmap, I/O with
   a bitmap, MOV to CR0 with a mask, #UD in the exception bitmap, VM-entry
   failure), each with different code and controls, on one reused machine.
   Target: 300 cases/s.
3. Devirt steady state vs native: the same firmware guest (boot, then a
   compute loop between steady_begin/steady_end) run natively (``--arch
   none``) and under ``--arch vmx --config devirt`` (the firmware asks the L0
   to devirtualize the core at the end of boot).  Each is run with two loop
   lengths; steady-state MIPS = extra instructions / extra wall time, so that
   boot (and its exits under the L0) drops out; each wall time is the best of
   ``--repeats`` runs, native and devirt interleaved.  Target: ratio ~1.0.
   Done in the machine's deterministic mode (the default) and in fast mode.

    python benchmarks/bench_vmx.py [--exits N] [--cases N] [--iterations N] [--repeats N] [--profile]

``--profile`` prints the top of a cProfile of parts 1 and 2 (where the time
goes when a target is missed).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from devirt_emu.asm import assemble, build_image  # noqa: E402
from devirt_emu.machine import Machine  # noqa: E402
from devirt_emu.platform import longmode as LM  # noqa: E402
from devirt_emu.testing.vmx_case import CaseRunner, io_bitmaps  # noqa: E402

CODE_BASE = 0x200000
CPUID_LOOP = """
    mov r8, {n}
1:  xor eax, eax
    cpuid
    dec r8
    jnz 1b
    mov al, 0
    out 0xf4, al
"""
OUT_LOOP = """
    mov r8, {n}
1:  out 0x80, al
    dec r8
    jnz 1b
    mov al, 0
    out 0xf4, al
"""
GUEST = """
.text
guest_main:
    push rbx
    call steady_begin
    mov rcx, {n}
1:  add rax, rcx
    xor rbx, rax
    dec rcx
    jnz 1b
    call steady_end
    xor eax, eax
    pop rbx
    ret
"""
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
]


# --------------------------------------------------------------------------- 1. exits/s
def exits_per_second(source: str, n: int) -> tuple[float, int, float, float, dict]:
    """(exits per wall second, exits, wall seconds, CPU seconds of this process, counts)."""
    code, _ = assemble(source.format(n=n), CODE_BASE, "exit-loop")
    m = Machine(cores=1, arch="vmx", config="stock", max_ns=10**13)
    LM.write_environment(m)
    m.write_phys(CODE_BASE, code)
    LM.enter(m.cores[0], CODE_BASE)
    m.l0.attach()
    t = time.perf_counter()
    cpu = time.process_time()
    m.l0.launch()
    m.boot(prepared=True)
    m.run()
    wall = time.perf_counter() - t
    cpu = time.process_time() - cpu
    if m.verdict != "pass":
        raise SystemExit(f"exit loop did not pass: {m.verdict} {m.message}")
    exits = sum(m.exit_counts.values())
    return exits / wall, exits, wall, cpu, dict(m.exit_counts)


# --------------------------------------------------------------------------- 2. cases/s
def cases_per_second(n: int) -> tuple[float, float, dict]:
    runner = CaseRunner()
    outcomes: dict[str, int] = {}
    for code, kw in CASES:               # warm: assembly cache, scans
        runner.run(code, **kw)
    t = time.perf_counter()
    for i in range(n):
        code, kw = CASES[i % len(CASES)]
        r = runner.run(code, **kw)
        key = r.exit.name if r.exit else r.outcome
        outcomes[key] = outcomes.get(key, 0) + 1
    wall = time.perf_counter() - t
    return n / wall, wall, outcomes


# --------------------------------------------------------------------------- 3. devirt vs native
def run_guest(n: int, fast: bool, arch: str, config: str | None):
    with tempfile.NamedTemporaryFile("w", suffix=".S", delete=False) as f:
        f.write(GUEST.format(n=n))
        path = f.name
    try:
        image = build_image(path)
    finally:
        os.unlink(path)
    m = Machine(cores=1, fast=fast, arch=arch, config=config, max_ns=10**13)
    m.load_image(image)
    r = m.run()
    if r.verdict != "pass":
        raise SystemExit(f"compute guest ({arch} {config}) did not pass: {r.verdict} {r.message}")
    return r


def steady_mips(n1: int, n2: int, fast: bool, repeats: int) -> dict[str, tuple[float, object, int]]:
    """Steady-state MIPS of the loop, native and devirt:
    (instructions(n2) - instructions(n1)) / (wall(n2) - wall(n1)), each wall the
    best of ``repeats`` runs, the two configurations interleaved (the machine is
    shared: best-of filters out other processes)."""
    arches = {"native": ("none", None), "devirt": ("vmx", "devirt")}
    best: dict[tuple[str, int], float] = {}
    last = {}
    for _ in range(repeats):
        for label, (arch, config) in arches.items():
            for n in (n1, n2):
                r = run_guest(n, fast, arch, config)
                key = (label, n)
                best[key] = min(best.get(key, float("inf")), r.wall_s)
                last[label] = r
    insns = 4 * (n2 - n1)               # add, xor, dec, jnz per iteration
    out = {}
    for label in arches:
        dwall = best[(label, n2)] - best[(label, n1)]
        r = last[label]
        out[label] = (insns / dwall / 1e6 if dwall > 0 else float("nan"), r,
                      sum(r.window_exit_counts.values()))
    return out


def profile(fn, *args, top: int = 18) -> str:
    pr = cProfile.Profile()
    pr.enable()
    fn(*args)
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exits", type=int, default=20_000, help="iterations of each exit loop (default 20000)")
    ap.add_argument("--cases", type=int, default=1_000, help="direct cases to run (default 1000)")
    ap.add_argument("--iterations", type=int, default=20_000_000,
                    help="extra compute-loop iterations between the two runs of part 3 (default 2e7; "
                         "fast mode uses 5x more)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="parts 1 and 3: best of N runs each (default 5)")
    ap.add_argument("--profile", action="store_true", help="cProfile parts 1 and 2")
    args = ap.parse_args()

    print("1. VM exits per second under the L0 (stock, one core, fresh 64-bit state, no firmware)")
    for label, src in (("CPUID loop", CPUID_LOOP), ("OUT 0x80 loop", OUT_LOOP)):
        runs = [exits_per_second(src, args.exits) for _ in range(args.repeats)]
        rates = sorted(r[0] for r in runs)
        rate, exits, wall, cpu, counts = max(runs, key=lambda r: r[0])
        verdict = "met" if rate >= 50_000 else "MISSED"
        print(f"   {label:14s} {exits:8,} exits in {wall:6.3f} s = {rate:9,.0f} exits/s   "
              f"target 50,000: {verdict}   (best of {len(runs)}; median "
              f"{rates[len(rates) // 2]:,.0f}; {exits / cpu:,.0f} per CPU-second in the best)   "
              f"{counts}")

    print("2. direct cases per second (run_case on one reused machine, "
          f"{len(CASES)} different cases in turn)")
    rate, wall, outcomes = cases_per_second(args.cases)
    verdict = "met" if rate >= 300 else "MISSED"
    print(f"   {args.cases:,} cases in {wall:.3f} s = {rate:,.0f} cases/s   target 300: {verdict}")
    print(f"   outcomes: {outcomes}")

    print("3. devirt steady state vs native (firmware guest, compute loop in the steady-state window)")
    for fast, n in ((False, args.iterations), (True, 5 * args.iterations)):
        mode = "fast" if fast else "deterministic"
        res = steady_mips(1000, 1000 + n, fast, args.repeats)
        native, devirt = res["native"][0], res["devirt"][0]
        r, wexits = res["devirt"][1], res["devirt"][2]
        print(f"   {mode:13s} native {native:8.1f} MIPS   devirt {devirt:8.1f} MIPS   "
              f"ratio {devirt / native:5.2f} (target ~1.0)   devirt exits: "
              f"{sum(r.exit_counts.values())} in boot, {wexits} in the window")

    if args.profile:
        print("\nprofile of part 1 (CPUID loop):")
        print(profile(exits_per_second, CPUID_LOOP, args.exits))
        print("profile of part 2:")
        print(profile(cases_per_second, args.cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
