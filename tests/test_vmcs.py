"""VMCS field table and the VMCS region's VMREAD/VMWRITE semantics.

Expected encodings and widths are written here from the SDM (Vol. 3D,
Appendix B; Vol. 3C, Section 25.11.2) and Linux's enum vmcs_field, never
computed by the code under test.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from devirt_emu.platform.memory import PhysMem
from devirt_emu.vmx import capabilities as caps
from devirt_emu.vmx import fields as fl
from devirt_emu.vmx.fields import FieldType, FieldWidth, VmcsField
from devirt_emu.vmx.vmcs import (
    VMCS_REGION_SIZE, Vmcs, VmInstructionErrorNumber, VmxInstructionError,
)

# Linux arch/x86/include/asm/vmx.h, enum vmcs_field (full encodings; every
# 64-bit one also has NAME_HIGH = encoding + 1).
LINUX_FIELDS = {
    "VIRTUAL_PROCESSOR_ID": 0x0000, "POSTED_INTR_NV": 0x0002, "LAST_PID_POINTER_INDEX": 0x0008,
    "GUEST_ES_SELECTOR": 0x0800, "GUEST_CS_SELECTOR": 0x0802, "GUEST_SS_SELECTOR": 0x0804,
    "GUEST_DS_SELECTOR": 0x0806, "GUEST_FS_SELECTOR": 0x0808, "GUEST_GS_SELECTOR": 0x080A,
    "GUEST_LDTR_SELECTOR": 0x080C, "GUEST_TR_SELECTOR": 0x080E, "GUEST_INTR_STATUS": 0x0810,
    "GUEST_PML_INDEX": 0x0812,
    "HOST_ES_SELECTOR": 0x0C00, "HOST_CS_SELECTOR": 0x0C02, "HOST_SS_SELECTOR": 0x0C04,
    "HOST_DS_SELECTOR": 0x0C06, "HOST_FS_SELECTOR": 0x0C08, "HOST_GS_SELECTOR": 0x0C0A,
    "HOST_TR_SELECTOR": 0x0C0C,
    "IO_BITMAP_A": 0x2000, "IO_BITMAP_B": 0x2002, "MSR_BITMAP": 0x2004,
    "VM_EXIT_MSR_STORE_ADDR": 0x2006, "VM_EXIT_MSR_LOAD_ADDR": 0x2008,
    "VM_ENTRY_MSR_LOAD_ADDR": 0x200A, "PML_ADDRESS": 0x200E, "TSC_OFFSET": 0x2010,
    "VIRTUAL_APIC_PAGE_ADDR": 0x2012, "APIC_ACCESS_ADDR": 0x2014, "POSTED_INTR_DESC_ADDR": 0x2016,
    "VM_FUNCTION_CONTROL": 0x2018, "EPT_POINTER": 0x201A, "EOI_EXIT_BITMAP0": 0x201C,
    "EOI_EXIT_BITMAP1": 0x201E, "EOI_EXIT_BITMAP2": 0x2020, "EOI_EXIT_BITMAP3": 0x2022,
    "EPTP_LIST_ADDRESS": 0x2024, "VMREAD_BITMAP": 0x2026, "VMWRITE_BITMAP": 0x2028,
    "VE_INFORMATION_ADDRESS": 0x202A, "XSS_EXIT_BITMAP": 0x202C, "ENCLS_EXITING_BITMAP": 0x202E,
    "TSC_MULTIPLIER": 0x2032, "TERTIARY_VM_EXEC_CONTROL": 0x2034, "SHARED_EPT_POINTER": 0x203C,
    "PID_POINTER_TABLE": 0x2042, "SECONDARY_VM_EXIT_CONTROLS": 0x2044,
    "INJECTED_EVENT_DATA": 0x2052,
    "GUEST_PHYSICAL_ADDRESS": 0x2400, "ORIGINAL_EVENT_DATA": 0x2404,
    "VMCS_LINK_POINTER": 0x2800, "GUEST_IA32_DEBUGCTL": 0x2802, "GUEST_IA32_PAT": 0x2804,
    "GUEST_IA32_EFER": 0x2806, "GUEST_IA32_PERF_GLOBAL_CTRL": 0x2808, "GUEST_PDPTR0": 0x280A,
    "GUEST_PDPTR1": 0x280C, "GUEST_PDPTR2": 0x280E, "GUEST_PDPTR3": 0x2810,
    "GUEST_BNDCFGS": 0x2812, "GUEST_IA32_RTIT_CTL": 0x2814, "GUEST_IA32_LBR_CTL": 0x2816,
    "GUEST_IA32_FRED_CONFIG": 0x281A, "GUEST_IA32_FRED_RSP1": 0x281C,
    "GUEST_IA32_FRED_RSP2": 0x281E, "GUEST_IA32_FRED_RSP3": 0x2820,
    "GUEST_IA32_FRED_STKLVLS": 0x2822, "GUEST_IA32_FRED_SSP1": 0x2824,
    "GUEST_IA32_FRED_SSP2": 0x2826, "GUEST_IA32_FRED_SSP3": 0x2828,
    "HOST_IA32_PAT": 0x2C00, "HOST_IA32_EFER": 0x2C02, "HOST_IA32_PERF_GLOBAL_CTRL": 0x2C04,
    "HOST_IA32_FRED_CONFIG": 0x2C08, "HOST_IA32_FRED_RSP1": 0x2C0A,
    "HOST_IA32_FRED_RSP2": 0x2C0C, "HOST_IA32_FRED_RSP3": 0x2C0E,
    "HOST_IA32_FRED_STKLVLS": 0x2C10, "HOST_IA32_FRED_SSP1": 0x2C12,
    "HOST_IA32_FRED_SSP2": 0x2C14, "HOST_IA32_FRED_SSP3": 0x2C16,
    "PIN_BASED_VM_EXEC_CONTROL": 0x4000, "CPU_BASED_VM_EXEC_CONTROL": 0x4002,
    "EXCEPTION_BITMAP": 0x4004, "PAGE_FAULT_ERROR_CODE_MASK": 0x4006,
    "PAGE_FAULT_ERROR_CODE_MATCH": 0x4008, "CR3_TARGET_COUNT": 0x400A,
    "VM_EXIT_CONTROLS": 0x400C, "VM_EXIT_MSR_STORE_COUNT": 0x400E,
    "VM_EXIT_MSR_LOAD_COUNT": 0x4010, "VM_ENTRY_CONTROLS": 0x4012,
    "VM_ENTRY_MSR_LOAD_COUNT": 0x4014, "VM_ENTRY_INTR_INFO_FIELD": 0x4016,
    "VM_ENTRY_EXCEPTION_ERROR_CODE": 0x4018, "VM_ENTRY_INSTRUCTION_LEN": 0x401A,
    "TPR_THRESHOLD": 0x401C, "SECONDARY_VM_EXEC_CONTROL": 0x401E, "PLE_GAP": 0x4020,
    "PLE_WINDOW": 0x4022, "NOTIFY_WINDOW": 0x4024,
    "VM_INSTRUCTION_ERROR": 0x4400, "VM_EXIT_REASON": 0x4402, "VM_EXIT_INTR_INFO": 0x4404,
    "VM_EXIT_INTR_ERROR_CODE": 0x4406, "IDT_VECTORING_INFO_FIELD": 0x4408,
    "IDT_VECTORING_ERROR_CODE": 0x440A, "VM_EXIT_INSTRUCTION_LEN": 0x440C,
    "VMX_INSTRUCTION_INFO": 0x440E,
    "GUEST_ES_LIMIT": 0x4800, "GUEST_CS_LIMIT": 0x4802, "GUEST_SS_LIMIT": 0x4804,
    "GUEST_DS_LIMIT": 0x4806, "GUEST_FS_LIMIT": 0x4808, "GUEST_GS_LIMIT": 0x480A,
    "GUEST_LDTR_LIMIT": 0x480C, "GUEST_TR_LIMIT": 0x480E, "GUEST_GDTR_LIMIT": 0x4810,
    "GUEST_IDTR_LIMIT": 0x4812, "GUEST_ES_AR_BYTES": 0x4814, "GUEST_CS_AR_BYTES": 0x4816,
    "GUEST_SS_AR_BYTES": 0x4818, "GUEST_DS_AR_BYTES": 0x481A, "GUEST_FS_AR_BYTES": 0x481C,
    "GUEST_GS_AR_BYTES": 0x481E, "GUEST_LDTR_AR_BYTES": 0x4820, "GUEST_TR_AR_BYTES": 0x4822,
    "GUEST_INTERRUPTIBILITY_INFO": 0x4824, "GUEST_ACTIVITY_STATE": 0x4826,
    "GUEST_SYSENTER_CS": 0x482A, "VMX_PREEMPTION_TIMER_VALUE": 0x482E,
    "HOST_IA32_SYSENTER_CS": 0x4C00,
    "CR0_GUEST_HOST_MASK": 0x6000, "CR4_GUEST_HOST_MASK": 0x6002, "CR0_READ_SHADOW": 0x6004,
    "CR4_READ_SHADOW": 0x6006, "CR3_TARGET_VALUE0": 0x6008, "CR3_TARGET_VALUE1": 0x600A,
    "CR3_TARGET_VALUE2": 0x600C, "CR3_TARGET_VALUE3": 0x600E,
    "EXIT_QUALIFICATION": 0x6400, "GUEST_LINEAR_ADDRESS": 0x640A,
    "GUEST_CR0": 0x6800, "GUEST_CR3": 0x6802, "GUEST_CR4": 0x6804, "GUEST_ES_BASE": 0x6806,
    "GUEST_CS_BASE": 0x6808, "GUEST_SS_BASE": 0x680A, "GUEST_DS_BASE": 0x680C,
    "GUEST_FS_BASE": 0x680E, "GUEST_GS_BASE": 0x6810, "GUEST_LDTR_BASE": 0x6812,
    "GUEST_TR_BASE": 0x6814, "GUEST_GDTR_BASE": 0x6816, "GUEST_IDTR_BASE": 0x6818,
    "GUEST_DR7": 0x681A, "GUEST_RSP": 0x681C, "GUEST_RIP": 0x681E, "GUEST_RFLAGS": 0x6820,
    "GUEST_PENDING_DBG_EXCEPTIONS": 0x6822, "GUEST_SYSENTER_ESP": 0x6824,
    "GUEST_SYSENTER_EIP": 0x6826,
    "HOST_CR0": 0x6C00, "HOST_CR3": 0x6C02, "HOST_CR4": 0x6C04, "HOST_FS_BASE": 0x6C06,
    "HOST_GS_BASE": 0x6C08, "HOST_TR_BASE": 0x6C0A, "HOST_GDTR_BASE": 0x6C0C,
    "HOST_IDTR_BASE": 0x6C0E, "HOST_IA32_SYSENTER_ESP": 0x6C10,
    "HOST_IA32_SYSENTER_EIP": 0x6C12, "HOST_RSP": 0x6C14, "HOST_RIP": 0x6C16,
}

# SDM fields Linux does not name (SDM Appendix B), with their encodings.
SDM_ONLY_FIELDS = {
    "EPTP_INDEX": 0x0004, "HLAT_PREFIX_SIZE": 0x0006, "GUEST_UINV": 0x0814,
    "EXECUTIVE_VMCS_POINTER": 0x200C, "SPPT_POINTER": 0x2030, "ENCLV_EXITING_BITMAP": 0x2036,
    "LOW_PASID_DIRECTORY_ADDRESS": 0x2038, "HIGH_PASID_DIRECTORY_ADDRESS": 0x203A,
    "PCONFIG_EXITING_BITMAP": 0x203E, "HLATP": 0x2040, "IA32_SPEC_CTRL_MASK": 0x204A,
    "IA32_SPEC_CTRL_SHADOW": 0x204C, "GUEST_IA32_PKRS": 0x2818, "HOST_IA32_PKRS": 0x2C06,
    "GUEST_SMBASE": 0x4828, "IO_RCX": 0x6402, "IO_RSI": 0x6404, "IO_RDI": 0x6406,
    "IO_RIP": 0x6408, "GUEST_S_CET": 0x6828, "GUEST_SSP": 0x682A,
    "GUEST_INTR_SSP_TABLE": 0x682C, "HOST_S_CET": 0x6C18, "HOST_SSP": 0x6C1A,
    "HOST_INTR_SSP_TABLE": 0x6C1C,
}

ALL_EXPECTED = {**LINUX_FIELDS, **SDM_ONLY_FIELDS}

# SDM Table 25-21: width in bits 14:13, type in bits 11:10; each class's base.
CLASS_BASES = {
    (16, "control"): 0x0000, (16, "guest"): 0x0800, (16, "host"): 0x0C00,
    (64, "control"): 0x2000, (64, "exit"): 0x2400, (64, "guest"): 0x2800, (64, "host"): 0x2C00,
    (32, "control"): 0x4000, (32, "exit"): 0x4400, (32, "guest"): 0x4800, (32, "host"): 0x4C00,
    ("natural", "control"): 0x6000, ("natural", "exit"): 0x6400,
    ("natural", "guest"): 0x6800, ("natural", "host"): 0x6C00,
}
WIDTH_OF = {16: FieldWidth.BITS16, 32: FieldWidth.BITS32, 64: FieldWidth.BITS64,
            "natural": FieldWidth.NATURAL}
TYPE_OF = {"control": FieldType.CONTROL, "exit": FieldType.EXIT_INFO,
           "guest": FieldType.GUEST, "host": FieldType.HOST}


def expected_class(enc):
    """The (width, type) class of an encoding from the SDM's base table."""
    base = enc & 0x7C00
    for cls, b in CLASS_BASES.items():
        if b == base:
            return cls
    raise AssertionError(f"{enc:#x} is in no SDM field class")


