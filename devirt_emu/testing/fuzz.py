"""``devirt-emu fuzz``: hypothesis-driven property checks of the VMX model.

Each example is either a program of sensitive instructions under drawn
controls (:func:`~devirt_emu.testing.strategies.cases`) or a valid setting with
one VM-entry check broken (:func:`~devirt_emu.testing.strategies.entry_breakage`).
The properties:

1. no internal error: the case API returns (no Python exception), and the
   machine never ends a case for a reason the platform does not model;
2. the outcome is architectural: an exit with a basic reason of the SDM's
   table, a VM-entry failure, or the guest halted;
3. the exit agrees with the pure rule's decision (the exit-information fields
   in the VMCS are the rule's :class:`~devirt_emu.vmx.rules.Decision`) and with
   an independent reference: :func:`reference`, a model of the SDM's
   statements on which instruction exits under which control, bitmap, mask and
   shadow, written apart from ``vmx/rules.py``; a broken entry check fails
   exactly the check it aims at;
4. determinism: running the case again gives the same result.

A failure is shrunk by hypothesis and written to ``--out`` as a ready-to-run
pytest file using the plugin (``pytest -p devirt_emu.testing.plugin FILE``).
On success the command prints what it covered: exit reasons, VM-entry checks,
rule causes.

The SVM side (``--arch svm``, refused for now) plugs in here with its own
case strategies, reference and reproducer template over the SVM case API
(:mod:`devirt_emu.testing.svm_case`).
"""
from __future__ import annotations

import argparse
import json
import os
import pprint
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..vmx import controls as C
from ..vmx import exit_reasons

__all__ = ["FuzzSettings", "FuzzReport", "reference", "Expected", "run_fuzz", "add_parser"]

#: Cases one hypothesis example holds at most.
CASES_PER_EXAMPLE = 8


# --------------------------------------------------------------------------- the reference
@dataclass(frozen=True)
class Expected:
    """What the reference says a case does: ``reason`` (a basic exit reason) at
    step ``step`` (None: the HLT after the code), ``vector`` for an exception
    exit; or ``reason`` None: the guest halts without an exit."""

    reason: Optional[int]
    step: Optional[int] = None
    vector: Optional[int] = None
    why: str = ""


def _bit(bitmap: dict, kind: str, msr: int) -> bool:
    return msr in bitmap.get(kind, ())


