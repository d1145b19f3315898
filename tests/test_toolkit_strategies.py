"""The hypothesis strategies of devirt_emu.testing.strategies.

Expectations: what the modelled CPU's own VM-entry checks say (SDM "Checks on
VMX Controls and Host-State Area", "Checks on the Guest State Area"): a valid
setting enters, a broken one fails the check it aims at with the error the SDM
gives that class of check (VMfailValid 7 for controls, 8 for host state, a
VM-entry failure exit with reason 33 for guest state); a minimal failing
example shrinks to few instructions and no optional control bit.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, find, given, settings

from devirt_emu.testing import strategies as vs
from devirt_emu.testing.vmx_case import DEFAULT_CONTROLS, CaseRunner
from devirt_emu.vmx import capabilities as caps
from devirt_emu.vmx import controls as C

FAST = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def runner():
    return CaseRunner()


@pytest.mark.parametrize("table", ["PINBASED", "PROCBASED", "PROCBASED2", "EXIT", "ENTRY"])
def test_control_words_pass_their_allowed_settings(table):
    @FAST
    @given(vs.control_word(table))
    def check(value):
        assert caps.is_allowed(table, value) == []
    check()


def test_valid_controls_enter(runner):
    @FAST
    @given(vs.vmx_controls())
    def check(fe):
        fields, ept = fe
        r = runner.run("cpuid", vmcs=fields, ept="identity" if ept else None)
        assert r.entry_failure is None, str(r.entry_failure)
        # CPUID exits unconditionally; before it, the exits at the boundary after
        # VM entry that the controls can ask for: the preemption timer (value 0),
        # the NMI window (no blocking), the monitor trap flag does not come first
        assert r.exit is not None and r.exit.reason in (10, 52, 8), str(r.exit)
    check()


def _base():
    fields = dict(DEFAULT_CONTROLS)
    return vs._fix_dependencies(fields, False)[0]


@pytest.mark.parametrize("breakage", vs.breakages(_base()), ids=lambda b: b.name)
def test_each_breakage_fails_exactly_its_check(runner, breakage):
    base = _base()
    assert runner.run("cpuid", vmcs=base).entry_failure is None
    r = runner.run("cpuid", vmcs={**base, **breakage.fields})
    f = r.entry_failure
    assert f is not None, f"{breakage.name}: VM entry succeeded"
    assert breakage.matches(f), f"{breakage.name}: the entry code reported {f} (field {f.field})"
    if breakage.error is not None:
        assert r.vmcs["VM_INSTRUCTION_ERROR"] == breakage.error
    else:
        assert r.vmcs["VM_EXIT_REASON"] == breakage.exit_reason
        assert r.vmcs["EXIT_QUALIFICATION"] == breakage.qualification


def test_breakages_of_drawn_settings_fail_their_check(runner):
    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(vs.entry_breakage())
    def check(x):
        fields, ept, b = x
        assert runner.run("cpuid", vmcs=fields).entry_failure is None
        f = runner.run("cpuid", vmcs={**fields, **b.fields}).entry_failure
        assert b.matches(f), f"{b.name}: {f}"
    check()


def test_guest_states_pass_the_guest_state_checks(runner):
    @FAST
    @given(vs.guest_states())
    def check(g):
        r = runner.run("cpuid", vmcs=g)
        assert r.entry_failure is None, f"{g}: {r.entry_failure}"
    check()


def test_exception_bitmaps_and_cr_masks_enter(runner):
    @FAST
    @given(vs.exception_bitmaps(), vs.cr_masks())
    def check(eb, cr):
        assert eb["EXCEPTION_BITMAP"] < 1 << 32
        assert cr["CR3_TARGET_COUNT"] <= 4
        r = runner.run("cpuid", vmcs={**eb, **cr})
        assert r.entry_failure is None, str(r.entry_failure)
    check()


def test_cases_enter_and_end_architecturally(runner):
    @FAST
    @given(vs.cases())
    def check(case):
        r = case.run(runner)
        assert r.entry_failure is None, str(r.entry_failure)
        # the programs fault nowhere the platform cannot model: an exit, or the
        # guest halted (HLT without HLT exiting, or the HLT after the code)
        assert r.exit is not None or r.no_exit.why == "halted", str(r)
    check()


def test_programs_shrink_to_the_one_instruction_that_matters():
    p = find(vs.programs(), lambda prog: any(i.kind == "wrmsr" for i in prog),
             settings=settings(max_examples=2000, database=None))
    assert len(p) == 1 and p[0].kind == "wrmsr"


def test_controls_shrink_to_no_optional_bit():
    fe = find(vs.vmx_controls(), lambda fe: fe[0]["CPU_BASED_VM_EXEC_CONTROL"] & C.CPU_BASED_HLT_EXITING,
              settings=settings(max_examples=2000, database=None))
    fields, ept = fe
    must1 = caps.allowed_settings("PROCBASED")[0]
    assert fields["CPU_BASED_VM_EXEC_CONTROL"] == must1 | C.CPU_BASED_HLT_EXITING
    assert fields["SECONDARY_VM_EXEC_CONTROL"] == 0 and not ept


def test_msr_and_io_bitmaps_name_only_bitmap_msrs_and_ports():
    @FAST
    @given(vs.msr_bitmaps(), vs.io_ports())
    def check(bm, ports):
        for m in bm["read"] + bm["write"]:
            assert m <= 0x1FFF or 0xC0000000 <= m <= 0xC0001FFF
        assert all(0 <= p <= 0xFFFF for p in ports)
    check()


def test_the_docs_example_runs(runner):
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / "testing.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "docs/testing.md", "exec"), scope)
    settings(max_examples=20, deadline=None)(scope["test_every_case_ends_architecturally"])(runner)


@pytest.mark.parametrize("model", ["nehalem", "westmere", "icelake-server", "sapphire-rapids"])
def test_strategies_follow_the_cpu_model(model):
    """On each CPU model: the control words pass that model's allowed settings,
    its valid settings enter on a runner of that model, and each breakage fails
    its check there."""
    runner = CaseRunner(cpu=model)

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(vs.entry_breakage(model=model))
    def check(x):
        fields, ept, b = x
        for table, name in vs.WORDS.items():
            if name == "SECONDARY_VM_EXEC_CONTROL" and not (
                    fields["CPU_BASED_VM_EXEC_CONTROL"] & C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS):
                continue
            assert caps.is_allowed(table, fields[name], model=model) == []
        base = runner.run("cpuid", vmcs=fields)
        assert base.entry_failure is None, str(base.entry_failure)
        f = runner.run("cpuid", vmcs={**fields, **b.fields}).entry_failure
        assert b.matches(f), f"{b.name}: {f}"
    check()


def test_cases_carry_their_model():
    case = find(vs.cases(model="westmere"), lambda c: True, settings=settings(database=None))
    assert case.cpu == "westmere"
    r = case.run()                      # run_case on a westmere runner
    assert r.entry_failure is None
