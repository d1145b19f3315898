"""``devirt-emu compare``: one guest natively and under every VMX (or SVM) configuration, side by side.

Each configuration is an ordinary run (the same as ``devirt-emu run PROGRAM
--arch vmx|svm --config NAME``, so the numbers are those runs' numbers); the table
adds what the cost model (:mod:`devirt_emu.costmodel`) estimates they would
cost on hardware.  Virtual time stays one instruction per ns; the estimate is
printed beside it and labelled so.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """\
columns: verdict; instructions (all cores); virtual time (ns, exact: one
instruction per ns); VM exits; exits per million instructions; exits inside
the steady-state windows and their estimated cost (ns); estimated exit cost
(ns, all cores: the cost model's
transition plus handler per exit); estimated run time (virtual time plus the
busiest core's exit cost, plus the memory term when --cost-model sets a
memory-bound fraction) and its overhead against the native run.  The estimate
is an estimate: see --cost-model and docs/cost-model.md.

--plot FILE writes FILE's stem as .png and .svg: VM exits by reason and the
estimated exit cost per configuration.  --timeline FILE writes every run as
Chrome trace-event JSON (a process per configuration, a track per core).
--json prints one object: program, cores, arch, cost_model (its rows), and
configs (name -> the run's --json object with estimate and overhead added).

exit status: 0 when every configuration's verdict is native's, 1 when one
differs, 2 for bad input.
"""


def register(sub) -> None:
    """Add the ``compare`` subcommand to the CLI's subparsers."""
    from .cli import _positive, _seconds
    p = sub.add_parser("compare", help="run a guest natively and under each configuration; "
                                       "compare exits and estimated cost",
                       description="Run a guest natively and under each VMX configuration "
                                   "(stock, apicv, devirt), each SVM one (stock, devirt) or "
                                   "both, and compare them.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("program", help="guest program: assembly (.S) or ELF executable")
    p.add_argument("--cores", type=_positive, default=1, help="number of cores (1-64, default 1)")
    p.add_argument("--mem", type=_positive, default=64, metavar="MIB",
                   help="RAM in MiB (32-3072 under VMX, default 64)")
    p.add_argument("--arch", choices=("vmx", "svm", "both"), default="vmx",
                   help="the configurations to run beside native: VMX's (default), SVM's (on "
                        "the AMD model), or both (named 'vmx stock', 'svm stock', ...)")
    p.add_argument("--max-time", type=_seconds, default=1.0, metavar="S",
                   help="virtual seconds per run before verdict timeout (default 1)")
    p.add_argument("--wall-timeout", type=_seconds, default=300.0, metavar="S",
                   help="wall-clock seconds per run before verdict timeout (default 300)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--plot", metavar="FILE", help="write the plot to FILE's stem .png and .svg")
    p.add_argument("--timeline", metavar="FILE", help="write the runs as trace-event JSON")
    p.add_argument("--cost-model", metavar="FILE",
                   help="JSON file overriding cost-model rows (see docs/cost-model.md)")
    from .cpumodels.cli import add_cpu_arguments
    add_cpu_arguments(p)
    p.set_defaults(func=cmd_compare)


def configurations(arch: str = "vmx") -> list[tuple[str, dict]]:
    """(label, the run's arch and config) for native, then every configuration the L0
    of ``arch`` ("vmx", "svm" or "both") has, in its table's order.  With "both"
    the labels carry the architecture ("vmx stock", "svm devirt")."""
    from .hypervisor.configs import SVM_CONFIGS, VMX_CONFIGS
    out = [("native", {})]
    for a, table in (("vmx", VMX_CONFIGS), ("svm", SVM_CONFIGS)):
        if arch in (a, "both"):
            out += [(f"{a} {c}" if arch == "both" else c, {"arch": a, "config": c})
                    for c in table]
    return out


def _cpu_for(cpu, run_arch: str | None):
    """The CPU model of one run: the user's when its vendor fits the run (SVM needs
    an AMD model, VMX an Intel one), else that run's default (None)."""
    if cpu is None or run_arch is None:
        return cpu
    return cpu if (cpu.vendor == "amd") == (run_arch == "svm") else None


def run_all(path, cores: int, cost, *, mem_mb: int = 64, max_ns: int = 1_000_000_000,
            wall_timeout_s: float = 300.0, timelines: list | None = None, progress=None,
            cpu=None, arch: str = "vmx") -> dict:
    """Run ``path`` natively and in every configuration of ``arch`` on CPU model
    ``cpu`` (None: the default; with "both", the runs of the other vendor use
    their default); label -> (RunResult, Estimate)."""
    from .machine import run_program
    from .timeline import Timeline
    out = {}
    for n, (name, kwargs) in enumerate(configurations(arch)):
        if progress is not None:
            progress(name)
        tl = Timeline(cost, label=name, pid=n + 1) if timelines is not None else None
        run_cpu = _cpu_for(cpu, kwargs.get("arch")) if arch == "both" else cpu
        res = run_program(path, cores=cores, mem_mb=mem_mb, max_ns=max_ns,
                          wall_timeout_s=wall_timeout_s, record_exits=False,
                          trace=tl.trace if tl else None,
                          on_machine=tl.attach if tl else None, cpu=run_cpu, **kwargs)
        if tl is not None:
            timelines.append(tl)
        out[name] = (res, cost.estimate(res))
    return out


def rows(runs: dict, cost=None) -> list[dict]:
    """One summary row per configuration (the table, and --json's additions);
    ``cost`` (the cost model) prices the steady-state windows' exits."""
    from .costmodel import CostModel
    cost = cost or CostModel()
    native = runs["native"][1].estimated_ns
    out = []
    for name, (res, est) in runs.items():
        insns = sum(res.instructions)
        exits = sum(res.exit_counts.values())
        out.append({
            "config": name, "verdict": res.verdict, "instructions": insns,
            "virtual_ns": res.virtual_ns, "exits": exits,
            "exits_per_minsn": exits * 1e6 / insns if insns else 0.0,
            "window_exits": sum(res.window_exit_counts.values()),
            "estimated_window_exit_ns": sum(n * cost.exit_cost(k)
                                            for k, n in res.window_exit_counts.items()),
            "estimated_exit_ns": est.exit_ns, "estimated_ns": est.estimated_ns,
            "estimated_overhead": est.estimated_ns / native - 1 if native else 0.0,
        })
    return out


def format_table(runs: dict, cost=None) -> str:
    head = ("config", "verdict", "instructions", "virtual ns", "VM exits", "exits/Minsn",
            "in windows", "est. window ns", "est. exit ns", "est. ns", "est. overhead")
    body = [(r["config"], r["verdict"], str(r["instructions"]), str(r["virtual_ns"]),
             str(r["exits"]), f"{r['exits_per_minsn']:.1f}", str(r["window_exits"]),
             f"{r['estimated_window_exit_ns']:.0f}",
             f"{r['estimated_exit_ns']:.0f}", f"{r['estimated_ns']:.0f}",
             f"{100 * r['estimated_overhead']:+.1f}%") for r in rows(runs, cost)]
    lines = _columns(head, body)
    reasons = sorted({k for res, _ in runs.values() for k in res.exit_counts})
    if reasons:
        names = [n for n in runs if n != "native"]
        lines.append("")
        lines += _columns(("exit reason (total / in windows)", *names),
                          [(k, *(f"{runs[n][0].exit_counts.get(k, 0)} / "
                                 f"{runs[n][0].window_exit_counts.get(k, 0)}" for n in names))
                           for k in reasons])
    lines.append("")
    lines.append("est. = estimated by the cost model (not virtual time); overhead against native")
    return "\n".join(lines)


def _columns(head, body) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(head), line(["-" * w for w in widths])] + [line(b) for b in body]


def plot_paths(path: str) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix.lower() in (".png", ".svg") else p
    return stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".svg")