def reference(case) -> Expected:
    """The first VM exit of ``case`` (a :class:`~devirt_emu.testing.strategies.Case`)
    by the SDM (Vol. 3C "Instructions That Cause VM Exits Conditionally" and
    "Unconditionally", "Exception Bitmap", "Guest/Host Masks and Read Shadows
    for CR0 and CR4", "CR3-Target Controls", "I/O-Bitmap Addresses", "MSR-Bitmap
    Address"), for the instructions :func:`programs` makes and the controls
    :func:`cases` draws (no window, timer or MTF exits, no TPR shadow).

    An exception that the exception bitmap does not intercept is delivered
    through the fresh guest's IDT, whose gates are not present: the delivery
    raises #GP, then #DF, then a triple fault (SDM "Exception Classes",
    "Interrupt 8: Double Fault"), each intercepted when its bit is set."""
    v = case.vmcs
    proc = v.get("CPU_BASED_VM_EXEC_CONTROL", 0)
    sec = v.get("SECONDARY_VM_EXEC_CONTROL", 0) if proc & C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS else 0
    msr_bm = case.msr_bitmap or {}
    io = set(case.io_bitmap_a) | set(case.io_bitmap_b)
    eb = v.get("EXCEPTION_BITMAP", 0)

    def exception(step: int, vector: int) -> Expected:
        for vec in (vector, 13, 8):
            if eb >> vec & 1:
                return Expected(0, step, vec, f"exception {vec} intercepted by the exception bitmap")
        return Expected(2, step, None, "#UD, #GP, #DF not intercepted: triple fault")

    cr3_targets = [v.get(f"CR3_TARGET_VALUE{i}", 0) for i in range(v.get("CR3_TARGET_COUNT", 0))]
    for i, insn in enumerate(case.program):
        k, ops = insn.kind, insn.operands
        if k == "cpuid":
            return Expected(10, i, why="CPUID always exits")
        if k == "invd":
            return Expected(13, i, why="INVD always exits")
        if k == "vmcall":
            return Expected(18, i, why="VMCALL always exits")
        if k == "hlt":
            if proc & C.CPU_BASED_HLT_EXITING:
                return Expected(12, i, why="HLT exiting")
            return Expected(None, i, why="HLT without HLT exiting halts")
        if k == "pause" and proc & C.CPU_BASED_PAUSE_EXITING:
            return Expected(40, i, why="PAUSE exiting")
        if k == "rdtsc" and proc & C.CPU_BASED_RDTSC_EXITING:
            return Expected(16, i, why="RDTSC exiting")
        if k == "rdtscp":
            if not sec & C.SECONDARY_EXEC_ENABLE_RDTSCP:
                return exception(i, 6)
            if proc & C.CPU_BASED_RDTSC_EXITING:
                return Expected(51, i, why="RDTSC exiting with enable RDTSCP")
        if k == "wbinvd" and sec & C.SECONDARY_EXEC_WBINVD_EXITING:
            return Expected(54, i, why="WBINVD exiting")
        if k in ("rdmsr", "wrmsr"):
            reason, kind = (31, "read") if k == "rdmsr" else (32, "write")
            if not proc & C.CPU_BASED_USE_MSR_BITMAPS or _bit(msr_bm, kind, ops["msr"]):
                return Expected(reason, i, why=f"{k.upper()}: no MSR bitmaps, or its {kind} bit")
        if k in ("in", "out"):
            if proc & C.CPU_BASED_USE_IO_BITMAPS:
                if ops["port"] in io:
                    return Expected(30, i, why="I/O bitmap bit of the port")
            elif proc & C.CPU_BASED_UNCOND_IO_EXITING:
                return Expected(30, i, why="unconditional I/O exiting")
        if k in ("mov_to_cr0", "mov_to_cr4"):
            n = k[-1]
            mask = v.get(f"CR{n}_GUEST_HOST_MASK", 0)
            if (ops["value"] ^ v.get(f"CR{n}_READ_SHADOW", 0)) & mask:
                return Expected(28, i, why=f"MOV to CR{n}: a masked bit differs from the shadow")
        if k == "mov_from_cr3" and proc & C.CPU_BASED_CR3_STORE_EXITING:
            return Expected(28, i, why="CR3-store exiting")
        if k == "mov_to_cr3" and proc & C.CPU_BASED_CR3_LOAD_EXITING and ops["value"] not in cr3_targets:
            return Expected(28, i, why="CR3-load exiting, value not a CR3 target")
        if k == "mov_from_cr8" and proc & C.CPU_BASED_CR8_STORE_EXITING:
            return Expected(28, i, why="CR8-store exiting")
        if k == "mov_to_cr8" and proc & C.CPU_BASED_CR8_LOAD_EXITING:
            return Expected(28, i, why="CR8-load exiting")
        if k == "mov_dr" and proc & C.CPU_BASED_MOV_DR_EXITING:
            return Expected(29, i, why="MOV-DR exiting")
        if k == "invlpg" and proc & C.CPU_BASED_INVLPG_EXITING:
            return Expected(14, i, why="INVLPG exiting")
        if k in ("sgdt", "sidt") and sec & C.SECONDARY_EXEC_DESC:
            return Expected(46, i, why="descriptor-table exiting")
        if k == "rdrand" and sec & C.SECONDARY_EXEC_RDRAND_EXITING:
            return Expected(57, i, why="RDRAND exiting")
        if k == "rdseed" and sec & C.SECONDARY_EXEC_RDSEED_EXITING:
            return Expected(61, i, why="RDSEED exiting")
        if k == "ud2":
            return exception(i, 6)
    if proc & C.CPU_BASED_HLT_EXITING:
        return Expected(12, None, why="the HLT after the code, with HLT exiting")
    return Expected(None, None, why="the HLT after the code halts")


