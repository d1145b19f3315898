"""CPU models as data (devirt_emu.cpumodels).

Expectations come from the SDM (Vol. 3D Appendix A: which capability MSRs
exist, the default1 classes, the allowed-0/allowed-1 rule) and from the parts'
documentation (CPUID signatures in the specification updates; which VMX
features a generation introduced), never from the tables under test.
"""
from __future__ import annotations

import json

import pytest

from devirt_emu import cpumodels as cm
from devirt_emu.cpumodels import CpuModel, CpuModelError, get_model, parse_vmx_msrs
from devirt_emu.vmx import capabilities as caps

ALL = ["skylake-server", "icelake-server", "sapphire-rapids", "westmere", "nehalem"]

# CPUID.1:EAX of each part (family 6; the specification updates' signatures).
SIGNATURES = {"skylake-server": 0x50654, "icelake-server": 0x606A6,
              "sapphire-rapids": 0x806F8, "westmere": 0x206C2, "nehalem": 0x106A5}
UG, EPT, VPID, USR_WAIT = 1 << 7, 1 << 1, 1 << 5, 1 << 26       # secondary controls
EPT_AD_CAP = 1 << 21                                             # IA32_VMX_EPT_VPID_CAP


def test_registry_lists_the_models_and_the_default():
    assert set(ALL) <= set(cm.model_names())
    assert get_model().name == "skylake-server" == cm.DEFAULT_MODEL
    assert get_model(None) is get_model("skylake-server")


@pytest.mark.parametrize("name", ALL)
def test_cpuid_reads_back_as_the_table(name):
    m = get_model(name)
    assert m.vendor == "intel"
    assert m.sources and all(isinstance(s, str) and s for s in m.sources)
    # leaf 0: "GenuineIntel" in EBX, EDX, ECX
    _, b, c_, d = m.cpuid_for(0, 0, 0, 1)
    assert b.to_bytes(4, "little") + d.to_bytes(4, "little") + c_.to_bytes(4, "little") == b"GenuineIntel"
    assert m.cpuid_for(1, 0, 0, 1)[0] == SIGNATURES[name]
    # every leaf of the table reads back (leaf 1 EBX[31:16] and the topology are per core)
    for (leaf, sub), regs in m.cpuid.items():
        got = m.cpuid_for(leaf, sub, 0, 1)
        if leaf == 1:
            assert got[0] == regs[0] and got[2:] == regs[2:]
            assert got[1] & 0xFFFF == regs[1] & 0xFFFF
        elif leaf not in (0xB, 0x1F):
            assert got == regs
    # 80000008H: EAX[7:0] physical, EAX[15:8] linear address width
    eax = m.cpuid_for(0x80000008, 0, 0, 1)[0]
    assert eax & 0xFF == m.maxphyaddr and (eax >> 8) & 0xFF == m.linear_bits


def test_cpuid_per_core_fields():
    m = get_model()
    ebx = m.cpuid_for(1, 0, 3, 4)[1]
    assert ebx >> 24 == 3 and (ebx >> 16) & 0xFF == 4      # initial APIC ID, logical count
    assert m.cpuid_for(0xB, 1, 3, 4)[3] == 3                # x2APIC ID in EDX


@pytest.mark.parametrize("name", ALL)
def test_capability_msrs_follow_appendix_a(name):
    v = get_model(name).vmx_msrs
    for index in range(0x480, 0x48B):                       # always present on a VMX part
        assert index in v
    # TRUE MSRs iff BASIC bit 55
    assert all((t in v) == bool(v[0x480] >> 55 & 1) for t in (0x48D, 0x48E, 0x48F, 0x490))
    # PROCBASED_CTLS2 iff "activate secondary controls" may be 1
    assert (0x48B in v) == bool(v[0x482] >> 63 & 1)
    # EPT_VPID_CAP iff "enable EPT" or "enable VPID" may be 1
    assert (0x48C in v) == bool((v.get(0x48B, 0) >> 32) & (EPT | VPID))
    # a control that must be 1 may be 1
    for index in (0x481, 0x482, 0x483, 0x484, 0x48B, 0x48D, 0x48E, 0x48F, 0x490):
        if index in v:
            assert (v[index] & 0xFFFFFFFF) & ~(v[index] >> 32) == 0
    # the functions of the model read those MSRs
    for index, value in v.items():
        assert caps.capability_msrs(name)[index] == value


def test_generations_differ_as_documented():
    sec = {n: get_model(n).vmx_msrs[0x48B] >> 32 for n in ALL}
    # unrestricted guest: Westmere and later
    assert not sec["nehalem"] & UG and sec["westmere"] & UG and sec["skylake-server"] & UG
    # EPT A/D flags: Haswell and later
    ad = {n: get_model(n).vmx_msrs[0x48C] & EPT_AD_CAP for n in ALL}
    assert not ad["nehalem"] and not ad["westmere"] and ad["skylake-server"]
    # "enable user wait and pause": Sapphire Rapids, not Skylake-SP or Ice Lake-SP
    assert sec["sapphire-rapids"] & USR_WAIT
    assert not sec["skylake-server"] & USR_WAIT and not sec["icelake-server"] & USR_WAIT
    assert not get_model("nehalem").has("x2apic") and get_model("skylake-server").has("x2apic")


