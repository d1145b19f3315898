"""The platform MSR table: numbers and names (Linux msr-index.h, SDM vol. 4),
reserved bits, value rules.  Expected numbers are written from the SDM here."""
import pytest
from hypothesis import given, settings, strategies as st

from devirt_emu.platform import msrs
from devirt_emu.platform.lapic import ApicBus, GeneralProtection, LocalApic
from devirt_emu.platform.msrs import check_read, check_write, msr_index, msr_info, msr_range

# Numbers from the SDM vol. 4 MSR tables.
EXPECTED = {
    "MSR_IA32_TSC": 0x10,
    "MSR_IA32_APICBASE": 0x1B,
    "MSR_IA32_FEATURE_CONTROL": 0x3A,
    "MSR_IA32_SYSENTER_CS": 0x174,
    "MSR_IA32_SYSENTER_ESP": 0x175,
    "MSR_IA32_SYSENTER_EIP": 0x176,
    "MSR_IA32_MISC_ENABLE": 0x1A0,
    "MSR_IA32_CR_PAT": 0x277,
    "MSR_MTRRcap": 0xFE,
    "MSR_MTRRdefType": 0x2FF,
    "MSR_MTRRphysBase0": 0x200,
    "MSR_MTRRphysMask7": 0x20F,
    "MSR_MTRRfix64K_00000": 0x250,
    "MSR_MTRRfix16K_80000": 0x258,
    "MSR_MTRRfix16K_A0000": 0x259,
    "MSR_MTRRfix4K_C0000": 0x268,
    "MSR_MTRRfix4K_F8000": 0x26F,
    "MSR_IA32_TSC_DEADLINE": 0x6E0,
    "MSR_EFER": 0xC0000080,
    "MSR_STAR": 0xC0000081,
    "MSR_LSTAR": 0xC0000082,
    "MSR_CSTAR": 0xC0000083,
    "MSR_SYSCALL_MASK": 0xC0000084,
    "MSR_FS_BASE": 0xC0000100,
    "MSR_GS_BASE": 0xC0000101,
    "MSR_KERNEL_GS_BASE": 0xC0000102,
    "MSR_TSC_AUX": 0xC0000103,
    "MSR_IA32_VMX_BASIC": 0x480,
    "MSR_IA32_VMX_PINBASED_CTLS": 0x481,
    "MSR_IA32_VMX_PROCBASED_CTLS": 0x482,
    "MSR_IA32_VMX_EXIT_CTLS": 0x483,
    "MSR_IA32_VMX_ENTRY_CTLS": 0x484,
    "MSR_IA32_VMX_MISC": 0x485,
    "MSR_IA32_VMX_CR0_FIXED0": 0x486,
    "MSR_IA32_VMX_CR0_FIXED1": 0x487,
    "MSR_IA32_VMX_CR4_FIXED0": 0x488,
    "MSR_IA32_VMX_CR4_FIXED1": 0x489,
    "MSR_IA32_VMX_VMCS_ENUM": 0x48A,
    "MSR_IA32_VMX_PROCBASED_CTLS2": 0x48B,
    "MSR_IA32_VMX_EPT_VPID_CAP": 0x48C,
    "MSR_IA32_VMX_TRUE_PINBASED_CTLS": 0x48D,
    "MSR_IA32_VMX_TRUE_PROCBASED_CTLS": 0x48E,
    "MSR_IA32_VMX_TRUE_EXIT_CTLS": 0x48F,
    "MSR_IA32_VMX_TRUE_ENTRY_CTLS": 0x490,
    "MSR_IA32_VMX_VMFUNC": 0x491,
    "MSR_IA32_VMX_PROCBASED_CTLS3": 0x492,
    # the KVM-devirt passthrough list (x2APIC MSR = 800H + MMIO offset / 10H)
    "X2APIC_EOI": 0x80B,
    "X2APIC_IRR0": 0x820,
    "X2APIC_ICR": 0x830,
    "X2APIC_LVTT": 0x832,
    "X2APIC_TMICT": 0x838,
    "X2APIC_TMCCT": 0x839,
    "X2APIC_TDCR": 0x83E,
    "X2APIC_ID": 0x802,
    "X2APIC_TASKPRI": 0x808,
    "X2APIC_SELF_IPI": 0x83F,
}