# --------------------------------------------------------------------------- the properties
class PropertyFailure(AssertionError):
    """A property did not hold; ``kind`` names it."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def _observed(r) -> tuple:
    if r.exit is not None:
        e = r.exit
        return ("exit", e.exit_reason, e.qualification, e.instruction_length, e.instruction_info,
                e.interruption_info, e.guest_rip, tuple(sorted(e.regs.items())), r.steps)
    if r.entry_failure is not None:
        f = r.entry_failure
        return ("entry_failure", f.kind, f.check, f.error, f.exit_reason, f.qualification)
    return ("no_exit", r.no_exit.why, r.no_exit.guest_rip, tuple(sorted(r.no_exit.regs.items())),
            r.steps)


def step_address(result, step: Optional[int]) -> int:
    """The address of the sensitive instruction of ``step`` (the label the
    Case's code puts there), or of the HLT after the code."""
    if step is None:
        return result.code_end
    return result.symbols[f"step{step}"]


def check_case(runner, case, coverage: "Coverage") -> int:
    """The four properties for one program case; raises :class:`PropertyFailure`.
    Returns the guest instructions the case retired."""
    try:
        r = case.run(runner)
    except Exception as e:              # (a CaseError is a bug of the strategies, as bad)
        raise PropertyFailure("internal error", f"{type(e).__name__}: {e}") from e
    if r.no_exit is not None and r.no_exit.why == "stopped":
        raise PropertyFailure("internal error", f"the machine stopped the case: {r.no_exit.message}")
    if r.entry_failure is not None:
        raise PropertyFailure("architectural", f"VM entry of a valid setting failed: {r.entry_failure}")
    if r.exit is not None and r.exit.reason not in exit_reasons.BY_NUMBER:
        raise PropertyFailure("architectural", f"exit reason {r.exit.reason} is not in the SDM")
    if r.no_exit is not None and r.no_exit.why not in ("halted",):
        raise PropertyFailure("architectural", f"the case ended without an exit: {r.no_exit}")
    coverage.saw(r)
    if r.exit is not None:
        d, e = r.exit.decision, r.exit
        if d.reason != e.reason or d.qualification != e.qualification or (
                d.instruction_length is not None and d.instruction_length != e.instruction_length):
            raise PropertyFailure("rule", f"the VMCS says {e}, the rule decided {d}")
    want = reference(case)
    if want.reason is None:
        if r.exit is not None:
            raise PropertyFailure("reference", f"expected no exit ({want.why}), got {r.exit} "
                                               f"because {'; '.join(r.exit.cause)}")
        if want.step is not None and r.no_exit.guest_rip != step_address(r, want.step) + 1:
            raise PropertyFailure("reference", f"expected a halt after step {want.step}, got {r.no_exit}")
    else:
        if r.exit is None:
            raise PropertyFailure("reference", f"expected exit {want.reason} "
                                               f"({exit_reasons.name_of(want.reason)}: {want.why}), "
                                               f"got {r.no_exit}")
        if r.exit.reason != want.reason:
            raise PropertyFailure("reference", f"expected exit {want.reason} "
                                               f"({exit_reasons.name_of(want.reason)}: {want.why}), "
                                               f"got {r.exit} because {'; '.join(r.exit.cause)}")
        if want.reason != 2 and r.exit.guest_rip != step_address(r, want.step):
            raise PropertyFailure("reference", f"expected the exit at step {want.step} "
                                               f"({step_address(r, want.step):#x}), got {r.exit}")
        if want.vector is not None and r.exit.interruption_info & 0xFF != want.vector:
            raise PropertyFailure("reference", f"expected vector {want.vector}, got {r.exit}")
    again = case.run(runner)
    if _observed(again) != _observed(r):
        raise PropertyFailure("determinism", f"a rerun gave {again}, the first run {r}")
    return r.steps


def check_breakage(runner, fields: dict, breakage, coverage: "Coverage") -> None:
    """A valid setting enters; with the breakage, entry fails exactly its check."""
    try:
        base = runner.run("cpuid", vmcs=fields)
        r = runner.run("cpuid", vmcs={**fields, **breakage.fields})
    except Exception as e:
        raise PropertyFailure("internal error", f"{type(e).__name__}: {e}") from e
    if base.entry_failure is not None:
        raise PropertyFailure("architectural", f"VM entry of a valid setting failed: {base.entry_failure}")
    if not breakage.matches(r.entry_failure):
        raise PropertyFailure("entry check", f"{breakage.name}: expected the check on {breakage.field}"
                                             f" to fail, got {r.entry_failure or r}")
    coverage.entry_checks[breakage.field] = coverage.entry_checks.get(breakage.field, 0) + 1


# --------------------------------------------------------------------------- coverage
@dataclass
class Coverage:
    """What the run reached: exit reasons, VM-entry checks, rule causes."""

    reasons: dict = field(default_factory=dict)
    entry_checks: dict = field(default_factory=dict)
    causes: dict = field(default_factory=dict)
    halted: int = 0

    def saw(self, r) -> None:
        if r.exit is not None:
            name = r.exit.name
            self.reasons[name] = self.reasons.get(name, 0) + 1
            self.causes[r.exit.cause] = self.causes.get(r.exit.cause, 0) + 1
        elif r.no_exit is not None:
            self.halted += 1


# --------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class FuzzSettings:
    arch: str = "vmx"
    examples: int = 200
    seed: int = 0
    time_s: Optional[float] = None
    out: Optional[str] = None
    progress: bool = True
    #: The CPU model spec (None: the default model) the cases are drawn for and run on.
    cpu: Optional[str] = None


@dataclass
class FuzzReport:
    cases: int
    wall_s: float
    coverage: Coverage
    failure: Optional[str] = None
    failure_kind: Optional[str] = None
    reproducer: Optional[Path] = None

    def to_json(self) -> dict:
        return {"cases": self.cases, "wall_s": round(self.wall_s, 3),
                "cases_per_s": round(self.cases / self.wall_s, 1) if self.wall_s else 0,
                "exit_reasons": self.coverage.reasons, "entry_checks": self.coverage.entry_checks,
                "rule_causes": len(self.coverage.causes), "halted": self.coverage.halted,
                "failure": self.failure, "failure_kind": self.failure_kind,
                "reproducer": str(self.reproducer) if self.reproducer else None}


class _Progress:
    """A rich live line: cases, cases/s, reasons and entry checks reached, failures."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.live = None
        if self.enabled:
            from rich.console import Console
            from rich.live import Live
            self.live = Live(console=Console(stderr=True), refresh_per_second=4, transient=True)
            self.live.start()

    def update(self, cases: int, cov: Coverage, failures: int) -> None:
        if self.live is None:
            return
        from rich.text import Text
        dt = time.perf_counter() - self.t0
        self.live.update(Text(
            f"fuzz vmx: {cases} cases, {cases / dt if dt else 0:,.0f} cases/s, "
            f"{len(cov.reasons)} exit reasons, {len(cov.entry_checks)} entry checks, "
            f"{len(cov.causes)} rule causes, failures: {failures}"))

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()


def run_fuzz(cfg: FuzzSettings) -> FuzzReport:
    """Run the property checks; stop at the first failure (shrunk and written
    out), after at least ``cfg.examples`` cases, or after ``cfg.time_s`` seconds
    (then ``examples`` is a cap only in the sense that the rounds stop there)."""
    if cfg.arch != "vmx":
        raise ValueError(f"--arch {cfg.arch}: only vmx can be fuzzed yet")
    from hypothesis import HealthCheck, Phase, given, seed, settings, target
    from hypothesis import strategies as st

    from . import strategies as vs
    from .vmx_case import CaseRunner

    runner = CaseRunner(cpu=cfg.cpu)
    cov = Coverage()
    state = {"cases": 0, "failures": 0, "last": None}
    progress = _Progress(cfg.progress)
    deadline = None if cfg.time_s is None else time.perf_counter() + cfg.time_s
    # several cases per hypothesis example: its own cost per example (about 2 ms
    # measured on a loaded 2-core machine) is more than a case's; a failure
    # shrinks to a list of one
    one = st.one_of(st.tuples(st.just("case"), vs.cases(model=cfg.cpu)),
                    st.tuples(st.just("entry"), vs.entry_breakage(model=cfg.cpu)))
    example = st.lists(one, min_size=1, max_size=CASES_PER_EXAMPLE)

    class _OutOfTime(Exception):
        pass

    def prop(items):
        if deadline is not None and time.perf_counter() > deadline and state["failures"] == 0:
            raise _OutOfTime()
        steps = 0
        for item in items:
            kind, x = item
            state["cases"] += 1
            try:
                if kind == "case":
                    steps += check_case(runner, x, cov)
                else:
                    check_breakage(runner, x[0], x[2], cov)
            except PropertyFailure as e:
                state["failures"] += 1
                state["last"] = (item, e)    # the last failing call is the shrunk example
                raise
            finally:
                if state["cases"] % 25 == 0:
                    progress.update(state["cases"], cov, state["failures"])
        # hypothesis's targeted search: towards programs that run further before
        # their exit (more of the platform's non-root execution between exits)
        target(float(steps), label="guest instructions retired before the exits")

    examples = max(1, min(cfg.examples, 1 << 20) // CASES_PER_EXAMPLE * 2)   # (4.5 cases each)
    batch = examples if deadline is None else min(examples, 50)
    t0 = time.perf_counter()
    failure = None
    round_ = 0
    try:
        while True:
            test = settings(max_examples=batch, deadline=None, database=None, derandomize=False,
                            suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
                            phases=[Phase.generate, Phase.target, Phase.shrink],
                            )(given(example)(prop))
            test = seed(cfg.seed + round_)(test)
            try:
                test()
            except _OutOfTime:
                break
            except PropertyFailure:
                failure = state["last"]
                break
            round_ += 1
            if state["cases"] >= cfg.examples or (deadline is not None and time.perf_counter() > deadline):
                break
    finally:
        progress.stop()
    wall = time.perf_counter() - t0
    report = FuzzReport(state["cases"], wall, cov)
    if failure is not None:
        item, err = failure
        report.failure, report.failure_kind = str(err), err.kind
        out = Path(cfg.out or ".")
        out.mkdir(parents=True, exist_ok=True)
        report.reproducer = write_reproducer(out, item, err, cfg)
    return report


# --------------------------------------------------------------------------- reproducers
_HEADER = '''"""A reproducer written by `devirt-emu fuzz --arch vmx --seed {seed}{cpu}`.

Property: {kind}.  What failed (shrunk by hypothesis):
{message}

Run: pytest -p devirt_emu.testing.plugin {name}
(the plugin is loaded by itself where devirt-emu is installed).
"""
from devirt_emu.testing.asserts import assert_entry_fails, assert_exit, assert_no_exit

'''


def _literal(value, indent: int = 0) -> str:
    """``value`` as Python source, ints in hex (field values read as the SDM writes them)."""
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = [f"{pad}{k!r}: {_literal(v, indent + 4)}," for k, v in value.items()]
        return "{\n" + "\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, (list, tuple)) and all(isinstance(x, int) for x in value):
        return "[" + ", ".join(f"{x:#x}" for x in value) + "]"
    if isinstance(value, bool) or not isinstance(value, int):
        return pprint.pformat(value, width=90)
    return f"{value:#x}"


def _non_default(case) -> dict:
    """The case's arguments less what the fresh case already has (the reproducer
    then shows only what matters: few non-default fields)."""
    from .strategies import FRESH_CR0, FRESH_CR4
    from .vmx_case import DEFAULT_CONTROLS
    fresh = {**DEFAULT_CONTROLS, "CR0_READ_SHADOW": FRESH_CR0, "CR4_READ_SHADOW": FRESH_CR4 & ~(1 << 13)}
    kw = case.kwargs()
    kw["vmcs"] = {k: v for k, v in kw["vmcs"].items() if fresh.get(k, 0) != v}
    bm = kw.get("msr_bitmap")
    if bm is not None:
        bm = {k: v for k, v in bm.items() if v}
        if bm:
            kw["msr_bitmap"] = bm
        else:
            del kw["msr_bitmap"]
    return kw


def _runner_line(cfg: FuzzSettings) -> str:
    """For a CPU model other than the default: a ``vmx_case`` fixture of this
    file that runs on that model (the plugin's runs on the default one)."""
    if cfg.cpu is None:
        return ""
    return ("import pytest\n"
            "from devirt_emu.testing.vmx_case import CaseRunner\n\n\n"
            "@pytest.fixture(scope=\"module\")\n"
            f"def vmx_case():\n    return CaseRunner(cpu={cfg.cpu!r}).run   # the model fuzzed\n\n\n")


def write_reproducer(out: Path, item, err: PropertyFailure, cfg: FuzzSettings) -> Path:
    """Write ``item`` (the shrunk failing example) as a pytest file in ``out``."""
    kind, x = item
    n = 1
    while (out / f"test_fuzz_repro_{n}.py").exists():
        n += 1
    path = out / f"test_fuzz_repro_{n}.py"
    message = "\n".join("    " + line for line in str(err).splitlines())
    text = _HEADER.format(seed=cfg.seed, cpu=f" --cpu {cfg.cpu}" if cfg.cpu else "",
                          kind=err.kind, message=message.replace('"""', "'''"), name=path.name)
    if kind == "case":
        case = x
        want = reference(case)
        text += f"CODE = {case.code!r}\n\nKWARGS = {_literal(_non_default(case))}\n\n\n"
        text += _runner_line(cfg)
        text += "def test_reproducer(vmx_case):\n    r = vmx_case(CODE, **KWARGS)\n"
        if want.reason is None:
            text += f"    # the reference: {want.why}\n    assert_no_exit(r, why=\"halted\")\n"
        else:
            where = "r.code_end" if want.step is None else f"r.symbols[\"step{want.step}\"]"
            text += f"    # the reference (the SDM): {want.why}\n"
            if want.reason == 2:
                text += f"    assert_exit(r, reason={want.reason})\n"
            else:
                text += f"    assert_exit(r, reason={want.reason}, rip={where})\n"
            if want.vector is not None:
                text += f"    assert r.exit.interruption_info & 0xFF == {want.vector}\n"
            text += ("    # the exit-information fields are the rule's decision\n"
                     "    d = r.exit.decision\n"
                     "    assert (d.reason, d.qualification) == (r.exit.reason, r.exit.qualification)\n")
        text += ("    # a rerun gives the same result: outcome, steps, exit fields, registers\n"
                 "    assert _seen(vmx_case(CODE, **KWARGS)) == _seen(r)\n\n\n"
                 "def _seen(r):\n"
                 "    e = r.exit or r.no_exit\n"
                 "    fields = r.exit and (r.exit.exit_reason, r.exit.qualification, "
                 "r.exit.guest_rip)\n"
                 "    return r.outcome, r.steps, fields, e and dict(e.regs)\n")
    else:
        fields, _, b = x
        text += (f"FIELDS = {_literal(dict(fields))}\n\nBREAKAGE = {_literal(dict(b.fields))}\n\n\n"
                 f"{_runner_line(cfg)}"
                 f"def test_reproducer(vmx_case):\n"
                 f"    # {b.name}\n"
                 f"    assert vmx_case(\"cpuid\", vmcs=FIELDS).entry_failure is None\n"
                 f"    r = vmx_case(\"cpuid\", vmcs={{**FIELDS, **BREAKAGE}})\n")
        if b.error is not None:
            text += f"    assert_entry_fails(r, error={b.error}, field={b.field!r})\n"
        else:
            text += (f"    assert_entry_fails(r, exit_reason={b.exit_reason:#x}, "
                     f"qualification={b.qualification}, field={b.field!r})\n")
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- the command
FUZZ_EPILOG = """\
properties: no internal error; every outcome architectural; the exit agrees
with the pure rule's decision and with an independent reference of the SDM's
exit conditions; a broken VM-entry check fails exactly that check; reruns are
deterministic.

exit status: 0 no failure found, 1 a failure (its shrunk reproducer is written
to --out as test_fuzz_repro_N.py), 2 bad input.
"""


def add_parser(sub) -> None:
    """Register ``fuzz`` on the CLI's subparsers (one line in cli.build_parser)."""
    f = sub.add_parser("fuzz", help="property-check the exit rules and entry checks with hypothesis",
                       description="Property-check the VMX model with hypothesis: programs of "
                                   "sensitive instructions under drawn controls, and VM-entry "
                                   "checks broken one at a time.",
                       epilog=FUZZ_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--arch", choices=("vmx", "svm"), default="vmx",
                   help="vmx (default); svm is refused until it has strategies and a reference")
    f.add_argument("--examples", type=_positive, default=None, metavar="N",
                   help="cases to run, at least (default 200, or no limit with --time; "
                        f"hypothesis draws up to {CASES_PER_EXAMPLE} per example)")
    f.add_argument("--seed", type=int, default=0, metavar="S", help="hypothesis seed (default 0)")
    f.add_argument("--time", type=_seconds, default=None, metavar="T",
                   help="stop after T wall seconds (or at --examples, if given, first)")
    f.add_argument("--out", default=".", metavar="DIR",
                   help="where a reproducer is written (default: the current directory)")
    f.add_argument("--cpu", metavar="SPEC", default=None,
                   help="the CPU model whose capability MSRs the cases follow and run on "
                        "(a name or NAME,+FEATURE,-FEATURE; default: the default model; "
                        "see `devirt-emu cpus`)")
    f.add_argument("--json", action="store_true", help="print the report as one JSON object")
    f.set_defaults(func=cmd_fuzz)


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return v


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text}")
    return v


