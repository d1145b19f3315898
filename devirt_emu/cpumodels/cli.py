"""``devirt-emu cpus [NAME]`` and the ``--cpu`` / ``--vmx-msrs`` options.

``devirt-emu cpus`` lists the CPU models; ``devirt-emu cpus SPEC`` shows one
(a name or a ``NAME,+feature,-feature`` spec): its facts, its features and
its VMX capability MSRs.  ``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import (DEFAULT_MODEL, FEATURES, VMX_MSR_NAMES, CpuModel, CpuModelError, get_model,
               load_vmx_msrs, models)

CPU_HELP = ("CPU model NAME[,+FEATURE,-FEATURE...] (default skylake-server; "
            "'devirt-emu cpus' lists them)")
VMX_MSRS_HELP = ("replace the model's VMX capability MSRs by a dump: JSON {\"0x480\": \"0x...\"}, "
                 "'INDEX VALUE' hex pairs, or rdmsr's bare hex values for 0x480, 0x481, ... "
                 "one per line ('-' for an absent MSR)")


def add_cpu_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--cpu SPEC`` and ``--vmx-msrs FILE`` to a subcommand that builds a machine."""
    parser.add_argument("--cpu", metavar="SPEC", default=None, help=CPU_HELP)
    parser.add_argument("--vmx-msrs", metavar="FILE", default=None, help=VMX_MSRS_HELP)


def model_from_args(args) -> CpuModel:
    """The CpuModel of ``--cpu`` and ``--vmx-msrs``; CpuModelError (a ValueError,
    one line) for a bad spec or dump."""
    model = get_model(getattr(args, "cpu", None))
    path = getattr(args, "vmx_msrs", None)
    if path:
        model = CpuModel.from_vmx_msrs(load_vmx_msrs(path), base=model,
                                       name=f"{model.name}+{path}")
    return model


def register(sub) -> None:
    """Add the ``cpus`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("cpus", help="list the CPU models, or show one",
                       description="List the CPU models (no argument) or show one model's "
                                   "facts, features and VMX capability MSRs.")
    p.add_argument("model", nargs="?", metavar="SPEC",
                   help="a model name or NAME,+FEATURE,-FEATURE spec")
    p.add_argument("--vmx-msrs", metavar="FILE", default=None, help=VMX_MSRS_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=cmd_cpus)


def model_json(m: CpuModel) -> dict:
    """A model as JSON: its facts, features, CPUID leaves and VMX MSRs (hex strings)."""
    fam, mod, step = m.family_model_stepping
    return {
        "name": m.name, "vendor": m.vendor, "description": m.description,
        "family": fam, "model": mod, "stepping": step,
        "maxphyaddr": m.maxphyaddr, "linear_bits": m.linear_bits, "tsc_khz": m.tsc_khz,
        "preemption_timer_rate": m.preemption_timer_rate if m.has_vmx else None,
        "features": sorted(m.features), "sources": list(m.sources), "notes": list(m.notes),
        "cpuid": {f"{leaf:#x}.{sub}": [f"{r:#010x}" for r in regs]
                  for (leaf, sub), regs in m.cpuid.items()},
        "vmx_msrs": {f"{i:#x}": f"{v:#018x}" for i, v in m.vmx_msrs.items()},
        "absent_msrs": [f"{i:#x}" for i in sorted(m.absent_msrs)],
    }


def cmd_cpus(args) -> int:
    try:
        if args.model is None and not args.vmx_msrs:
            return _list(args.json)
        model = model_from_args(argparse.Namespace(cpu=args.model, vmx_msrs=args.vmx_msrs))
    except CpuModelError as e:
        print(f"devirt-emu: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(model_json(model)))
        return 0
    _show(model)
    return 0


def _console():
    from rich.console import Console
    return Console(highlight=False, soft_wrap=False)


def _list(as_json: bool) -> int:
    ms = models()
    if as_json:
        print(json.dumps({"default": DEFAULT_MODEL,
                          "models": [model_json(m) for m in ms.values()]}))
        return 0
    from rich.table import Table
    t = Table(title="CPU models (--cpu NAME; default " + DEFAULT_MODEL + ")")
    for col in ("name", "vendor", "family/model/stepping", "MAXPHYADDR", "linear", "description"):
        t.add_column(col)
    for m in ms.values():
        fam, mod, step = m.family_model_stepping
        t.add_row(m.name, m.vendor, f"{fam}/{mod:#x}/{step}", str(m.maxphyaddr),
                  str(m.linear_bits), m.description)
    _console().print(t)
    return 0


def _show(m: CpuModel) -> None:
    from rich.table import Table
    con = _console()
    fam, mod, step = m.family_model_stepping
    facts = Table(title=f"{m.name}: {m.description}", show_header=False)
    facts.add_column("fact")
    facts.add_column("value")
    facts.add_row("vendor", m.vendor)
    facts.add_row("family / model / stepping", f"{fam} / {mod:#x} / {step}")
    facts.add_row("MAXPHYADDR / linear-address width", f"{m.maxphyaddr} / {m.linear_bits}")
    facts.add_row("TSC frequency", f"{m.tsc_khz / 1e6:g} GHz")
    if m.has_vmx:
        facts.add_row("VMX-preemption timer", f"TSC / 2^{m.preemption_timer_rate}")
    for s in m.sources:
        facts.add_row("source", s)
    for n in m.notes:
        facts.add_row("note", n)
    con.print(facts)
    feats = Table(title="features")
    feats.add_column("feature")
    feats.add_column("also")
    feats.add_column("where")
    for name in sorted(m.features, key=lambda n: (FEATURES[n].kind, n)):
        ft = FEATURES[name]
        feats.add_row(name, ft.alias, ft.where())
    con.print(feats)
    if m.vmx_msrs:
        msrs = Table(title="VMX capability MSRs (absent ones #GP)")
        msrs.add_column("MSR")
        msrs.add_column("name")
        msrs.add_column("value")
        for index, name in VMX_MSR_NAMES.items():
            value = m.vmx_msrs.get(index)
            msrs.add_row(f"{index:#x}", name, "absent" if value is None else f"{value:#018x}")
        con.print(msrs)