@pytest.mark.parametrize("name, index", sorted(EXPECTED.items()))
def test_names_and_numbers(name, index):
    assert msr_index(name) == index
    assert getattr(msrs, name) == index
    assert msr_info(index).name == name


@pytest.mark.parametrize("name, owner", [
    ("MSR_EFER", "cpu"), ("MSR_FS_BASE", "cpu"), ("MSR_STAR", "cpu"), ("MSR_IA32_CR_PAT", "cpu"),
    ("MSR_IA32_APICBASE", "lapic"), ("MSR_IA32_TSC_DEADLINE", "lapic"), ("X2APIC_EOI", "lapic"),
    ("MSR_IA32_TSC", "tsc"), ("MSR_MTRRdefType", "store"), ("MSR_IA32_VMX_BASIC", "vmx"),
])
def test_owners(name, owner):
    assert msrs.MSRS_BY_NAME[name].owner == owner


def test_unknown_msrs_do_not_exist():
    for index in (0x0, 0x12345, 0x801, 0x80E, 0x831, 0xC0000104, 0x4B564D00):
        assert msr_info(index) is None
        with pytest.raises(GeneralProtection):
            check_write(index, 0)
        with pytest.raises(GeneralProtection):
            check_read(index)
    with pytest.raises(KeyError):
        msr_index("MSR_NO_SUCH_THING")


def test_kvm_paravirtual_range():
    rng = msr_range(0x4B564DBC)                 # KVM-devirt's apic_maps announcement
    assert rng.name == "KVM_PV" and rng.owner == "hypervisor"
    assert (rng.first, rng.last) == (0x4B564D00, 0x4B564DFF)
    assert msr_range(0x830).name == "X2APIC"
    assert msr_range(0x10) is None


def test_reset_values():
    assert msr_info(0x277).reset == 0x0007040600070406      # PAT power-up value
    assert msr_info(0x1B).reset == 0xFEE00900              # BSP: base, EN, BSP
    assert msr_info(0xC0000080).reset == 0


@pytest.mark.parametrize("value", [0, 1 << 0, 1 << 8, 1 << 11, (1 << 0) | (1 << 8) | (1 << 11),
                                   1 << 10])            # SCE, LME, NXE; LMA is accepted
def test_efer_allowed(value):
    check_write(0xC0000080, value)


@pytest.mark.parametrize("bit", [1, 2, 9, 12, 13, 14, 15, 63])
def test_efer_reserved_bits_gp(bit):
    with pytest.raises(GeneralProtection):
        check_write(0xC0000080, 1 << bit)


@pytest.mark.parametrize("index", [0xC0000100, 0xC0000101, 0xC0000102, 0xC0000082, 0xC0000083,
                                   0x175, 0x176])
def test_canonical_addresses(index):
    check_write(index, 0x00007FFFFFFFFFFF)
    check_write(index, 0xFFFF800000000000)
    for bad in (0x0000800000000000, 0x8000000000000000, 0xFFFF7FFFFFFFFFFF):
        with pytest.raises(GeneralProtection):
            check_write(index, bad)


def test_pat_memory_types():
    check_write(0x277, 0x0007040600070406)
    check_write(0x277, 0x0706050401000706)
    for bad in (0x02, 0x03, 0x08, 0x0300000000000000):
        with pytest.raises(GeneralProtection):
            check_write(0x277, bad)


