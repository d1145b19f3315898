"""VMRUN's consistency checks (AMD APM Vol. 2, 15.5.1 and 15.20): a valid VMCB
passes; each invalid one, broken in one place, fails with the check the APM
names (the #VMEXIT's exit code is VMEXIT_INVALID)."""
import pytest

from devirt_emu.platform.memory import PhysMem
from devirt_emu.svm import vmrun
from devirt_emu.svm.amd_cpu import SvmCaps
from devirt_emu.svm.vmcb import Vmcb

W4_VMRUN = 1 << 0                    # intercepts[4] bit 0 (Table B-1)
W3_IOIO, W3_MSR = 1 << 27, 1 << 28
L_BIT, DB_BIT = 1 << 9, 1 << 10      # VMCB segment attrib: descriptor bits 53 and 54


def valid():
    """A 64-bit guest as a hypervisor would run it."""
    return {
        "efer": 0x1D00,              # SVME | NXE | LMA | LME
        "cr0": 0x80010033, "cr3": 0x10000, "cr4": 0x20, "dr6": 0xFFFF0FF0, "dr7": 0x400,
        "cs_attrib": 0x29B,          # present, code, L=1, D=0
        "intercept_word3": W3_IOIO | W3_MSR, "intercept_word4": W4_VMRUN,
        "asid": 1, "iopm_base_pa": 0x100000, "msrpm_base_pa": 0x104000,
        "nested_ctl": 0, "nested_cr3": 0, "event_inj": 0,
    }


class D(dict):
    def get(self, name):
        return self[name]


def run(**changes):
    v = D(valid())
    v.update(changes)
    return vmrun.check_vmrun(v, SvmCaps())


def test_the_valid_vmcb_passes():
    assert run() is None


def test_the_checks_read_the_vmcb_in_memory():
    mem = PhysMem(1 << 20)
    v = Vmcb(mem, 0x1000)
    for k, val in valid().items():
        v[k] = val
    assert vmrun.check_vmrun(v) is None
    v["asid"] = 0
    assert vmrun.check_vmrun(v).field == "asid"


@pytest.mark.parametrize("changes, field, words", [
    ({"efer": 0xD00}, "efer", "SVME"),                                # SVME clear
    ({"cr0": 0x80010033 | 1 << 29}, "cr0", "NW"),                     # NW without CD
    ({"cr0": 0x80010033 | 1 << 32}, "cr0", "63:32"),
    ({"cr3": 1 << 48}, "cr3", "CR3"),                                 # MAXPHYADDR 48
    ({"cr3": 1 << 63}, "cr3", "CR3"),
    ({"cr4": 0x20 | 1 << 13}, "cr4", "CR4"),                          # VMXE is MBZ on AMD
    ({"cr4": 0x20 | 1 << 24}, "cr4", "CR4"),
    ({"dr6": 1 << 32}, "dr6", "DR6"),
    ({"dr7": 0x400 | 1 << 40}, "dr7", "DR7"),
    ({"efer": 0x1D00 | 1 << 16}, "efer", "EFER"),
    ({"efer": 0x1D00 | 1 << 9}, "efer", "EFER"),
    ({"cr4": 0}, "cr4", "PAE"),                                       # LME+PG without PAE
    ({"cr0": 0x80010032}, "cr0", "PE"),                               # LME+PG without PE
    ({"cs_attrib": 0x29B | DB_BIT}, "cs_attrib", "CS.L"),             # L and D both set
    ({"intercept_word4": 0}, "intercept_word4", "VMRUN"),
    ({"asid": 0}, "asid", "ASID"),
    ({"iopm_base_pa": (1 << 48) - 0x2000}, "iopm_base_pa", "IOPM"),   # 12 KiB crosses the top
    ({"msrpm_base_pa": (1 << 48) - 0x1000}, "msrpm_base_pa", "MSRPM"),  # 8 KiB crosses the top
    ({"nested_ctl": 1, "nested_cr3": 1 << 50}, "nested_cr3", "nested_cr3"),
    ({"event_inj": 1 << 31 | 1 << 8 | 0x20}, "event_inj", "reserved"),    # TYPE 1
    ({"event_inj": 1 << 31 | 5 << 8 | 0x20}, "event_inj", "reserved"),    # TYPE 5
    ({"event_inj": 1 << 31 | 3 << 8 | 2}, "event_inj", "vector 2"),       # exception 2
    ({"event_inj": 1 << 31 | 3 << 8 | 32}, "event_inj", "vector 32"),
])
def test_one_broken_check(changes, field, words):
    f = run(**changes)
    assert f is not None and f.field == field and words in f.check
    assert str(f).startswith("VMEXIT_INVALID")


@pytest.mark.parametrize("changes", [
    {"cr0": 0x80010033 | 3 << 29},                  # CD and NW both set: legal
    {"cr0": 0x10033 | 1 << 30},                     # CD alone
    {"efer": 0x1100, "cr0": 0x11, "cr4": 0, "cr3": 0xFFFFF000, "cs_attrib": 0xC9B},  # 32-bit
    {"cs_attrib": 0x29B | DB_BIT, "cr0": 0x11, "efer": 0x1100},  # L+D outside long mode
    {"iopm_base_pa": (1 << 48) - 0x3000 + 0xFFF},   # the low 12 bits are ignored
    {"iopm_base_pa": 1 << 60, "intercept_word3": W3_MSR},   # IOIO_PROT clear: not read
    {"event_inj": 1 << 31 | 3 << 8 | 14 | 1 << 11},  # #PF with an error code
    {"event_inj": 1 << 31 | 2 << 8 | 2},              # NMI
    {"event_inj": 1 << 31 | 4 << 8 | 0x80},           # INT 0x80
    {"event_inj": 1 << 8 | 0x20},                     # not valid: not checked
])
def test_legal_variants_pass(changes):
    assert run(**changes) is None


def test_cr3_bits_above_31_outside_long_mode():
    f = run(efer=0x1000, cr0=0x11, cr4=0, cr3=1 << 32)
    assert f.field == "cr3"


def test_npt_without_the_feature():
    v = D(valid())
    v.update(nested_ctl=1)
    assert vmrun.check_vmrun(v, SvmCaps(features=0)).field == "nested_ctl"
    assert vmrun.check_vmrun(v, SvmCaps()) is None