def value_mask(enc):
    """Bits a VMWRITE keeps (SDM: 16/32-bit truncate, high access = 32 bits)."""
    width, _ = expected_class(enc)
    if enc & 1:
        return 0xFFFFFFFF
    return {16: 0xFFFF, 32: 0xFFFFFFFF, 64: (1 << 64) - 1, "natural": (1 << 64) - 1}[width]


# --------------------------------------------------------------------------
# the field table
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name,enc", sorted(ALL_EXPECTED.items()))
def test_field_encoding_and_derived_properties(name, enc):
    assert VmcsField[name] == enc
    info = fl.field_by_name(name)
    assert info.encoding == enc and fl.field_info(enc) is info
    width, ftype = expected_class(enc)
    assert fl.field_width(enc) is WIDTH_OF[width]
    assert fl.field_type(enc) is TYPE_OF[ftype]
    assert not fl.is_high(enc)
    assert info.read_only == (ftype == "exit")
    if width == 64:
        high = VmcsField[name + "_HIGH"]
        assert high == enc + 1 and fl.is_high(high)
        assert fl.field_info(high).full == enc and fl.field_info(high).size == 4
    else:
        assert name + "_HIGH" not in VmcsField.__members__
        assert fl.field_info(enc + 1) is None


def test_table_has_exactly_the_expected_fields():
    full_names = {i.name for i in fl.ALL_FIELDS if not i.high}
    assert full_names == set(ALL_EXPECTED)
    highs = {i.name for i in fl.ALL_FIELDS if i.high}
    assert highs == {n + "_HIGH" for n, e in ALL_EXPECTED.items() if expected_class(e)[0] == 64}