def cmd_fuzz(args) -> int:
    if args.arch != "vmx":
        print("devirt-emu: error: --arch svm: not yet: fuzzing needs SVM strategies and a "
              "reference over the SVM case API; only vmx can be fuzzed", file=sys.stderr)
        return 2
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        print(f"devirt-emu: error: --out {args.out} is not a directory", file=sys.stderr)
        return 2
    if args.cpu is not None:
        from ..cpumodels import CpuModelError, get_model
        try:
            get_model(args.cpu)
        except CpuModelError as e:
            print(f"devirt-emu: error: --cpu: {e}", file=sys.stderr)
            return 2
    examples = args.examples or (1 << 62 if args.time else 200)
    cfg = FuzzSettings(arch=args.arch, examples=examples, seed=args.seed, time_s=args.time,
                       out=args.out, progress=not args.json, cpu=args.cpu)
    report = run_fuzz(cfg)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 1 if report.failure else 0
    rate = report.cases / report.wall_s if report.wall_s else 0
    print(f"{report.cases} cases in {report.wall_s:.1f} s ({rate:,.0f} cases/s)")
    if report.failure:
        print(f"FAILED ({report.failure_kind}): {report.failure}")
        print(f"reproducer: {report.reproducer}  (pytest -p devirt_emu.testing.plugin {report.reproducer})")
        return 1
    cov = report.coverage
    print(f"no failure.  covered: {len(cov.reasons)} exit reasons, {len(cov.entry_checks)} "
          f"VM-entry checks, {len(cov.causes)} distinct rule causes, {cov.halted} halts")
    print("  exit reasons: " + ", ".join(f"{k} {v}" for k, v in sorted(cov.reasons.items())))
    print("  entry checks: " + ", ".join(f"{k} {v}" for k, v in sorted(cov.entry_checks.items())))
    return 0
