"""Capability MSRs of the modelled CPU and the control-bit tables.

Bit positions and rules are written here from the SDM (Vol. 3C, Chapter 25
control tables; Vol. 3D, Appendix A), never taken from the code under test.
"""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from devirt_emu.platform.memory import PhysMem
from devirt_emu.vmx import capabilities as caps
from devirt_emu.vmx import controls as c
from devirt_emu.vmx.fields import VmcsField
from devirt_emu.vmx.vmcs import Vmcs, VmxInstructionError

MSRS = caps.VMX_CAPABILITY_MSRS
BASIC, PIN, PROC, EXIT, ENTRY, MISC = 0x480, 0x481, 0x482, 0x483, 0x484, 0x485
CR0F0, CR0F1, CR4F0, CR4F1, ENUM, PROC2, EPTVPID = 0x486, 0x487, 0x488, 0x489, 0x48A, 0x48B, 0x48C
TPIN, TPROC, TEXIT, TENTRY, VMFUNC, PROC3, EXIT2 = 0x48D, 0x48E, 0x48F, 0x490, 0x491, 0x492, 0x493


def bits(*ns):
    v = 0
    for n in ns:
        v |= 1 << n
    return v


def lo(v):
    return v & 0xFFFFFFFF


def hi(v):
    return v >> 32


# SDM Appendix A.2-A.5: the default1 classes.
DEFAULT1 = {
    PIN: bits(1, 2, 4),
    PROC: bits(1, 4, 5, 6, 8, 13, 14, 15, 16, 26),
    EXIT: bits(0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 13, 14, 16, 17),
    ENTRY: bits(0, 1, 2, 3, 4, 5, 6, 7, 8, 12),
}
TRUE_OF = {PIN: TPIN, PROC: TPROC, EXIT: TEXIT, ENTRY: TENTRY}


