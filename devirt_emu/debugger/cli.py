"""The ``devirt-emu debug`` subcommand: its parser and its handler."""
from __future__ import annotations

import argparse
import os
import sys

DEBUG_EPILOG = """\
-ex CMD runs CMD first (repeatable).  --batch FILE then runs the commands of
FILE ('-' for standard input) and exits.  Without --batch the prompt follows
when standard input is a terminal (history in
$XDG_STATE_HOME/devirt-emu/debug_history, Tab completes commands, symbols and
VMCS field names, Ctrl-C stops a running machine).  `help` lists the
commands; docs/debugging.md walks through a session.

--gdb HOST:PORT serves the GDB remote serial protocol instead (loopback by
default): `gdb -ex 'target remote 127.0.0.1:1234'`.

exit status: 0, or 1 when a command of --batch/-ex failed; 2 for bad options.
"""


def _endpoint(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    try:
        p = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {text!r}") from None
    if not 0 <= p <= 65535:
        raise argparse.ArgumentTypeError(f"port {p} is not 0-65535")
    return host or "127.0.0.1", p


def add_parser(sub) -> None:
    from ..cli import _positive, _seconds
    d = sub.add_parser("debug", help="debug a guest program (REPL or GDB stub)",
                       description="Debug a guest program: step, break, inspect the VMCS, "
                                   "ask why an exit fired.",
                       epilog=DEBUG_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("program", help="guest program: assembly (.S) or ELF executable")
    d.add_argument("--cores", type=_positive, default=1, help="number of cores (default 1)")
    d.add_argument("--mem", type=_positive, default=64, metavar="MIB",
                   help="RAM in MiB (default 64)")
    d.add_argument("--arch", choices=("none", "vmx"), default="none",
                   help="none: native (default); vmx: under the L0 (a model of KVM)")
    from ..hypervisor.configs import VMX_CONFIGS
    d.add_argument("--config", choices=tuple(VMX_CONFIGS),
                   help="with --arch vmx: a configuration of devirt_emu/hypervisor/configs.py "
                        "(default stock)")
    d.add_argument("--max-time", type=_seconds, default=1.0, metavar="S",
                   help="virtual seconds before the run ends with verdict timeout (default 1)")
    from ..cpumodels.cli import add_cpu_arguments
    add_cpu_arguments(d)
    d.add_argument("--batch", metavar="FILE", help="run the commands of FILE ('-': stdin), exit")
    d.add_argument("-ex", dest="ex", action="append", default=[], metavar="CMD",
                   help="run CMD before anything else (repeatable)")
    d.add_argument("--gdb", type=_endpoint, metavar="HOST:PORT", nargs="?",
                   const=("127.0.0.1", 1234),
                   help="serve the GDB remote protocol on HOST:PORT (default 127.0.0.1:1234)")
    d.add_argument("--gdb-symbols", metavar="FILE",
                   help="with --gdb: write the guest's symbols to FILE as an ELF for gdb's "
                        "symbol-file (default: a file in the temporary directory)")
    d.set_defaults(func=cmd_debug)


def cmd_debug(args) -> int:
    from ..asm import AsmError
    from ..platform.core import GuestError
    from .session import DebugError, Session

    if args.config is not None and args.arch == "none":
        print("devirt-emu: error: --config needs --arch vmx", file=sys.stderr)
        return 2
    from ..cpumodels.cli import model_from_args
    try:
        cpu = model_from_args(args)
        session = Session(args.program, cores=args.cores, arch=args.arch, config=args.config,
                          mem_mb=args.mem, max_ns=int(args.max_time * 1e9), cpu=cpu)
    except (AsmError, GuestError, DebugError, ValueError, OSError) as e:
        print(f"devirt-emu: error: {e}", file=sys.stderr)
        return 2
    if args.gdb is not None:
        import tempfile
        from .gdbstub import serve
        path = args.gdb_symbols or os.path.join(tempfile.gettempdir(),
                                                f"devirt-emu-symbols-{os.getpid()}.elf")
        try:
            session.write_symbol_file(path)
        except OSError as e:
            print(f"devirt-emu: error: cannot write {path}: {e.strerror}", file=sys.stderr)
            return 2
        print(f"devirt-emu: guest symbols in {path} (gdb: symbol-file {path})", file=sys.stderr)
        return serve(session, *args.gdb, log=sys.stderr)
    from .repl import Repl, interactive
    repl = Repl(session)
    for cmd in args.ex:
        repl.say(f"(devirt) {cmd}")
        repl.execute(cmd)
        if repl.done:
            return 1 if repl.errors else 0
    if args.batch is not None:
        try:
            f = sys.stdin if args.batch == "-" else open(args.batch)
        except OSError as e:
            print(f"devirt-emu: error: cannot read {args.batch}: {e.strerror}", file=sys.stderr)
            return 2
        with f:
            for line in f:
                if line.strip() and not line.lstrip().startswith("#"):
                    repl.say(f"(devirt) {line.strip()}")
                repl.execute(line)
                if repl.done:
                    break
        return 1 if repl.errors else 0
    if args.ex and not sys.stdin.isatty():
        return 1 if repl.errors else 0
    try:
        interactive(repl)
    except KeyboardInterrupt:
        pass
    return 0