def test_encoding_reserved_bits_are_zero_in_every_field():
    for info in fl.ALL_FIELDS:
        assert info.encoding & 0xFFFF8000 == 0 and info.encoding & (1 << 12) == 0


def test_encoding_helpers_on_sdm_examples():
    # SDM Table 25-21 worked by hand.
    assert fl.field_index(0x681E) == 15 and fl.field_width(0x681E) is FieldWidth.NATURAL
    assert fl.field_type(0x4402) is FieldType.EXIT_INFO and fl.field_index(0x4402) == 1
    assert fl.make_encoding(FieldWidth.BITS64, FieldType.CONTROL, 8, high=True) == 0x2011
    assert fl.is_read_only(0x6400) and not fl.is_read_only(0x6800)
    with pytest.raises(ValueError):
        fl.make_encoding(FieldWidth.BITS32, FieldType.CONTROL, 0, high=True)
    with pytest.raises(ValueError):
        fl.field_width(1 << 32)
    with pytest.raises(TypeError):
        fl.field_type("GUEST_RIP")
    with pytest.raises(KeyError, match="no VMCS field"):
        fl.field_by_name("GUEST_RIPP")


def test_field_supported_follows_the_requirement():
    # SDM B footnote: EPTP exists only with the 1-setting of "enable EPT" (secondary bit 1).
    assert fl.field_supported("EPT_POINTER", {"PROCBASED2": 1 << 1})
    assert not fl.field_supported("EPT_POINTER", {"PROCBASED2": 0})
    # Guest IA32_PAT: "load IA32_PAT" entry (bit 14) or "save IA32_PAT" exit (bit 18).
    assert fl.field_supported("GUEST_IA32_PAT", {"EXIT": 1 << 18})
    assert fl.field_supported("GUEST_IA32_PAT", {"ENTRY": 1 << 14})
    assert not fl.field_supported("GUEST_IA32_PAT", {})
    assert fl.field_supported("GUEST_RIP", {})
    assert not fl.field_supported(0x0001, {})


