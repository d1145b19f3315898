"""The ``devirt-emu`` command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__, compare
from .cpumodels import cli as cpumodels_cli
from .cpumodels.cli import add_cpu_arguments, model_from_args
from .debugger.cli import add_parser as add_debug_parser
from .testing import fuzz

DESCRIPTION = """\
devirt-emu: an instruction-level x86-64 emulator of the KVM-devirt CPU path.

`run` boots the firmware on N emulated cores and runs a guest program on it:
an Intel-syntax assembly file (.S, linked between firmware/boot.S and
firmware/lib.S; see docs/guest-abi.md) or an ELF executable (a 64-bit ELF is
called by the firmware in long mode; a 32-bit ELF is entered directly as a
multiboot loader would).  The guest reports its own verdict through the
isa-debug-exit port 0xF4 (0 = pass).
"""

RUN_EPILOG = """\
verdicts: pass (guest wrote 0 to port 0xF4), fail (it wrote anything else),
shutdown (triple fault), halted (every core halted with nothing to wake it),
timeout (--max-time or --wall-timeout reached), error (the platform could not
model what the guest did, e.g. interrupt delivery outside long mode).

exit status: 0 only for pass; for fail, QEMU's (value << 1) | 1; 3 shutdown,
4 halted, 5 timeout, 2 error or bad input.

time: deterministic mode (the default) counts retired instructions exactly;
one instruction is one virtual nanosecond (a PAUSE 140), the TSC and the LAPIC
timer input run at 1 GHz; the same program and options give the same trace.
--fast lets a lone runnable core with no timer armed run without instruction
counting once it is in a compute phase (about 10x faster): its instruction
count and virtual time are then estimated from wall time at the raw rate
measured on this machine.

--json prints one object: verdict, serial, cores, instructions (per core),
virtual_ns, events (sensitive event kind -> count), wall_s, mips, exit_status,
markers (per core: [begin, end] instruction counts of each steady-state
window), message, mode, arch, config, cpu (the CPU model's spec); and for
--arch vmx: exits (one object per VM exit: core, reason (basic exit reason),
name, entry_failure, qualification, instruction_length, rip, in_window) for
the first --exit-records exits, exits_dropped (the exits after those),
exit_counts and window_exit_counts (by exit name, always complete; window:
inside a core's steady-state window) and exit_counts_per_core (exit_counts
split by core).
For --arch svm the same keys, each exit being: core, exit_code (SVM_EXIT_*),
name, exit_info_1, exit_info_2, rip, in_window.

configurations (--arch vmx): stock is KVM's default VMCS with EPT and
unrestricted guest, APICv off, PAUSE-loop exiting on; apicv is the same with
KVM's enable_apicv=1 (posted interrupts, virtual-interrupt delivery, APIC-register
and x2APIC virtualization: IPIs are posted, EOIs do not exit); devirt is KVM-devirt:
the guest boots under stock and each core asks for devirtualization at the end
of boot (a paravirtual MSR write), after which external interrupts, HLT,
MWAIT, PAUSE and the timer/IPI/EOI x2APIC MSRs no longer exit.
configurations (--arch svm): stock is KVM's default VMCB with NPT and
V_INTR_MASKING; devirt is KVM-devirt's SVM set (no INTR, HLT, MWAIT, PAUSE
intercepts, V_INTR_MASKING and NPT off, the x2APIC timer/IPI/EOI MSRs passed
through), reached the same way at the end of boot.
--trace FILE writes every event as one JSON object per line (core, kind, rip,
instruction, icount, ...).  --timeline FILE writes the run as Chrome
trace-event JSON: a track per core, VM exits as slices named by reason and as
long as the cost model estimates (devirt_emu/costmodel.py), interrupts and IPIs
as instant events, the steady-state windows as spans; its timestamps are
estimated time (virtual time plus the estimated cost of earlier exits).