def test_mtrr_rules():
    check_write(0x200, 0xFEE00000 | 0x06)       # physBase0: base, WB
    with pytest.raises(GeneralProtection):
        check_write(0x200, 0x02)                # type 2 reserved
    with pytest.raises(GeneralProtection):
        check_write(0x200, 1 << 8)              # bits 11:8 reserved
    check_write(0x201, 0xFFF000000 | (1 << 11))   # physMask0: mask, valid
    with pytest.raises(GeneralProtection):
        check_write(0x201, 1)
    check_write(0x250, 0x0606060606060606)
    with pytest.raises(GeneralProtection):
        check_write(0x250, 0x0606060606060607)  # UC- (7) is a PAT type, not an MTRR type
    with pytest.raises(GeneralProtection):
        check_write(0xFE, 0)                    # MTRRcap is read-only


def test_vmx_capability_msrs_are_read_only():
    for index in range(0x480, 0x493):
        info = check_read(index)
        assert info.owner == "vmx" and info.reset is None
        with pytest.raises(GeneralProtection):
            check_write(index, 0)


def test_feature_control_lock():
    check_write(0x3A, 0x5)
    with pytest.raises(GeneralProtection):
        check_write(0x3A, 0x5, current=0x5)     # lock bit set: any write #GP
    with pytest.raises(GeneralProtection):
        check_write(0x3A, 0x2)                  # SMX not modelled: bit 1 reserved


def test_apic_base_rules():
    check_write(0x1B, 0xFEE00C00, current=0xFEE00800)      # xAPIC -> x2APIC
    with pytest.raises(GeneralProtection):
        check_write(0x1B, 0xFEE00800, current=0xFEE00C00)  # x2APIC -> xAPIC
    with pytest.raises(GeneralProtection):
        check_write(0x1B, 0xFEE00200)                      # bit 9 reserved


def test_x2apic_value_rules():
    check_write(0x80B, 0)
    with pytest.raises(GeneralProtection):
        check_write(0x80B, 1)                   # EOI: non-zero
    with pytest.raises(GeneralProtection):
        check_read(0x80B)                       # EOI: write-only
    with pytest.raises(GeneralProtection):
        check_write(0x802, 0)                   # ID: read-only
    with pytest.raises(GeneralProtection):
        check_write(0x808, 0x100)               # TPR bits 31:8
    check_write(0x830, (5 << 32) | 0x4500)     # ICR: 64 bits, destination 63:32


def test_tsc_aux_and_syscall_mask_are_32_bit():
    check_write(0xC0000103, 0xFFFFFFFF)
    check_write(0xC0000084, 0xFFFFFFFF)
    for index in (0xC0000103, 0xC0000084):
        with pytest.raises(GeneralProtection):
            check_write(index, 1 << 32)


def test_table_is_consistent():
    indices = [m.index for m in msrs.MSR_TABLE]
    assert indices == sorted(set(indices))
    for m in msrs.MSR_TABLE:
        assert m.access in ("r", "w", "rw")
        if "w" not in m.access:
            assert m.writable == 0
        assert m.writable & m.ignored == 0


def test_bad_value_is_a_value_error():
    with pytest.raises(ValueError):
        check_write(0x10, -1)
    with pytest.raises(ValueError):
        check_write(0x10, 1 << 64)


# The table's x2APIC rows and the LocalApic must agree on which writes #GP.
_X2APIC_WRITABLE = [m.index for m in msrs.MSR_TABLE
                    if m.owner == "lapic" and 0x800 <= m.index <= 0x8FF]


@settings(max_examples=300, deadline=None)
@given(index=st.sampled_from(_X2APIC_WRITABLE),
       value=st.one_of(st.integers(0, 0xFF), st.integers(0, 0xFFFFFFFF),
                       st.integers(0, (1 << 64) - 1)))
def test_table_agrees_with_lapic(index, value):
    clock = lambda: 0  # noqa: E731
    apic = LocalApic(0, clock, ApicBus(), bsp=True)
    apic.wrmsr(0x1B, 0xFEE00C00)
    try:
        check_write(index, value)
        table_gp = False
    except GeneralProtection:
        table_gp = True
    try:
        apic.wrmsr(index, value)
        apic_gp = False
    except GeneralProtection:
        apic_gp = True
    assert table_gp == apic_gp