# --------------------------------------------------------------------------
# the VMCS region
# --------------------------------------------------------------------------
@pytest.fixture
def mem():
    return PhysMem(64 * 1024)


@pytest.fixture
def vmcs(mem):
    return Vmcs.format(mem, 0x2000)


def supported_full_fields():
    return sorted(e for e in caps.SUPPORTED_FIELDS if not e & 1)


def test_header_bytes_in_memory(mem, vmcs):
    # SDM 25.2: bytes 0-3 revision id (bit 31 shadow indicator), bytes 4-7 abort indicator.
    assert mem.read_u32(0x2000) == caps.VMCS_REVISION_ID
    assert vmcs.revision_id == caps.VMCS_REVISION_ID and not vmcs.shadow_indicator
    vmcs.shadow_indicator = True
    assert mem.read_u32(0x2000) == caps.VMCS_REVISION_ID | 0x80000000
    assert vmcs.revision_id == caps.VMCS_REVISION_ID
    vmcs.abort_indicator = 0xDEADBEEF
    assert mem.read_u32(0x2004) == 0xDEADBEEF
    mem.write_u32(0x2000, 0x12345678)
    assert vmcs.revision_id == 0x12345678 and not vmcs.shadow_indicator
    with pytest.raises(ValueError):
        vmcs.revision_id = 0x80000000