CPU models: --cpu NAME[,+FEATURE,-FEATURE,...] picks the processor (default
skylake-server; `devirt-emu cpus` lists them, `devirt-emu cpus NAME` shows
one); features are /proc/cpuinfo flags (pcid, x2apic) or vmx.h names
(SECONDARY_EXEC_UNRESTRICTED_GUEST; vmx flags such as ept_ad also work).
--vmx-msrs FILE replaces the model's VMX capability MSRs with a dump of a real
machine's: JSON {"0x480": "0x...", ...}, or text with one MSR per line, either
"INDEX VALUE" in hex (e.g. "0x480 0xda040000000004") or bare hex values read
as 0x480, 0x481, ... in order (the output of rdmsr over 0x480-0x493, with
"-" for an MSR the processor does not have).  The VMCS size becomes 4096 and
features devirt-emu does not implement are cleared (docs/cpu-models.md).  The
firmware needs x2apic and tsc_deadline_timer, --arch vmx unrestricted guest.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"devirt-emu: error: {message} (see --help)\n")


def _positive(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text}")
    return v


def _records(text: str) -> int | bool:
    if text == "all":
        return True
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number or 'all': {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0: {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="devirt-emu", description=DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"devirt-emu {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    r = sub.add_parser("run", help="boot the firmware and run a guest program",
                       description="Boot the firmware and run a guest program.",
                       epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("program", help="guest program: assembly (.S) or ELF executable")
    r.add_argument("--cores", type=_positive, default=1, help="number of cores (1-64, default 1)")
    r.add_argument("--mem", type=_positive, default=64, metavar="MIB",
                   help="RAM in MiB (16-3072, default 64)")
    r.add_argument("--fast", action="store_true",
                   help="let a lone runnable core run without instruction counting")
    r.add_argument("--quantum", type=_positive, default=20_000, metavar="N",
                   help="instructions a core may run ahead of the others (default 20000)")
    r.add_argument("--max-time", type=_seconds, default=1.0, metavar="S",
                   help="virtual seconds before the run ends with verdict timeout (default 1)")
    r.add_argument("--wall-timeout", type=_seconds, default=300.0, metavar="S",
                   help="wall-clock seconds before verdict timeout (default 300)")
    r.add_argument("--arch", choices=("none", "vmx", "svm"), default="none",
                   help="none: native, no hypervisor (default); vmx: the guest runs in VMX "
                        "non-root operation under the L0 (a model of KVM); svm: the guest "
                        "runs as an SVM guest under the L0 (a model of KVM on AMD)")
    from .hypervisor.configs import SVM_CONFIGS, VMX_CONFIGS
    r.add_argument("--config", choices=tuple(dict.fromkeys((*VMX_CONFIGS, *SVM_CONFIGS))),
                   help="with --arch vmx: a configuration of devirt_emu/hypervisor/configs.py: "
                        + ", ".join(VMX_CONFIGS) + "; with --arch svm: "
                        + ", ".join(SVM_CONFIGS) + " (default stock)")
    r.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    r.add_argument("--trace", metavar="FILE", help="write every event to FILE as JSON Lines")
    r.add_argument("--exit-records", type=_records, default=10_000, metavar="N|all",
                   help="VM exit records --json lists: the first N (default 10000) or all; "
                        "the counts are always complete")
    r.add_argument("--timeline", metavar="FILE",
                   help="write the run as Chrome trace-event JSON (Perfetto, chrome://tracing)")
    add_cpu_arguments(r)
    r.set_defaults(func=cmd_run)
    fuzz.add_parser(sub)
    # Further subcommands live in their own modules: each registers its parser on ``sub`` and
    # sets ``func`` to its handler (one line here per subcommand).
    compare.register(sub)
    add_debug_parser(sub)
    cpumodels_cli.register(sub)
    return p


def _summary(res) -> str:
    lines = [
        f"verdict      {res.verdict}" + (f"  ({res.message})" if res.message else ""),
        f"cores        {res.cores}",
        f"instructions {sum(res.instructions)}  per core: {', '.join(map(str, res.instructions))}"
        + ("  (estimated: fast mode)" if res.mode == "fast" else ""),
        f"virtual time {res.virtual_ns} ns",
        f"wall time    {res.wall_s:.3f} s",
        f"MIPS         {res.mips:.2f}",
    ]
    if res.events:
        lines.append("events       " + ", ".join(f"{k} {v}" for k, v in res.events.items()))
    if res.arch != "none":
        lines.append(f"hypervisor   {res.arch} {res.config}: {sum(res.exit_counts.values())} VM exits, "
                     f"{sum(res.window_exit_counts.values())} inside steady-state windows")
        if res.exit_counts:
            width = max(len(k) for k in res.exit_counts)
            lines.append(f"  {'exit reason'.ljust(width)}  {'total':>8}  {'in window':>9}")
            for k, v in res.exit_counts.items():
                lines.append(f"  {k.ljust(width)}  {v:>8}  {res.window_exit_counts.get(k, 0):>9}")
    for i, windows in enumerate(res.markers):
        for b, e in windows:
            lines.append(f"steady state core {i}: instructions {b} .. {e if e is not None else '(open)'}")
    return "\n".join(lines)


def cmd_run(args) -> int:
    from .asm import AsmError
    from .machine import run_program
    from .platform.core import GuestError

    path = Path(args.program)
    if not path.is_file():
        print(f"devirt-emu: error: no such file: {args.program}", file=sys.stderr)
        return 2
    trace_file = None
    if args.trace:
        try:
            trace_file = open(args.trace, "w")
        except OSError as e:
            print(f"devirt-emu: error: cannot write trace file {args.trace}: {e.strerror}", file=sys.stderr)
            return 2

    def trace(core, event):
        d = event.to_json()
        d["icount"] = core.retired_now()
        trace_file.write(json.dumps(d) + "\n")

    timeline = None
    if args.timeline:
        from .timeline import Timeline
        if not Path(args.timeline).resolve().parent.is_dir():
            print(f"devirt-emu: error: no such directory for {args.timeline}", file=sys.stderr)
            return 2
        timeline = Timeline(label=args.config or ("stock" if args.arch == "vmx" else "native"))

    def traces(core, event):
        if trace_file:
            trace(core, event)
        if timeline is not None:
            timeline.trace(core, event)

    def on_serial(byte: int):
        sys.stdout.write(chr(byte))

    if args.config is not None and args.arch == "none":
        print("devirt-emu: error: --config needs --arch vmx or svm", file=sys.stderr)
        return 2
    try:
        cpu = model_from_args(args)
    except ValueError as e:
        print(f"devirt-emu: error: {e}", file=sys.stderr)
        return 2
    try:
        res = run_program(path, cores=args.cores, mem_mb=args.mem, fast=args.fast, cpu=cpu,
                          quantum=args.quantum, arch=args.arch, config=args.config,
                          max_ns=int(args.max_time * 1e9), wall_timeout_s=args.wall_timeout,
                          trace=traces if trace_file or timeline else None,
                          on_machine=timeline.attach if timeline else None,
                          record_exits=args.exit_records if args.json else False,
                          on_serial=None if args.json else on_serial)
    except (AsmError, GuestError, ValueError, OSError) as e:
        print(f"devirt-emu: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("devirt-emu: interrupted", file=sys.stderr)
        return 130
    finally:
        if trace_file:
            trace_file.close()
    if timeline is not None:
        from .timeline import write
        try:
            write(args.timeline, [timeline])
        except OSError as e:
            print(f"devirt-emu: error: cannot write timeline {args.timeline}: {e.strerror}",
                  file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        sys.stdout.flush()
        if res.serial and not res.serial.endswith("\n"):
            print()
        print(_summary(res))
    return res.exit_status


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
