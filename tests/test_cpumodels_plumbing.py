"""The selected CPU model reaches everything that reads capabilities: the
machine and its cores (CPUID, MSRs), the VMX vCPU (entry checks, VMCS fields,
EPT capabilities), the case API, and the CLI (--cpu, --vmx-msrs, cpus).

Expectations are architectural (SDM Vol. 3C 26.2.1: a control whose
allowed-1 bit is 0 fails VM entry with VMfailValid 7; Vol. 3D Appendix A:
which MSRs exist; Vol. 4: RDMSR of a missing MSR raises #GP) and the parts'
documentation (what each generation has), not outputs of the code under test.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devirt_emu.cpumodels import CpuModelError, get_model
from devirt_emu.machine import Machine
from devirt_emu.platform import msrs
from devirt_emu.platform.lapic import GeneralProtection
from devirt_emu.testing.vmx_case import CaseError, CaseRunner, legal_controls, run_case
from devirt_emu.vmx.entry import EntryCaps
from devirt_emu.vmx.vmcs import Vmcs, VmxInstructionError
from devirt_emu.platform.memory import PhysMem

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "guest_tests" / "hello.S"
UG, EPT = 1 << 7, 1 << 1
SEC_ACTIVATE = 1 << 31
VMXERR_ENTRY_INVALID_CONTROL_FIELD = 7
VMXERR_UNSUPPORTED_VMCS_COMPONENT = 12
PLE_GAP = 0x4020


def cli(*args):
    return subprocess.run([sys.executable, "-m", "devirt_emu", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def one_error_line(p):
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("devirt-emu: error: ")
    return lines[0]


# ---------------------------------------------------------------- machine and cores
def test_machine_takes_a_model_or_a_spec():
    assert Machine().cpu.name == "skylake-server"
    m = Machine(cpu="icelake-server")
    assert m.cpu is get_model("icelake-server") and m.cores[0].cpu is m.cpu
    assert Machine(cpu=get_model("nehalem")).cpu.name == "nehalem"
    with pytest.raises(CpuModelError):
        Machine(cpu="nosuchcpu")


def test_cores_answer_cpuid_and_msrs_from_the_model():
    core = Machine(cpu="nehalem").cores[0]
    # CPUID.1:EAX is the Nehalem-EP signature; after RESET EDX holds it too (SDM Vol. 3A,
    # "Processor State Following Power-up, Reset, or INIT").
    assert core.cpu.cpuid_for(1, 0, 0, 1)[0] == 0x106A5
    assert core.uc.reg_read(__import__("unicorn").x86_const.UC_X86_REG_EDX) == 0x106A5
    # no TSC-deadline timer on Nehalem: IA32_TSC_DEADLINE does not exist (#GP)
    with pytest.raises(GeneralProtection):
        msrs.check_read(0x6E0, core.cpu)
    msrs.check_read(0x6E0, get_model("skylake-server"))


@pytest.mark.parametrize("name", ["skylake-server", "westmere", "sapphire-rapids"])
def test_capability_msrs_read_back_and_absent_ones_gp(name):
    m = get_model(name)
    for index in range(0x480, 0x494):
        if index in m.vmx_msrs:
            assert msrs.read_vmx_capability(index, m) == m.vmx_msrs[index]
        else:
            with pytest.raises(GeneralProtection):
                msrs.read_vmx_capability(index, m)
    assert 0x491 not in m.vmx_msrs          # VM functions are not advertised: IA32_VMX_VMFUNC absent


# ---------------------------------------------------------------- VMX layer
def test_entry_caps_follow_the_model():
    nhm, skx = EntryCaps.for_model("nehalem"), EntryCaps.for_model("skylake-server")
    assert not nhm.procbased2[1] & UG and skx.procbased2[1] & UG
    assert nhm.maxphyaddr == 40 and skx.maxphyaddr == 46
    assert EntryCaps.modelled() == skx


def test_vmcs_fields_follow_the_model():
    mem = PhysMem(1 << 16)
    skx = Vmcs.format(mem, 0x1000, model="skylake-server")
    skx.vmwrite(PLE_GAP, 128)                         # PAUSE-loop exiting: the field exists
    nhm = Vmcs.format(mem, 0x2000, model="nehalem")
    with pytest.raises(VmxInstructionError) as e:     # not on Nehalem (SDM App. B footnote)
        nhm.vmwrite(PLE_GAP, 128)
    assert e.value.errno == VMXERR_UNSUPPORTED_VMCS_COMPONENT


def test_unrestricted_guest_enters_on_westmere_and_fails_on_nehalem():
    fields = {"CPU_BASED_VM_EXEC_CONTROL": SEC_ACTIVATE, "SECONDARY_VM_EXEC_CONTROL": UG | EPT}
    ok = run_case("cpuid", vmcs=fields, legal=True, ept="identity", cpu="westmere")
    assert ok.exit is not None and ok.exit.reason == 10
    # the primary controls legal on nehalem, the secondary ones as given
    fields = legal_controls({"CPU_BASED_VM_EXEC_CONTROL": SEC_ACTIVATE}, "nehalem")
    fields["SECONDARY_VM_EXEC_CONTROL"] = UG | EPT
    bad = run_case("cpuid", vmcs=fields, ept="identity", cpu="nehalem")
    assert bad.entry_failure is not None and bad.entry_failure.error == VMXERR_ENTRY_INVALID_CONTROL_FIELD
    assert bad.exit is None
    # legal=True on nehalem clears the bit the part does not allow
    assert legal_controls({"SECONDARY_VM_EXEC_CONTROL": UG | EPT}, "nehalem") == \
        {"SECONDARY_VM_EXEC_CONTROL": EPT}


def test_case_runner_on_a_model():
    r = CaseRunner(cpu="sapphire-rapids")
    assert r.cpu.name == "sapphire-rapids"
    # "enable user wait and pause" is a Sapphire Rapids control, not a Skylake-SP one
    fields = legal_controls({"CPU_BASED_VM_EXEC_CONTROL": SEC_ACTIVATE})
    fields["SECONDARY_VM_EXEC_CONTROL"] = 1 << 26
    assert r.run("cpuid", vmcs=fields).exit.reason == 10
    bad = run_case("cpuid", vmcs=fields)
    assert bad.entry_failure.error == VMXERR_ENTRY_INVALID_CONTROL_FIELD
    with pytest.raises(CaseError):
        run_case("cpuid", cpu="bogus")
    with pytest.raises(CaseError, match="not a VMCS field"):
        run_case("cpuid", vmcs={"PLE_GAP": 1}, cpu="nehalem")


def test_kvm_needs_unrestricted_guest():
    with pytest.raises(ValueError, match="unrestricted guest"):
        Machine(arch="vmx", cpu="nehalem", mem_mb=64)


# ---------------------------------------------------------------- CLI
def test_cli_cpus_lists_and_shows():
    p = cli("cpus")
    assert p.returncode == 0 and "skylake-server" in p.stdout and "nehalem" in p.stdout
    p = cli("cpus", "westmere", "--json")
    d = json.loads(p.stdout)
    assert d["name"] == "westmere" and d["maxphyaddr"] == 40
    assert "SECONDARY_EXEC_UNRESTRICTED_GUEST" in d["features"]
    assert d["vmx_msrs"]["0x480"].startswith("0x")
    p = cli("cpus", "nehalem")
    assert p.returncode == 0 and "0x48b" in p.stdout and "absent" in p.stdout


@pytest.mark.parametrize("args,words", [
    (("cpus", "pentium"), "unknown CPU model"),
    (("cpus", "skylake-server,+nope"), "unknown CPU feature"),
    (("run", HELLO, "--cpu", "nehalem,pcid"), "is not +FEATURE"),
    (("run", HELLO, "--cpu", "westmere"), "the firmware uses x2apic"),
    (("run", HELLO, "--cpu", "skylake-server", "--vmx-msrs", "/no/such/file"), "cannot read"),
])
def test_cli_bad_cpu_input_is_one_line(args, words):
    p = cli(*args)
    assert p.returncode == 2
    assert words in one_error_line(p)


def test_cli_run_with_cpu_and_vmx_msrs(tmp_path):
    p = cli("run", HELLO, "--cpu", "icelake-server", "--arch", "vmx", "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["cpu"] == "icelake-server"
    # a dump of westmere's MSRs, in rdmsr's one-value-per-line form
    v = get_model("westmere").vmx_msrs
    dump = tmp_path / "msrs.txt"
    dump.write_text("\n".join(f"{v[i]:x}" if i in v else "-" for i in range(0x480, 0x494)) + "\n")
    p = cli("cpus", "--vmx-msrs", dump, "--json")
    assert json.loads(p.stdout)["vmx_msrs"] == {f"{i:#x}": f"{x:#018x}" for i, x in v.items()}
    p = cli("run", HELLO, "--arch", "vmx", "--vmx-msrs", dump, "--json")
    assert p.returncode == 0, p.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"0x480": "zz"}')
    assert "not a hexadecimal number" in one_error_line(cli("run", HELLO, "--vmx-msrs", bad))


@pytest.mark.parametrize("args,words", [
    (("compare", HELLO, "--cpu", "bogus"), "unknown CPU model"),
    (("debug", HELLO, "--cpu", "skylake-server,+nope"), "unknown CPU feature"),
])
def test_compare_and_debug_take_cpu(args, words):
    p = cli(*args)
    assert p.returncode == 2
    assert words in one_error_line(p)


def test_compare_runs_on_the_model():
    p = cli("compare", HELLO, "--cpu", "icelake-server", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert {run["cpu"] for run in d["configs"].values()} == {"icelake-server"}