def test_format_zeroes_the_region_and_uses_the_basic_msr_revision(mem):
    mem.write(0x3000, b"\xff" * VMCS_REGION_SIZE)
    v = Vmcs.format(mem, 0x3000, shadow=True)
    basic = caps.VMX_CAPABILITY_MSRS[0x480]
    assert v.revision_id == basic & 0x7FFFFFFF and v.shadow_indicator
    assert v.abort_indicator == 0 and v.launch_state == "clear"
    assert all(value == 0 for _, value in v.items())


def test_launch_state_and_vmclear(vmcs):
    vmcs.vmwrite(VmcsField.GUEST_RIP, 0x1234)
    assert vmcs.launch_state == "clear"
    vmcs.launch_state = "launched"
    assert vmcs.launch_state == "launched"
    vmcs.clear()
    assert vmcs.launch_state == "clear"
    assert vmcs.vmread(VmcsField.GUEST_RIP) == 0x1234   # VMCLEAR keeps the data
    with pytest.raises(ValueError):
        vmcs.launch_state = "running"


def test_launch_state_is_in_memory(mem, vmcs):
    vmcs.launch_state = "launched"
    assert Vmcs(mem, 0x2000).launch_state == "launched"
    mem.write_u32(0x2008, 7)
    with pytest.raises(ValueError, match="corrupt launch state"):
        Vmcs(mem, 0x2000).launch_state


