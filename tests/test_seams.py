"""The two declared seams (devirt_emu.virt) and who implements them."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from devirt_emu import virt
from devirt_emu.hypervisor.kvm import KvmL0
from devirt_emu.machine import run_program
from devirt_emu.svm.vcpu import SvmVcpu
from devirt_emu.testing.svm_case import _RecordingL0 as _SvmRecordingL0
from devirt_emu.testing.vmx_case import _RecordingL0
from devirt_emu.vmx.rules import exit_decision
from devirt_emu.vmx.vcpu import VmxVcpu

from test_guests import GUEST_DIR


def _protocol_methods(proto) -> list[str]:
    return [n for cls in proto.__mro__ if getattr(cls, "_is_protocol", False)
            for n, v in vars(cls).items() if inspect.isfunction(v) and not n.startswith("_")]


@pytest.mark.parametrize("cls, proto", [
    (VmxVcpu, virt.VirtualizationLayer),
    (KvmL0, virt.MachineHypervisor),
    (_RecordingL0, virt.Hypervisor),
    (SvmVcpu, virt.VirtualizationLayer),
    (_SvmRecordingL0, virt.Hypervisor),
])
def test_implementations_declare_and_implement_their_protocol(cls, proto):
    assert proto in cls.__mro__             # stated in the class line
    methods = _protocol_methods(proto)
    assert methods                           # (the protocol declares something)
    for name in methods:
        impl = getattr(cls, name)
        # implemented by the class, not inherited as the protocol's empty body
        assert impl is not getattr(proto, name), f"{cls.__name__}.{name} is the protocol's stub"
        want = list(inspect.signature(getattr(proto, name)).parameters)
        got = list(inspect.signature(impl).parameters)
        assert len(got) == len(want), f"{cls.__name__}.{name}{inspect.signature(impl)}"


def test_the_protocols_are_the_seams_the_core_and_the_vcpu_call():
    # what the platform and the vCPU call on ``core.virt`` and ``vcpu.l0`` is declared:
    # every such call in the sources names a protocol method
    import re
    from pathlib import Path
    root = Path(virt.__file__).parent
    layer = set(_protocol_methods(virt.VirtualizationLayer))
    hyp = set(_protocol_methods(virt.MachineHypervisor))
    called_layer, called_hyp = set(), set()
    for path in root.rglob("*.py"):
        text = path.read_text()
        called_layer |= set(re.findall(r"\bvirt\.([a-z_]+)\(", text))
        called_hyp |= set(re.findall(r"\bl0\.([a-z_]+)\(", text))
    assert called_layer and called_layer <= layer, called_layer - layer
    assert called_hyp and called_hyp <= hyp, called_hyp - hyp


def test_delivery_is_neutral():
    d = virt.Delivery(0x80, virt.EventType.SOFTWARE_INTERRUPT)
    assert d.software and d.error_code is None
    assert not virt.Delivery(14, virt.EventType.HARDWARE_EXCEPTION, 2).software


def test_the_l0_acts_on_the_vmcs_not_on_the_rules_decision(monkeypatch):
    # The L0 reads the exit information through VMREAD.  Replace the rule's Decision
    # (vcpu.last_exit, kept for traces) with nonsense before every exit is handled:
    # the guest boots and runs as before, exit for exit (CPUID, CR accesses, MSRs,
    # I/O, EPT violations, HLT, external interrupts...).
    bogus = exit_decision("VMCALL", ("corrupted by the test",), qualification=0xDEAD_BEEF,
                          instruction_length=15, guest_physical_address=0xBAD000)
    handle = KvmL0.handle_exit
    seen = []

    def corrupt_then_handle(self, vcpu):
        seen.append(vcpu.last_exit.name)
        vcpu.last_exit = bogus
        return handle(self, vcpu)
    program = GUEST_DIR / "lapic_timer.S"
    clean = run_program(program, cores=2, arch="vmx", config="stock")
    monkeypatch.setattr(KvmL0, "handle_exit", corrupt_then_handle)
    dirty = run_program(program, cores=2, arch="vmx", config="stock")
    assert clean.verdict == dirty.verdict == "pass", dirty.message
    assert dirty.serial == clean.serial
    assert dirty.exit_counts == clean.exit_counts
    assert dirty.instructions == clean.instructions
    assert {"CPUID", "CR_ACCESS", "MSR_WRITE", "IO_INSTRUCTION", "EPT_VIOLATION"} <= set(seen)


# ---------------------------------------------------------------- no reaching into Core or Machine
ROOT = Path(__file__).resolve().parent.parent
_PLATFORM_SIDE = sorted((ROOT / "devirt_emu" / "platform").glob("*.py")) + [ROOT / "devirt_emu" / "machine.py"]


def _private_names(paths) -> set[str]:
    """The private attributes and methods the platform's classes define."""
    names = set()
    for p in paths:
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and \
                    n.value.id == "self" and n.attr.startswith("_") and not n.attr.startswith("__"):
                names.add(n.attr)
            elif isinstance(n, ast.FunctionDef) and n.name.startswith("_") and \
                    not n.name.startswith("__"):
                names.add(n.name)
    return names


def private_platform_accesses(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, attribute) of every ``expr._name`` in ``source`` with ``_name`` a
    private attribute of Core or Machine and ``expr`` not ``self``."""
    return [(n.lineno, n.attr) for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Attribute) and n.attr in names
            and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))]


def test_no_module_outside_the_platform_touches_private_core_or_machine_state():
    names = _private_names(_PLATFORM_SIDE)
    assert {"_in_run", "_uncount", "_stop_reason", "_slice"} <= names
    found = []
    for d in ("devirt_emu", "tests", "benchmarks"):
        for p in sorted((ROOT / d).rglob("*.py")):
            if p in _PLATFORM_SIDE:
                continue
            found += [(str(p.relative_to(ROOT)), line, attr)
                      for line, attr in private_platform_accesses(p.read_text(), names)]
    assert found == []


def test_the_private_access_check_can_fail():
    names = _private_names(_PLATFORM_SIDE)
    assert private_platform_accesses("core._uncount += 1\nm._loop(0)\n", names) == \
        [(1, "_uncount"), (2, "_loop")]
    assert private_platform_accesses("self._uncount = 0\ncore.count(k)\n", names) == []