# --------------------------------------------------------------------------
# control-bit constants (SDM Vol. 3C Tables 25-5 .. 25-15)
# --------------------------------------------------------------------------
EXPECTED_BITS = {
    "PIN_BASED_EXT_INTR_MASK": 0, "PIN_BASED_NMI_EXITING": 3, "PIN_BASED_VIRTUAL_NMIS": 5,
    "PIN_BASED_VMX_PREEMPTION_TIMER": 6, "PIN_BASED_POSTED_INTR": 7,
    "CPU_BASED_INTR_WINDOW_EXITING": 2, "CPU_BASED_USE_TSC_OFFSETTING": 3,
    "CPU_BASED_HLT_EXITING": 7, "CPU_BASED_INVLPG_EXITING": 9, "CPU_BASED_MWAIT_EXITING": 10,
    "CPU_BASED_RDPMC_EXITING": 11, "CPU_BASED_RDTSC_EXITING": 12,
    "CPU_BASED_CR3_LOAD_EXITING": 15, "CPU_BASED_CR3_STORE_EXITING": 16,
    "CPU_BASED_ACTIVATE_TERTIARY_CONTROLS": 17, "CPU_BASED_CR8_LOAD_EXITING": 19,
    "CPU_BASED_CR8_STORE_EXITING": 20, "CPU_BASED_TPR_SHADOW": 21,
    "CPU_BASED_NMI_WINDOW_EXITING": 22, "CPU_BASED_MOV_DR_EXITING": 23,
    "CPU_BASED_UNCOND_IO_EXITING": 24, "CPU_BASED_USE_IO_BITMAPS": 25,
    "CPU_BASED_MONITOR_TRAP_FLAG": 27, "CPU_BASED_USE_MSR_BITMAPS": 28,
    "CPU_BASED_MONITOR_EXITING": 29, "CPU_BASED_PAUSE_EXITING": 30,
    "CPU_BASED_ACTIVATE_SECONDARY_CONTROLS": 31,
    "SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES": 0, "SECONDARY_EXEC_ENABLE_EPT": 1,
    "SECONDARY_EXEC_DESC": 2, "SECONDARY_EXEC_ENABLE_RDTSCP": 3,
    "SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE": 4, "SECONDARY_EXEC_ENABLE_VPID": 5,
    "SECONDARY_EXEC_WBINVD_EXITING": 6, "SECONDARY_EXEC_UNRESTRICTED_GUEST": 7,
    "SECONDARY_EXEC_APIC_REGISTER_VIRT": 8, "SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY": 9,
    "SECONDARY_EXEC_PAUSE_LOOP_EXITING": 10, "SECONDARY_EXEC_RDRAND_EXITING": 11,
    "SECONDARY_EXEC_ENABLE_INVPCID": 12, "SECONDARY_EXEC_ENABLE_VMFUNC": 13,
    "SECONDARY_EXEC_SHADOW_VMCS": 14, "SECONDARY_EXEC_ENCLS_EXITING": 15,
    "SECONDARY_EXEC_RDSEED_EXITING": 16, "SECONDARY_EXEC_ENABLE_PML": 17,
    "SECONDARY_EXEC_EPT_VIOLATION_VE": 18, "SECONDARY_EXEC_PT_CONCEAL_VMX": 19,
    "SECONDARY_EXEC_ENABLE_XSAVES": 20, "SECONDARY_EXEC_MODE_BASED_EPT_EXEC": 22,
    "SECONDARY_EXEC_PT_USE_GPA": 24, "SECONDARY_EXEC_TSC_SCALING": 25,
    "SECONDARY_EXEC_ENABLE_USR_WAIT_PAUSE": 26, "SECONDARY_EXEC_BUS_LOCK_DETECTION": 30,
    "SECONDARY_EXEC_NOTIFY_VM_EXITING": 31,
    "TERTIARY_EXEC_IPI_VIRT": 4,
    "VM_EXIT_SAVE_DEBUG_CONTROLS": 2, "VM_EXIT_HOST_ADDR_SPACE_SIZE": 9,
    "VM_EXIT_LOAD_IA32_PERF_GLOBAL_CTRL": 12, "VM_EXIT_ACK_INTR_ON_EXIT": 15,
    "VM_EXIT_SAVE_IA32_PAT": 18, "VM_EXIT_LOAD_IA32_PAT": 19, "VM_EXIT_SAVE_IA32_EFER": 20,
    "VM_EXIT_LOAD_IA32_EFER": 21, "VM_EXIT_SAVE_VMX_PREEMPTION_TIMER": 22,
    "VM_EXIT_CLEAR_BNDCFGS": 23, "VM_EXIT_PT_CONCEAL_PIP": 24, "VM_EXIT_CLEAR_IA32_RTIT_CTL": 25,
    "VM_EXIT_ACTIVATE_SECONDARY_CONTROLS": 31,
    "VM_ENTRY_LOAD_DEBUG_CONTROLS": 2, "VM_ENTRY_IA32E_MODE": 9, "VM_ENTRY_SMM": 10,
    "VM_ENTRY_DEACT_DUAL_MONITOR": 11, "VM_ENTRY_LOAD_IA32_PERF_GLOBAL_CTRL": 13,
    "VM_ENTRY_LOAD_IA32_PAT": 14, "VM_ENTRY_LOAD_IA32_EFER": 15, "VM_ENTRY_LOAD_BNDCFGS": 16,
    "VM_ENTRY_PT_CONCEAL_PIP": 17, "VM_ENTRY_LOAD_IA32_RTIT_CTL": 18,
    "GUEST_INTR_STATE_STI": 0, "GUEST_INTR_STATE_MOV_SS": 1, "GUEST_INTR_STATE_SMI": 2,
    "GUEST_INTR_STATE_NMI": 3, "GUEST_INTR_STATE_ENCLAVE_INTR": 4,
}


@pytest.mark.parametrize("name,bit", sorted(EXPECTED_BITS.items()))
def test_control_bit_positions(name, bit):
    assert getattr(c, name) == 1 << bit


def test_each_control_table_lists_its_words_bits():
    assert set(c.PINBASED) == {n for n in EXPECTED_BITS if n.startswith("PIN_BASED_")}
    assert set(c.PROCBASED) == {n for n in EXPECTED_BITS if n.startswith("CPU_BASED_")}
    for table in (c.PINBASED, c.PROCBASED, c.PROCBASED2, c.PROCBASED3, c.EXIT, c.EXIT2,
                  c.ENTRY, c.VMFUNC, c.GUEST_INTR_STATE):
        for name, mask in table.items():
            assert getattr(c, name) == mask