@pytest.mark.parametrize("name,value,expected", [
    # 16-bit field: VMWRITE ignores source bits 63:16.
    ("GUEST_CS_SELECTOR", 0x123456789ABC, 0x9ABC),
    ("HOST_TR_SELECTOR", 0xFFFF, 0xFFFF),
    ("VIRTUAL_PROCESSOR_ID", 0x10001, 0x0001),
    # 32-bit field: source bits 63:32 ignored.
    ("EXCEPTION_BITMAP", 0xFFFFFFFF12345678, 0x12345678),
    ("GUEST_ES_AR_BYTES", 0xC093, 0xC093),
    ("HOST_IA32_SYSENTER_CS", 0x1_0000_0010, 0x10),
    # 64-bit full access keeps all 64 bits (64-bit mode).
    ("TSC_OFFSET", 0x1122334455667788, 0x1122334455667788),
    ("GUEST_IA32_EFER", 0xD01, 0xD01),
    ("HOST_IA32_PAT", 0x0007040600070406, 0x0007040600070406),
    # natural width is 64 bits on a 64-bit processor.
    ("GUEST_RIP", 0xFFFFFFFFFFFFFFF0, 0xFFFFFFFFFFFFFFF0),
    ("CR0_GUEST_HOST_MASK", 0xFFFFFFFFFFFFFFF7, 0xFFFFFFFFFFFFFFF7),
    ("HOST_RSP", 0x8000, 0x8000),
])
def test_vmwrite_vmread_by_width_and_type(vmcs, name, value, expected):
    vmcs.vmwrite(VmcsField[name], value)
    assert vmcs.vmread(VmcsField[name]) == expected
    assert vmcs[name] == expected


def test_high_access_is_bits_63_32(vmcs):
    vmcs.vmwrite(VmcsField.TSC_OFFSET, 0x1122334455667788)
    assert vmcs.vmread(VmcsField.TSC_OFFSET_HIGH) == 0x11223344
    vmcs.vmwrite(VmcsField.TSC_OFFSET_HIGH, 0xAABBCCDD)
    assert vmcs.vmread(VmcsField.TSC_OFFSET) == 0xAABBCCDD55667788
    # A high write takes bits 31:0 of the source.
    vmcs.vmwrite(VmcsField.TSC_OFFSET_HIGH, 0xFFFFFFFF00000001)
    assert vmcs.vmread(VmcsField.TSC_OFFSET) == 0x0000000155667788
    # Writing the neighbouring 64-bit fields leaves this one alone.
    vmcs.vmwrite(VmcsField.VIRTUAL_APIC_PAGE_ADDR, (1 << 64) - 1)
    vmcs.vmwrite(VmcsField.EXECUTIVE_VMCS_POINTER_HIGH, 0xFFFFFFFF)
    assert vmcs.vmread(VmcsField.TSC_OFFSET) == 0x0000000155667788


@pytest.mark.parametrize("enc", [0x0001, 0x0801, 0x4001, 0x4401, 0x6001, 0x681F])
def test_high_access_of_a_non_64_bit_field_is_unsupported(vmcs, enc):
    with pytest.raises(VmxInstructionError) as ei:
        vmcs.vmread(enc)
    assert ei.value.errno == 12


@pytest.mark.parametrize("enc", [
    VmcsField.VMREAD_BITMAP,              # VMCS shadowing not advertised
    VmcsField.VMWRITE_BITMAP,
    VmcsField.PML_ADDRESS, VmcsField.GUEST_PML_INDEX,
    VmcsField.TERTIARY_VM_EXEC_CONTROL,   # "activate tertiary controls" may not be 1
    VmcsField.TSC_MULTIPLIER,             # TSC scaling not advertised
    0x0016, 0x2046, 0x4026, 0x482C, 0x6C1E,  # no SDM field at these encodings
    0x8000 | 0x681E,                      # bit 15 set
    0x1000 | 0x681E,                      # bit 12 set
    1 << 40,                              # bits 63:32 set
])
def test_unsupported_component_is_vmfailvalid_12(vmcs, enc):
    for op in (lambda: vmcs.vmread(enc), lambda: vmcs.vmwrite(enc, 1)):
        vmcs.set(VmcsField.VM_INSTRUCTION_ERROR, 0)
        with pytest.raises(VmxInstructionError) as ei:
            op()
        assert ei.value.errno == VmInstructionErrorNumber.VMXERR_UNSUPPORTED_VMCS_COMPONENT == 12
        # VMfailValid writes the error number into the current VMCS.
        assert vmcs.get(VmcsField.VM_INSTRUCTION_ERROR) == 12


