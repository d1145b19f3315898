#!/usr/bin/env python3
"""What one VM exit and one native sensitive event cost, through the CLI.

A guest loop of CPUID instructions (the firmware boots, then ``guest_main``
runs the loop) is run by ``devirt-emu run`` in deterministic mode, natively
(``--arch none``: every CPUID is a sensitive event the platform emulates) and
under ``--arch vmx --config stock`` (every CPUID is a VM exit the L0
handles), each with two loop lengths.  The difference between the two
lengths divided by the difference in iterations takes boot and start-up out:

- callgrind (when valgrind is installed): machine instructions per event,
  deterministic (PYTHONHASHSEED=0).  Targets: at most 40,000 per VM exit,
  at most 20,000 per native event.
- wall clock: events per second of each, side by side in this run with raw
  Unicorn's instruction rate (the best of ``--repeats``).

    python benchmarks/bench_exit_cost.py [--short N] [--long N] [--repeats N] [--no-callgrind]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GUEST = """\
.text
guest_main:
    push rbx
    mov r8d, {n}
1:  xor eax, eax
    cpuid
    dec r8d
    jnz 1b
    pop rbx
    xor eax, eax
    ret
"""
CONFIGS = {"native": ["--arch", "none"], "vmx stock": ["--arch", "vmx", "--config", "stock"]}


def guest(tmp: Path, n: int) -> Path:
    p = tmp / f"cpuid_{n}.S"
    p.write_text(GUEST.format(n=n))
    return p


def cli(path: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "devirt_emu", "run", str(path), *extra]


def env() -> dict:
    e = dict(os.environ, PYTHONHASHSEED="0")
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def callgrind_instructions(cmd: list[str], tmp: Path) -> int:
    out = tmp / "callgrind.out"
    subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *cmd],
                   check=True, capture_output=True, env=env())
    m = re.search(r"^(?:summary|totals):\s*(\d+)", out.read_text(), re.M)
    out.unlink()
    return int(m.group(1))


def wall(cmd: list[str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env())
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", type=int, default=1000, help="iterations of the short loop")
    ap.add_argument("--long", type=int, default=5000, help="iterations of the long loop")
    ap.add_argument("--repeats", type=int, default=3, help="wall-clock runs, best taken")
    ap.add_argument("--no-callgrind", action="store_true", help="wall clock only")
    args = ap.parse_args()
    if not 0 < args.short < args.long:
        ap.error("need 0 < --short < --long")
    from devirt_emu.machine import measure_raw_rate
    span = args.long - args.short
    use_cg = not args.no_callgrind and shutil.which("valgrind") is not None
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        short, long_ = guest(tmp, args.short), guest(tmp, args.long)
        print(f"raw Unicorn: {measure_raw_rate() * 1e3:,.0f} M instructions/s")
        print(f"{'configuration':<12} {'events/s (wall)':>16} {'instructions/event (callgrind)':>32}")
        for name, extra in CONFIGS.items():
            rate = span / max(1e-9, wall(cli(long_, extra), args.repeats)
                              - wall(cli(short, extra), args.repeats))
            cost = "-"
            if use_cg:
                per = (callgrind_instructions(cli(long_, extra), tmp)
                       - callgrind_instructions(cli(short, extra), tmp)) / span
                cost = f"{per:,.0f}"
            print(f"{name:<12} {rate:>16,.0f} {cost:>32}", flush=True)
        if not use_cg:
            print("(valgrind not found or --no-callgrind: no instruction counts)")
        print("targets: VM exit <= 40,000 instructions, native event <= 20,000")


if __name__ == "__main__":
    main()