def test_interruption_information_format():
    # SDM Table 25-17: vector 7:0, type 10:8, deliver error code 11, valid 31.
    assert (c.INTR_INFO_VECTOR_MASK, c.INTR_INFO_INTR_TYPE_MASK) == (0xFF, 0x700)
    assert c.INTR_INFO_DELIVER_CODE_MASK == 1 << 11 and c.INTR_INFO_VALID_MASK == 1 << 31
    assert c.INTR_INFO_UNBLOCK_NMI == 1 << 12
    assert [c.INTR_TYPE_EXT_INTR, c.INTR_TYPE_NMI_INTR, c.INTR_TYPE_HARD_EXCEPTION,
            c.INTR_TYPE_SOFT_INTR, c.INTR_TYPE_PRIV_SW_EXCEPTION, c.INTR_TYPE_SOFT_EXCEPTION,
            c.INTR_TYPE_OTHER_EVENT] == [0, 0x200, 0x300, 0x400, 0x500, 0x600, 0x700]
    assert (c.GUEST_ACTIVITY_ACTIVE, c.GUEST_ACTIVITY_HLT, c.GUEST_ACTIVITY_SHUTDOWN,
            c.GUEST_ACTIVITY_WAIT_SIPI) == (0, 1, 2, 3)


def test_default1_class_constants():
    assert c.PIN_BASED_ALWAYSON_WITHOUT_TRUE_MSR == DEFAULT1[PIN]
    assert c.CPU_BASED_ALWAYSON_WITHOUT_TRUE_MSR == DEFAULT1[PROC]
    assert c.VM_EXIT_ALWAYSON_WITHOUT_TRUE_MSR == DEFAULT1[EXIT]
    assert c.VM_ENTRY_ALWAYSON_WITHOUT_TRUE_MSR == DEFAULT1[ENTRY]


def test_decode_bits():
    value = bits(7, 25, 28, 31, 18)     # HLT, I/O bitmaps, MSR bitmaps, secondary, reserved 18
    assert c.decode_bits(c.PROCBASED, value) == [
        "CPU_BASED_HLT_EXITING", "bit 18", "CPU_BASED_USE_IO_BITMAPS",
        "CPU_BASED_USE_MSR_BITMAPS", "CPU_BASED_ACTIVATE_SECONDARY_CONTROLS"]
    assert c.decode_bits(c.PINBASED, 0) == []
    assert c.encode_bits(c.PINBASED, ["PIN_BASED_NMI_EXITING", "PIN_BASED_VIRTUAL_NMIS"]) == bits(3, 5)
    with pytest.raises(KeyError):
        c.encode_bits(c.PINBASED, ["CPU_BASED_HLT_EXITING"])
    with pytest.raises(ValueError):
        c.decode_bits(c.PINBASED, -1)


# --------------------------------------------------------------------------
# IA32_VMX_BASIC (SDM A.1)
# --------------------------------------------------------------------------
def test_vmx_basic():
    v = MSRS[BASIC]
    assert v & 0x7FFFFFFF == caps.VMCS_REVISION_ID != 0
    assert not v & (1 << 31)                       # bit 31 is always 0
    assert (v >> 32) & 0x1FFF == 4096              # VMCS region size, bits 44:32
    assert not v & bits(45, 46, 47)                # reserved
    assert not v & (1 << 48)                       # 64-bit physical addresses
    assert (v >> 50) & 0xF == 6                    # write-back
    assert v & (1 << 54)                           # INS/OUTS instruction information
    assert v & (1 << 55)                           # TRUE controls
    assert v >> 57 == 0


# --------------------------------------------------------------------------
# control capability MSRs (SDM A.3-A.5)
# --------------------------------------------------------------------------
@pytest.mark.parametrize("plain", [PIN, PROC, EXIT, ENTRY])
def test_plain_and_true_control_msrs(plain):
    p, t = MSRS[plain], MSRS[TRUE_OF[plain]]
    # plain MSR: default1 bits are allowed-0 = 1 ("must be 1"), and only those.
    assert lo(p) == DEFAULT1[plain]
    # allowed-0 settings are a subset of the allowed-1 settings.
    assert lo(p) & ~hi(p) == 0 and lo(t) & ~hi(t) == 0
    # TRUE MSR: same allowed-1; may only clear default1 bits in allowed-0.
    assert hi(t) == hi(p)
    assert lo(t) & ~lo(p) == 0
    assert (lo(p) & ~lo(t)) & ~DEFAULT1[plain] == 0


def test_true_msrs_relax_what_hardware_relaxes():
    # CR3-load/store exiting (15, 16) and save/load debug controls (bit 2) may be 0.
    assert lo(MSRS[TPROC]) == DEFAULT1[PROC] & ~bits(15, 16)
    assert lo(MSRS[TEXIT]) == DEFAULT1[EXIT] & ~bits(2)
    assert lo(MSRS[TENTRY]) == DEFAULT1[ENTRY] & ~bits(2)
    assert lo(MSRS[TPIN]) == DEFAULT1[PIN]