def test_vmwrite_to_every_read_only_field_is_vmfailvalid_13(vmcs):
    # IA32_VMX_MISC bit 29 is 0 on the modelled CPU: exit-information fields are read-only.
    assert not caps.VMX_CAPABILITY_MSRS[0x485] & (1 << 29)
    ro = [e for e in caps.SUPPORTED_FIELDS if (e >> 10) & 3 == 1]
    assert VmcsField.VM_EXIT_REASON in ro and VmcsField.EXIT_QUALIFICATION in ro
    for enc in ro:
        vmcs.set(enc, 0x5A)
        with pytest.raises(VmxInstructionError) as ei:
            vmcs.vmwrite(enc, 1)
        assert ei.value.errno == 13
        assert vmcs.get(VmcsField.VM_INSTRUCTION_ERROR) == 13
        if enc != VmcsField.VM_INSTRUCTION_ERROR:
            assert vmcs.vmread(enc) == 0x5A     # unchanged, still readable


def test_processor_set_of_exit_information(vmcs):
    vmcs.set("VM_EXIT_REASON", 0x8000_0021)
    vmcs.set(VmcsField.EXIT_QUALIFICATION, 0xFFFF_FFFF_FFFF_FFFF)
    vmcs.set(VmcsField.GUEST_PHYSICAL_ADDRESS_HIGH, 0x1)
    assert vmcs.vmread(VmcsField.VM_EXIT_REASON) == 0x80000021
    assert vmcs["EXIT_QUALIFICATION"] == 0xFFFFFFFFFFFFFFFF
    assert vmcs.vmread(VmcsField.GUEST_PHYSICAL_ADDRESS) == 1 << 32
    with pytest.raises(ValueError, match="does not fit"):
        vmcs.set(VmcsField.VM_EXIT_REASON, 1 << 32)
    with pytest.raises(ValueError, match="does not fit"):
        vmcs.set(VmcsField.GUEST_CS_SELECTOR, 0x10000)
    with pytest.raises(ValueError, match="not a VMCS field of the modelled CPU"):
        vmcs.set(VmcsField.PML_ADDRESS, 0)     # PML is not advertised
    with pytest.raises(KeyError):
        vmcs.get("NO_SUCH_FIELD")


def test_bad_operands_are_clear_errors(mem, vmcs):
    with pytest.raises(ValueError):
        vmcs.vmwrite(VmcsField.GUEST_RIP, -1)
    with pytest.raises(ValueError):
        vmcs.vmwrite(VmcsField.GUEST_RIP, 1 << 64)
    with pytest.raises(TypeError):
        vmcs.vmread("GUEST_RIP")
    with pytest.raises(ValueError, match="aligned"):
        Vmcs(mem, 0x2010)
    with pytest.raises(ValueError, match="outside memory"):
        Vmcs(mem, 64 * 1024)


@settings(max_examples=200, deadline=None)
@given(enc=st.sampled_from(sorted(caps.SUPPORTED_FIELDS)), value=st.integers(0, (1 << 64) - 1))
def test_vmwrite_then_vmread_keeps_the_field_bits(enc, value):
    vmcs = Vmcs.format(PhysMem(8192), 0x1000)
    if (enc >> 10) & 3 == 1:
        vmcs.set(enc, value & value_mask(enc))
    else:
        vmcs.vmwrite(enc, value)
    assert vmcs.vmread(enc) == value & value_mask(enc)


def test_every_field_has_its_own_storage_and_a_second_view_sees_it(mem):
    a = Vmcs.format(mem, 0x4000)
    fulls = supported_full_fields()
    for k, enc in enumerate(fulls):
        a.set(enc, (0x1111 * (k + 1)) & value_mask(enc))
    b = Vmcs(mem, 0x4000)
    for k, enc in enumerate(fulls):
        assert b.vmread(enc) == (0x1111 * (k + 1)) & value_mask(enc), hex(enc)
    # ... and nothing spilled outside the 4 KiB region.
    assert mem.read(0x3000, 0x1000) == bytes(0x1000)
    assert mem.read(0x5000, 0x1000) == bytes(0x1000)