def plot(runs: dict, path: str, title: str, cost=None) -> tuple[Path, Path]:
    """Exits by reason (stacked) and estimated exit cost by reason, per configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(runs)
    reasons = sorted({k for res, _ in runs.values() for k in res.exit_counts})
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    cmap = plt.get_cmap("tab20")
    bottom_a = [0.0] * len(names)
    bottom_b = [0.0] * len(names)
    summary = rows(runs, cost)
    for i, k in enumerate(reasons):
        counts = [runs[n][0].exit_counts.get(k, 0) for n in names]
        spent = [runs[n][1].exit_ns_by_reason.get(k, 0.0) / 1000 for n in names]
        a.bar(names, counts, bottom=bottom_a, label=k, color=cmap(i % 20))
        b.bar(names, spent, bottom=bottom_b, label=k, color=cmap(i % 20))
        bottom_a = [x + y for x, y in zip(bottom_a, counts)]
        bottom_b = [x + y for x, y in zip(bottom_b, spent)]
    a.set_title("VM exits by reason")
    a.set_ylabel("VM exits")
    b.set_title("estimated exit cost (cost model)")
    b.set_ylabel("estimated µs (all cores)")
    for n, name in enumerate(names):
        b.annotate(f"{100 * summary[n]['estimated_overhead']:+.1f}%",
                   (n, bottom_b[n]), ha="center", va="bottom", fontsize=8)
    if reasons:
        b.legend(fontsize=7, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    png, svg = plot_paths(path)
    fig.savefig(png, dpi=110)
    fig.savefig(svg)
    plt.close(fig)
    return png, svg


def cmd_compare(args) -> int:
    from .asm import AsmError
    from .costmodel import CostModel, CostModelError
    from .platform.core import GuestError
    from . import timeline as timeline_mod

    path = Path(args.program)
    if not path.is_file():
        print(f"devirt-emu: error: no such file: {args.program}", file=sys.stderr)
        return 2
    try:
        cost = CostModel.from_json(args.cost_model) if args.cost_model else CostModel()
    except CostModelError as e:
        print(f"devirt-emu: error: {e}", file=sys.stderr)
        return 2
    for opt in (args.plot, args.timeline):
        if opt is not None and not Path(opt).resolve().parent.is_dir():
            print(f"devirt-emu: error: no such directory for {opt}", file=sys.stderr)
            return 2
    timelines = [] if args.timeline else None
    from .cpumodels.cli import model_from_args
    try:
        cpu = model_from_args(args)
    except ValueError as e:
        print(f"devirt-emu: error: {e}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, BarColumn
    names = [label for label, _ in configurations(args.arch)]
    try:
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task("compare", total=len(names))
            done = []

            def progress(name):
                if done:
                    bar.advance(task)
                done.append(name)
                bar.update(task, description=f"running {path.name} {name}")
            runs = run_all(path, args.cores, cost, mem_mb=args.mem,
                           max_ns=int(args.max_time * 1e9), wall_timeout_s=args.wall_timeout,
                           timelines=timelines, progress=progress, cpu=cpu, arch=args.arch)
            bar.advance(task)
    except (AsmError, GuestError, ValueError, OSError) as e:
        print(f"devirt-emu: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("devirt-emu: interrupted", file=sys.stderr)
        return 130
    written = []
    try:
        if args.timeline:
            timeline_mod.write(args.timeline, timelines)
            written.append(args.timeline)
        if args.plot:
            written += [str(p) for p in plot(runs, args.plot,
                                             f"{path.name}, {args.cores} core(s)", cost)]
    except OSError as e:
        print(f"devirt-emu: error: cannot write {e.filename}: {e.strerror}", file=sys.stderr)
        return 2
    if args.json:
        configs = {}
        for r in rows(runs, cost):
            res, est = runs[r["config"]]
            d = res.to_json()
            d["estimate"] = est.to_json()
            d["estimate"]["window_exit_ns"] = round(r["estimated_window_exit_ns"], 1)
            d["estimated_overhead"] = r["estimated_overhead"]
            d["exits_per_minsn"] = r["exits_per_minsn"]
            configs[r["config"]] = d
        print(json.dumps({"program": str(path), "cores": args.cores, "arch": args.arch,
                          "cost_model": cost.table(), "configs": configs}))
    else:
        print(format_table(runs, cost))
        for w in written:
            print(f"wrote {w}")
    bad = [n for n, (res, _) in runs.items() if res.verdict != runs["native"][0].verdict]
    return 1 if bad else 0