def test_advertised_pin_and_primary_controls():
    # external-interrupt and NMI exiting, virtual NMIs, preemption timer, posted interrupts
    assert hi(MSRS[PIN]) & bits(0, 3, 5, 6, 7) == bits(0, 3, 5, 6, 7)
    assert not hi(MSRS[PIN]) & ~bits(0, 1, 2, 3, 4, 5, 6, 7)     # nothing above bit 7
    wanted = bits(2, 3, 7, 9, 10, 11, 12, 15, 16, 19, 20, 21, 22, 23, 24, 25, 27, 28, 29, 30, 31)
    assert hi(MSRS[PROC]) & wanted == wanted
    assert not hi(MSRS[PROC]) & (1 << 17)          # no tertiary controls
    assert not hi(MSRS[PROC]) & bits(0, 18)        # reserved, not default1: must be 0


def test_advertised_secondary_controls():
    may1 = hi(MSRS[PROC2])
    assert lo(MSRS[PROC2]) == 0                    # no secondary control must be 1
    # 4, 8, 9: virtualize x2APIC mode, APIC-register virtualization, virtual-interrupt
    # delivery (APICv, which Skylake-SP has)
    on = bits(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 20)
    # 26, "enable user wait and pause", is not a Skylake-SP control (WAITPKG came with
    # Tremont and Sapphire Rapids): the default model, a Xeon Scalable 1st gen, lacks it.
    off = bits(13, 14, 15, 17, 18, 19, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31)
    assert may1 & on == on
    assert may1 & off == 0


def test_advertised_exit_and_entry_controls():
    on_exit = bits(2, 9, 15, 18, 19, 20, 21, 22)
    assert hi(MSRS[EXIT]) & on_exit == on_exit
    assert not hi(MSRS[EXIT]) & bits(12, 23, 24, 25, 26, 27, 28, 29, 30, 31)
    on_entry = bits(2, 9, 14, 15)
    assert hi(MSRS[ENTRY]) & on_entry == on_entry
    assert not hi(MSRS[ENTRY]) & bits(10, 11, 13, 16, 17, 18, 19, 20, 21, 22, 23)


def test_optional_msrs_exist_as_the_sdm_says():
    # PROCBASED_CTLS2 exists iff "activate secondary controls" (primary bit 31) may be 1.
    assert (PROC2 in MSRS) == bool(hi(MSRS[PROC]) & (1 << 31))
    # EPT_VPID_CAP exists iff secondary "enable EPT" (1) or "enable VPID" (5) may be 1.
    assert (EPTVPID in MSRS) == bool(hi(MSRS.get(PROC2, 0)) & bits(1, 5))
    # PROCBASED_CTLS3 exists iff "activate tertiary controls" (primary bit 17) may be 1.
    assert (PROC3 in MSRS) == bool(hi(MSRS[PROC]) & (1 << 17)) and PROC3 not in MSRS
    # VMFUNC exists iff "enable VM functions" (secondary bit 13) may be 1.
    assert (VMFUNC in MSRS) == bool(hi(MSRS[PROC2]) & (1 << 13)) and VMFUNC not in MSRS
    # EXIT_CTLS2 exists iff "activate secondary VM-exit controls" (exit bit 31) may be 1.
    assert (EXIT2 in MSRS) == bool(hi(MSRS[EXIT]) & (1 << 31)) and EXIT2 not in MSRS
    # TRUE MSRs exist iff IA32_VMX_BASIC bit 55.
    assert all(t in MSRS for t in TRUE_OF.values())
    assert set(MSRS) <= set(caps.VMX_MSR_NAMES)
    assert caps.VMX_MSR_NAMES[0x48C] == "MSR_IA32_VMX_EPT_VPID_CAP"