def test_the_default_model_is_the_module_constants():
    assert caps.VMX_CAPABILITY_MSRS == get_model().vmx_msrs
    assert caps.SUPPORTED_FIELDS == caps.supported_fields("skylake-server")


def test_allowed_settings_follow_the_model():
    # unrestricted guest is legal on westmere, not on nehalem
    assert caps.is_allowed("PROCBASED2", UG, model="westmere") == []
    assert caps.is_allowed("PROCBASED2", UG, model="nehalem") == [7]
    assert caps.make_legal("PROCBASED2", UG | EPT, model="nehalem") == EPT
    assert caps.is_field_supported("PLE_GAP", "westmere")
    assert not caps.is_field_supported("PLE_GAP", "nehalem")    # PAUSE-loop exiting: Westmere


def test_feature_specs():
    m = get_model("nehalem,+unrestricted_guest,-SECONDARY_EXEC_ENABLE_VPID")
    assert m.has("SECONDARY_EXEC_UNRESTRICTED_GUEST") and not m.has("vpid")
    assert m.name == "nehalem,+unrestricted_guest,-SECONDARY_EXEC_ENABLE_VPID"
    # the optional MSRs follow: no EPT and no VPID -> no EPT_VPID_CAP (SDM A.10)
    m2 = get_model("skylake-server,-ept,vpid=off")
    assert 0x48C not in m2.vmx_msrs and 0x48C in get_model().vmx_msrs
    # CPUID features by /proc/cpuinfo name
    assert get_model("skylake-server,-x2apic").cpuid_for(1, 0, 0, 1)[2] >> 21 & 1 == 0
    assert get_model("nehalem,+x2apic").has("x2apic")


@pytest.mark.parametrize("spec,words", [
    ("pentium", "unknown CPU model"),
    ("skylake-server,+bogus", "unknown CPU feature"),
    ("skylake-server,pcid", "is not +FEATURE"),
    ("skylake-server,+", "empty feature name"),
    ("skylake-server,+shadow_vmcs", "not implemented by devirt-emu"),
])
def test_bad_specs_give_one_line_errors(spec, words):
    with pytest.raises(CpuModelError) as e:
        get_model(spec)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_from_vmx_msrs_replays_a_dump():
    dump = dict(get_model("westmere").vmx_msrs)
    m = CpuModel.from_vmx_msrs(dump)
    assert m.vmx_msrs == get_model("westmere").vmx_msrs
    assert m.cpuid == get_model().cpuid                    # the rest from the base
    assert caps.is_allowed("PROCBASED2", UG, model=m) == []


def test_from_vmx_msrs_clears_what_is_not_implemented_and_fixes_the_size():
    dump = dict(get_model().vmx_msrs)
    dump[0x48B] |= 1 << (32 + 14)                          # VMCS shadowing may be 1
    dump[0x480] = (dump[0x480] & ~(0x1FFF << 32)) | (0x400 << 32)   # a 1 KiB VMCS
    m = CpuModel.from_vmx_msrs({f"{k:#x}": f"{v:#x}" for k, v in dump.items()})
    assert not m.vmx_msrs[0x48B] >> (32 + 14) & 1
    assert (m.vmx_msrs[0x480] >> 32) & 0x1FFF == 4096
    assert any("SECONDARY_EXEC_SHADOW_VMCS" in n for n in m.notes)


@pytest.mark.parametrize("drop,words", [(0x485, "IA32_VMX_MISC"), (0x48E, "bit 55"),
                                        (0x48C, "enable EPT")])
def test_from_vmx_msrs_needs_the_msrs_that_exist(drop, words):
    dump = dict(get_model().vmx_msrs)
    del dump[drop]
    with pytest.raises(CpuModelError, match=words):
        CpuModel.from_vmx_msrs(dump)


def test_parse_dumps():
    v = get_model().vmx_msrs
    as_json = json.dumps({f"{k:#x}": f"{x:#x}" for k, x in v.items()})
    assert parse_vmx_msrs(as_json) == dict(v)
    pairs = "\n".join(f"{k:#x} {x:x}" for k, x in v.items())
    assert parse_vmx_msrs(pairs) == dict(v)
    # rdmsr over 0x480..0x493, one bare hex value per line, "-" for an absent MSR
    lines = [f"{v[i]:x}" if i in v else "-" for i in range(0x480, 0x494)]
    assert parse_vmx_msrs("\n".join(lines)) == dict(v)
    for bad in ("{nope", "0x480 0x1 0x2", "zz"):
        with pytest.raises(CpuModelError):
            parse_vmx_msrs(bad)


def test_from_vmx_msrs_drops_the_msrs_of_cleared_controls():
    # a dump allowing "enable VM functions" (secondary bit 13) has IA32_VMX_VMFUNC; devirt-emu
    # does not implement VM functions, so the control is cleared and the MSR, which exists only
    # with it (SDM A.11), goes too
    dump = dict(get_model().vmx_msrs)
    dump[0x48B] |= 1 << (32 + 13)
    dump[0x491] = 1                                        # EPTP switching
    m = CpuModel.from_vmx_msrs(dump)
    assert not m.vmx_msrs[0x48B] >> (32 + 13) & 1
    assert 0x491 not in m.vmx_msrs