def test_slots_fit_in_the_region_and_high_halves_alias_their_field(mem):
    a = Vmcs.format(mem, 0x4000)
    a.vmwrite(VmcsField.EPT_POINTER, 0x0123456789ABCDEF)
    raw = mem.read(0x4000, 4096)
    assert (0x0123456789ABCDEF).to_bytes(8, "little") in raw
    assert a.vmread(VmcsField.EPT_POINTER_HIGH) == 0x01234567


class DictMem:
    """A memory object with only read/write (no memoryview)."""

    def __init__(self):
        self.bytes = bytearray(16384)

    def read(self, pa, n):
        return bytes(self.bytes[pa:pa + n])

    def write(self, pa, data):
        self.bytes[pa:pa + len(data)] = data


def test_works_over_any_read_write_memory():
    m = DictMem()
    v = Vmcs.format(m, 0x1000)
    v["GUEST_RSP"] = 0xFFFF8000
    v.vmwrite(VmcsField.IO_BITMAP_A_HIGH, 0x2)
    assert Vmcs(m, 0x1000)["GUEST_RSP"] == 0xFFFF8000
    assert Vmcs(m, 0x1000).vmread(VmcsField.IO_BITMAP_A) == 0x2 << 32
    assert int.from_bytes(m.bytes[0x1000:0x1004], "little") == caps.VMCS_REVISION_ID


def test_vm_instruction_error_numbers():
    # SDM Vol. 3C Table 31-1 (numbers 14, 21 and 27 are not defined).
    expected = {
        1: "VMXERR_VMCALL_IN_VMX_ROOT_OPERATION", 2: "VMXERR_VMCLEAR_INVALID_ADDRESS",
        3: "VMXERR_VMCLEAR_VMXON_POINTER", 4: "VMXERR_VMLAUNCH_NONCLEAR_VMCS",
        5: "VMXERR_VMRESUME_NONLAUNCHED_VMCS", 6: "VMXERR_VMRESUME_AFTER_VMXOFF",
        7: "VMXERR_ENTRY_INVALID_CONTROL_FIELD", 8: "VMXERR_ENTRY_INVALID_HOST_STATE_FIELD",
        9: "VMXERR_VMPTRLD_INVALID_ADDRESS", 10: "VMXERR_VMPTRLD_VMXON_POINTER",
        11: "VMXERR_VMPTRLD_INCORRECT_VMCS_REVISION_ID", 12: "VMXERR_UNSUPPORTED_VMCS_COMPONENT",
        13: "VMXERR_VMWRITE_READ_ONLY_VMCS_COMPONENT", 15: "VMXERR_VMXON_IN_VMX_ROOT_OPERATION",
        16: "VMXERR_ENTRY_INVALID_EXECUTIVE_VMCS_POINTER",
        17: "VMXERR_ENTRY_NONLAUNCHED_EXECUTIVE_VMCS",
        18: "VMXERR_ENTRY_EXECUTIVE_VMCS_POINTER_NOT_VMXON_POINTER",
        19: "VMXERR_VMCALL_NONCLEAR_VMCS", 20: "VMXERR_VMCALL_INVALID_VM_EXIT_CONTROL_FIELDS",
        22: "VMXERR_VMCALL_INCORRECT_MSEG_REVISION_ID",
        23: "VMXERR_VMXOFF_UNDER_DUAL_MONITOR_TREATMENT_OF_SMIS_AND_SMM",
        24: "VMXERR_VMCALL_INVALID_SMM_MONITOR_FEATURES",
        25: "VMXERR_ENTRY_INVALID_VM_EXECUTION_CONTROL_FIELDS_IN_EXECUTIVE_VMCS",
        26: "VMXERR_ENTRY_EVENTS_BLOCKED_BY_MOV_SS", 28: "VMXERR_INVALID_OPERAND_TO_INVEPT_INVVPID",
    }
    assert {int(e): e.name for e in VmInstructionErrorNumber} == expected
    err = VmxInstructionError(7, "bad pin-based controls")
    assert err.errno == 7 and "VMXERR_ENTRY_INVALID_CONTROL_FIELD" in str(err)
    with pytest.raises(ValueError):
        VmxInstructionError(14)