def test_ept_vpid_cap():
    v = MSRS[EPTVPID]
    sec = hi(MSRS[PROC2])
    ept_bits = bits(0, 6, 7, 8, 14, 16, 17, 20, 21, 22, 23, 25, 26)
    vpid_bits = bits(32, 40, 41, 42, 43)
    # capabilities only for features that may be enabled
    if not sec & (1 << 1):
        assert v & ept_bits == 0
    if not sec & (1 << 5):
        assert v & vpid_bits == 0
    # what the model advertises: 4-level walk, UC and WB, 2M, 1G, INVEPT with
    # single/all-context, A/D; INVVPID with all four types.
    want = bits(6, 8, 14, 16, 17, 20, 21, 25, 26, 32, 40, 41, 42, 43)
    assert v & want == want
    assert not v & bits(7, 22, 23)                 # no 5-level, advanced info, SSS
    assert v & bits(0)                             # execute-only translations (issue 14)
    # INVEPT types are reported only with INVEPT itself (SDM A.10), same for INVVPID.
    assert not (v & bits(25, 26)) or v & (1 << 20)
    assert not (v & bits(40, 41, 42, 43)) or v & (1 << 32)
    assert (v >> 48) & 0x3F == 0                   # no HLAT


def test_misc():
    v = MSRS[MISC]
    assert v & 0x1F == 5                           # preemption timer: TSC bit 5
    assert v & bits(6, 7, 8) == bits(6, 7, 8)      # HLT, shutdown, wait-for-SIPI
    assert (v >> 16) & 0x1FF == 4                  # 4 CR3-target values
    assert 512 * (((v >> 25) & 7) + 1) == 512      # MSR-list limit
    assert not v & (1 << 29)                       # VMWRITE to exit information: no
    assert not v & bits(14, 15, 28)
    # bit 30: injection with instruction length 0, which every Skylake and later part allows
    # (issue 14: the modelled Xeon Scalable 1st gen reports it)
    assert v & (1 << 30)
    assert v >> 32 == 0                            # MSEG revision 0
    assert c.vmx_misc_msr_list_limit(v) == 512 and c.vmx_misc_cr3_count(v) == 4


def test_cr_fixed_msrs():
    assert MSRS[CR0F0] == bits(0, 5, 31)           # PE, NE, PG fixed to 1
    assert MSRS[CR0F0] & ~MSRS[CR0F1] == 0
    assert MSRS[CR4F0] == bits(13)                 # VMXE fixed to 1
    assert MSRS[CR4F0] & ~MSRS[CR4F1] == 0
    assert MSRS[CR0F1] >> 32 == 0 and MSRS[CR4F1] >> 32 == 0
    assert caps.CR0_FIXED0 == MSRS[CR0F0] and caps.CR4_FIXED1 == MSRS[CR4F1]


def test_vmcs_enum_covers_every_readable_field():
    # Independent enumeration: every encoding VMREAD accepts on a real VMCS.
    vmcs = Vmcs.format(PhysMem(8192), 0x1000)
    readable = []
    for enc in range(0x8000):
        try:
            vmcs.vmread(enc)
        except VmxInstructionError:
            continue
        readable.append(enc)
    assert VmcsField.GUEST_RIP in readable and VmcsField.EPT_POINTER_HIGH in readable
    highest = max((e >> 1) & 0x1FF for e in readable)
    enum = MSRS[ENUM]
    assert enum & ~0x3FE == 0                      # only bits 9:1 used
    assert (enum >> 1) & 0x1FF >= highest
    assert sorted(readable) == sorted(caps.SUPPORTED_FIELDS)


@pytest.mark.parametrize("name,supported", [
    # SDM App. B footnotes against the advertised features.
    ("VIRTUAL_PROCESSOR_ID", True), ("EPT_POINTER", True), ("GUEST_PDPTR0", True),
    ("GUEST_PHYSICAL_ADDRESS", True), ("MSR_BITMAP", True), ("VIRTUAL_APIC_PAGE_ADDR", True),
    ("TPR_THRESHOLD", True), ("APIC_ACCESS_ADDR", True), ("PLE_GAP", True), ("PLE_WINDOW", True),
    ("XSS_EXIT_BITMAP", True), ("VMX_PREEMPTION_TIMER_VALUE", True), ("GUEST_IA32_PAT", True),
    ("GUEST_IA32_EFER", True), ("HOST_IA32_PAT", True), ("HOST_IA32_EFER", True),
    ("SECONDARY_VM_EXEC_CONTROL", True), ("GUEST_SMBASE", True), ("IO_RIP", True),
    ("POSTED_INTR_NV", True), ("POSTED_INTR_DESC_ADDR", True), ("GUEST_INTR_STATUS", True),
    ("EOI_EXIT_BITMAP3", True), ("VMREAD_BITMAP", False), ("PML_ADDRESS", False),
    ("TSC_MULTIPLIER", False), ("VM_FUNCTION_CONTROL", False), ("EPTP_LIST_ADDRESS", False),
    ("TERTIARY_VM_EXEC_CONTROL", False), ("SECONDARY_VM_EXIT_CONTROLS", False),
    ("GUEST_IA32_PERF_GLOBAL_CTRL", False), ("HOST_IA32_PERF_GLOBAL_CTRL", False),
    ("GUEST_BNDCFGS", False), ("GUEST_S_CET", False), ("NOTIFY_WINDOW", False),
    ("EPTP_INDEX", False), ("GUEST_IA32_FRED_CONFIG", False), ("SHARED_EPT_POINTER", False),
])
def test_supported_fields(name, supported):
    assert caps.is_field_supported(name) is supported
    assert (VmcsField[name] in caps.SUPPORTED_FIELDS) is supported


# --------------------------------------------------------------------------
# allowed settings helpers
# --------------------------------------------------------------------------
def test_allowed_settings_use_the_true_msrs():
    assert caps.allowed_settings("PINBASED") == (lo(MSRS[TPIN]), hi(MSRS[TPIN]))
    assert caps.allowed_settings("PROCBASED") == (lo(MSRS[TPROC]), hi(MSRS[TPROC]))
    assert caps.allowed_settings("PROCBASED", use_true=False) == (lo(MSRS[PROC]), hi(MSRS[PROC]))
    assert caps.allowed_settings(VmcsField.VM_ENTRY_CONTROLS) == (lo(MSRS[TENTRY]), hi(MSRS[TENTRY]))
    assert caps.allowed_settings(0x401E) == (0, hi(MSRS[PROC2]))
    # control words whose capability MSR does not exist: nothing may be 1.
    assert caps.allowed_settings("PROCBASED3") == (0, 0)
    assert caps.allowed_settings("EXIT2") == (0, 0)
    assert caps.allowed_settings("VMFUNC") == (0, 0)
    with pytest.raises(KeyError):
        caps.allowed_settings("SECONDARY")
    with pytest.raises(KeyError):
        caps.allowed_settings(VmcsField.GUEST_RIP)


def test_is_allowed_and_make_legal_examples():
    assert caps.is_allowed("PINBASED", 0) == [1, 2, 4]
    assert caps.make_legal("PINBASED", 0) == bits(1, 2, 4)
    assert caps.is_allowed("PINBASED", bits(1, 2, 4, 7)) == []      # posted interrupts on
    assert caps.is_allowed("PINBASED", bits(1, 2, 4, 8)) == [8]     # bit 8 is reserved
    assert caps.make_legal("PINBASED", 0xFFFFFFFF) == bits(0, 1, 2, 3, 4, 5, 6, 7)
    # TRUE procbased: CR3 load/store exiting may be 0.
    assert caps.make_legal("PROCBASED", 0) == DEFAULT1[PROC] & ~bits(15, 16)
    assert caps.is_allowed("PROCBASED", DEFAULT1[PROC], use_true=False) == []
    assert caps.is_allowed("PROCBASED", DEFAULT1[PROC] & ~bits(15), use_true=False) == [15]
    assert caps.is_allowed("PROCBASED2", bits(1, 9)) == []           # EPT, VID
    assert caps.is_allowed("PROCBASED2", bits(1, 14)) == [14]        # no VMCS shadowing
    assert caps.make_legal("PROCBASED3", 0xFF) == 0
    with pytest.raises(ValueError):
        caps.is_allowed("PINBASED", -1)


@settings(max_examples=300, deadline=None)
@given(ctl=st.sampled_from(["PINBASED", "PROCBASED", "PROCBASED2", "EXIT", "ENTRY",
                            "PROCBASED3", "EXIT2", "VMFUNC"]),
       value=st.integers(0, 0xFFFFFFFF), use_true=st.booleans())
def test_make_legal_is_the_closest_legal_value(ctl, value, use_true):
    legal = caps.make_legal(ctl, value, use_true)
    must1, may1 = caps.allowed_settings(ctl, use_true)
    assert caps.is_allowed(ctl, legal, use_true) == []
    # it keeps every requested bit that may be 1 and adds only must-be-1 bits
    assert legal & may1 == (value | must1) & may1 and legal & ~(value | must1) == 0
    assert (caps.is_allowed(ctl, value, use_true) == []) == (legal == value)
    offending = caps.is_allowed(ctl, value, use_true)
    assert offending == sorted(n for n in range(32)
                               if ((must1 >> n) & 1 and not (value >> n) & 1)
                               or ((value >> n) & 1 and not (may1 >> n) & 1))
