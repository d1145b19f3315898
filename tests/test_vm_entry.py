"""VM-entry checks (SDM Vol. 3C, "VM Entries").

Each test starts from a valid VMCS (a 64-bit guest, or a real-mode,
virtual-8086 or PAE guest), breaks one thing, and states the SDM's outcome:
VMfailValid with error 7 (invalid control field) or 8 (invalid host-state
field), 4/5/26 for the basic checks, or a VM-entry failure exit with exit
reason 0x80000021 (33, invalid guest state) and qualification 0, 2 (PDPTEs),
3 (NMI injection with blocking by STI) or 4 (VMCS link pointer), or
0x80000022 (34, MSR loading) with the failing entry's number (from 1).
The numbers are written here as literals, not taken from the code under test.
"""
from dataclasses import replace

import pytest
from hypothesis import given, settings, strategies as st

from devirt_emu.platform.memory import PhysMem
from devirt_emu.vmx import capabilities
from devirt_emu.vmx.entry import (
    EntryCaps, FailureKind, check_execution_controls, check_vm_entry, is_canonical)
from devirt_emu.vmx.vmcs import Vmcs

CAPS = EntryCaps.modelled()
INVALID_STATE = 0x80000021
MSR_LOAD_FAIL = 0x80000022

# Control bits as the SDM numbers them (literals, independent of controls.py).
PIN_EXT_INTR, PIN_NMI, PIN_VNMI, PIN_TIMER, PIN_POSTED = 1 << 0, 1 << 3, 1 << 5, 1 << 6, 1 << 7
P_TPR_SHADOW, P_NMI_WINDOW, P_IO_BITMAPS = 1 << 21, 1 << 22, 1 << 25
P_MTF, P_MSR_BITMAPS, P_SECONDARY = 1 << 27, 1 << 28, 1 << 31
P_CR3_LOAD, P_CR3_STORE = 1 << 15, 1 << 16
S_APIC_ACCESS, S_EPT, S_X2APIC, S_VPID, S_UG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 7
S_VID, S_PML, S_SHADOW_VMCS = 1 << 9, 1 << 17, 1 << 14
X_HOST64, X_ACK_INTR, X_LOAD_PAT, X_LOAD_EFER, X_SAVE_TIMER = 1 << 9, 1 << 15, 1 << 19, 1 << 21, 1 << 22
E_LOAD_DBG, E_IA32E, E_SMM, E_LOAD_PAT, E_LOAD_EFER = 1 << 2, 1 << 9, 1 << 10, 1 << 14, 1 << 15

ALL_ONES = (1 << 64) - 1
EPTP_OK = 0x5000 | 0x1E          # WB, 4-level walk

BASE = {
    # controls: the modelled CPU's must-be-1 bits plus what a 64-bit guest needs
    "PIN_BASED_VM_EXEC_CONTROL": CAPS.pinbased[0] | PIN_NMI,
    "CPU_BASED_VM_EXEC_CONTROL": CAPS.procbased[0] | P_MSR_BITMAPS | P_SECONDARY,
    "SECONDARY_VM_EXEC_CONTROL": 0,
    "VM_EXIT_CONTROLS": CAPS.exit[0] | X_HOST64 | X_LOAD_EFER,
    "VM_ENTRY_CONTROLS": CAPS.entry[0] | E_IA32E | E_LOAD_EFER,
    "MSR_BITMAP": 0x3000,
    "EPT_POINTER": EPTP_OK,
    # host
    "HOST_CR0": 0x80000031, "HOST_CR4": 0x2020, "HOST_CR3": 0x10000,
    "HOST_CS_SELECTOR": 0x08, "HOST_SS_SELECTOR": 0x10, "HOST_DS_SELECTOR": 0x10,
    "HOST_ES_SELECTOR": 0x10, "HOST_FS_SELECTOR": 0, "HOST_GS_SELECTOR": 0, "HOST_TR_SELECTOR": 0x18,
    "HOST_RIP": 0xFFFFFFFF81000000, "HOST_RSP": 0x8000, "HOST_IA32_EFER": 0x500, "HOST_IA32_PAT": 0x0007040600070406,
    # guest: 64-bit, CPL 0
    "GUEST_CR0": 0x80000031, "GUEST_CR4": 0x2020, "GUEST_CR3": 0x20000, "GUEST_DR7": 0x400,
    "GUEST_IA32_EFER": 0x500, "GUEST_IA32_PAT": 0x0007040600070406,
    "GUEST_RIP": 0x401000, "GUEST_RSP": 0x8000, "GUEST_RFLAGS": 0x2,
    "GUEST_CS_SELECTOR": 0x08, "GUEST_CS_BASE": 0, "GUEST_CS_LIMIT": 0xFFFFFFFF, "GUEST_CS_AR_BYTES": 0xA09B,
    "GUEST_SS_SELECTOR": 0x10, "GUEST_SS_BASE": 0, "GUEST_SS_LIMIT": 0xFFFFFFFF, "GUEST_SS_AR_BYTES": 0xC093,
    "GUEST_DS_SELECTOR": 0x10, "GUEST_DS_BASE": 0, "GUEST_DS_LIMIT": 0xFFFFFFFF, "GUEST_DS_AR_BYTES": 0xC093,
    "GUEST_ES_SELECTOR": 0x10, "GUEST_ES_BASE": 0, "GUEST_ES_LIMIT": 0xFFFFFFFF, "GUEST_ES_AR_BYTES": 0xC093,
    "GUEST_FS_SELECTOR": 0, "GUEST_FS_AR_BYTES": 0x10000,
    "GUEST_GS_SELECTOR": 0, "GUEST_GS_AR_BYTES": 0x10000,
    "GUEST_LDTR_SELECTOR": 0, "GUEST_LDTR_AR_BYTES": 0x10000,
    "GUEST_TR_SELECTOR": 0x18, "GUEST_TR_BASE": 0x5000, "GUEST_TR_LIMIT": 0x67, "GUEST_TR_AR_BYTES": 0x8B,
    "GUEST_GDTR_BASE": 0x6000, "GUEST_GDTR_LIMIT": 0x27, "GUEST_IDTR_BASE": 0x7000, "GUEST_IDTR_LIMIT": 0xFFF,
    "GUEST_ACTIVITY_STATE": 0, "GUEST_INTERRUPTIBILITY_INFO": 0, "GUEST_PENDING_DBG_EXCEPTIONS": 0,
    "VMCS_LINK_POINTER": ALL_ONES,
}

REAL_MODE = dict(BASE, **{
    "SECONDARY_VM_EXEC_CONTROL": S_EPT | S_UG,
    "VM_ENTRY_CONTROLS": CAPS.entry[0] | E_LOAD_EFER,
    "GUEST_CR0": 0x30, "GUEST_CR4": 0x2000, "GUEST_IA32_EFER": 0, "GUEST_RIP": 0x7C00,
    "GUEST_CS_SELECTOR": 0, "GUEST_CS_LIMIT": 0xFFFF, "GUEST_CS_AR_BYTES": 0x9B,
    "GUEST_SS_SELECTOR": 0, "GUEST_SS_LIMIT": 0xFFFF, "GUEST_SS_AR_BYTES": 0x93,
    "GUEST_DS_SELECTOR": 0, "GUEST_DS_LIMIT": 0xFFFF, "GUEST_DS_AR_BYTES": 0x93,
    "GUEST_ES_SELECTOR": 0, "GUEST_ES_LIMIT": 0xFFFF, "GUEST_ES_AR_BYTES": 0x93,
})

V8086 = dict(BASE, **{
    "VM_ENTRY_CONTROLS": CAPS.entry[0] | E_LOAD_EFER,
    "GUEST_CR0": 0x31 | (1 << 31), "GUEST_CR4": 0x2000, "GUEST_IA32_EFER": 0, "GUEST_RIP": 0x100,
    "GUEST_RFLAGS": 0x20002,
    **{f"GUEST_{s}_{k}": v for s, sel in (("CS", 0x1000), ("SS", 0x2000), ("DS", 0x3000),
                                          ("ES", 0x3000), ("FS", 0x3000), ("GS", 0x3000))
       for k, v in (("SELECTOR", sel), ("BASE", sel << 4), ("LIMIT", 0xFFFF), ("AR_BYTES", 0xF3))},
})

# 32-bit PAE guest, no EPT: the PDPTEs are read from memory at CR3.
PAE = dict(BASE, **{
    "VM_ENTRY_CONTROLS": CAPS.entry[0] | E_LOAD_EFER,
    "GUEST_CR0": 0x80000031, "GUEST_CR4": 0x2020, "GUEST_CR3": 0x9000, "GUEST_IA32_EFER": 0,
    "GUEST_CS_AR_BYTES": 0xC09B,
})


@pytest.fixture
def mem():
    return PhysMem(1 << 21)


def run(v, mem=None, caps=CAPS, launch=True, state="clear", **kw):
    m = mem if mem is not None else PhysMem(1 << 16)
    return check_vm_entry(v, caps, m.read, launch=launch, launch_state=state, **kw)


def vmcs(base=BASE, **changes):
    d = dict(base)
    d.update(changes)
    return d


def assert_vmfail(f, error):
    assert f is not None, "VM entry should fail"
    assert f.kind is FailureKind.VMFAIL_VALID and f.error == error, str(f)


def assert_blames_a_change(f, changes):
    """The failure names a field the test changed (or the access rights of a
    segment whose selector, base or limit it changed)."""
    allowed = set(changes)
    for k in changes:
        parts = k.split("_")
        if k.startswith("GUEST_") and parts[-1] in ("SELECTOR", "LIMIT", "BASE"):
            allowed.add(f"GUEST_{parts[1]}_AR_BYTES")
    if "VM_ENTRY_INTR_INFO_FIELD" in changes:
        allowed.add("GUEST_RFLAGS")
    assert f.field in allowed, f"{f.field} blamed for a change of {sorted(changes)}: {f}"


def assert_guest(f, qual=0):
    assert f is not None, "VM entry should fail"
    assert f.kind is FailureKind.ENTRY_FAILURE_EXIT, str(f)
    assert (f.exit_reason, f.qualification) == (INVALID_STATE, qual), str(f)


@pytest.mark.parametrize("base", [BASE, REAL_MODE, V8086], ids=["64-bit", "real-mode-UG", "v8086"])
def test_valid_vmcs_enters(base):
    assert run(base) is None


def test_pae_guest_with_valid_pdptes_enters(mem):
    for i in range(4):
        mem.write_u64(0x9000 + 8 * i, 0xA000 + 0x1000 * i + 1)
    assert run(PAE, mem) is None


# --- basic checks -------------------------------------------------------------

def test_launch_state():
    assert_vmfail(run(BASE, state="launched"), 4)                # VMLAUNCH, non-clear VMCS
    assert_vmfail(run(BASE, launch=False, state="clear"), 5)     # VMRESUME, non-launched
    assert run(BASE, launch=False, state="launched") is None
    assert_vmfail(run(BASE, state="launched", blocked_by_mov_ss=True), 26)


def test_mapping_needs_launch_state():
    with pytest.raises(ValueError, match="launch_state"):
        check_vm_entry(BASE, CAPS, PhysMem(4096).read, launch=True)


# --- VM-execution controls (error 7) ---------------------------------------------

@pytest.mark.parametrize("changes", [
    {"PIN_BASED_VM_EXEC_CONTROL": PIN_NMI},                                   # default1 bits 1,2,4 cleared
    {"PIN_BASED_VM_EXEC_CONTROL": BASE["PIN_BASED_VM_EXEC_CONTROL"] | (1 << 8)},     # not allowed-1
    {"CPU_BASED_VM_EXEC_CONTROL": BASE["CPU_BASED_VM_EXEC_CONTROL"] | (1 << 17)},    # tertiary: not allowed
    {"SECONDARY_VM_EXEC_CONTROL": 1 << 14},                                   # VMCS shadowing: not allowed
    {"CR3_TARGET_COUNT": 5},
    {"MSR_BITMAP": 0x3008},
    {"MSR_BITMAP": 1 << 46},
    {"CPU_BASED_VM_EXEC_CONTROL": BASE["CPU_BASED_VM_EXEC_CONTROL"] | P_IO_BITMAPS,
     "IO_BITMAP_A": 0x1000, "IO_BITMAP_B": 0x2800},
    {"PIN_BASED_VM_EXEC_CONTROL": CAPS.pinbased[0] | PIN_VNMI},               # virtual NMIs w/o NMI exiting
    {"CPU_BASED_VM_EXEC_CONTROL": BASE["CPU_BASED_VM_EXEC_CONTROL"] | P_NMI_WINDOW},  # w/o virtual NMIs
    {"SECONDARY_VM_EXEC_CONTROL": S_APIC_ACCESS, "APIC_ACCESS_ADDR": 0xFEE00010},
    {"SECONDARY_VM_EXEC_CONTROL": S_VPID, "VIRTUAL_PROCESSOR_ID": 0},
    {"SECONDARY_VM_EXEC_CONTROL": S_UG},                                      # UG requires EPT
], ids=["pin-allowed0", "pin-allowed1", "tertiary", "sec-allowed1", "cr3-count", "msr-bitmap-align",
        "msr-bitmap-width", "io-bitmap-b-align", "vnmi", "nmi-window", "apic-access-align", "vpid-0",
        "ug-no-ept"])
def test_execution_control_failures(changes):
    f = run(vmcs(**changes))
    assert_vmfail(f, 7)
    assert_blames_a_change(f, changes)


def test_cr3_target_count_4_and_vpid_nonzero_are_fine():
    assert run(vmcs(CR3_TARGET_COUNT=4)) is None
    assert run(vmcs(SECONDARY_VM_EXEC_CONTROL=S_VPID, VIRTUAL_PROCESSOR_ID=1)) is None


def test_true_msrs_let_cr3_exiting_be_0():
    # The TRUE procbased MSR reports bits 15/16 as allowed-0; the plain one does not.
    assert run(BASE) is None
    plain = replace(CAPS, procbased=(CAPS.procbased[0] | P_CR3_LOAD | P_CR3_STORE, CAPS.procbased[1]))
    f = run(BASE, caps=plain)
    assert_vmfail(f, 7)
    assert "CPU_BASED_CR3_LOAD_EXITING" in f.check and f.field == "CPU_BASED_VM_EXEC_CONTROL"


def test_secondary_controls_ignored_unless_activated():
    proc = BASE["CPU_BASED_VM_EXEC_CONTROL"] & ~P_SECONDARY
    assert run(vmcs(CPU_BASED_VM_EXEC_CONTROL=proc, SECONDARY_VM_EXEC_CONTROL=0xFFFFFFFF)) is None
    assert_vmfail(run(vmcs(SECONDARY_VM_EXEC_CONTROL=0xFFFFFFFF)), 7)


def test_tpr_shadow_checks(mem):
    tpr = dict(CPU_BASED_VM_EXEC_CONTROL=BASE["CPU_BASED_VM_EXEC_CONTROL"] | P_TPR_SHADOW,
               VIRTUAL_APIC_PAGE_ADDR=0x8000)
    mem.write_u8(0x8080, 0x50)                                  # VTPR: priority class 5
    assert run(vmcs(**tpr, TPR_THRESHOLD=5), mem) is None
    assert_vmfail(run(vmcs(**tpr, TPR_THRESHOLD=6), mem), 7)    # 6 > VTPR[7:4] = 5
    assert_vmfail(run(vmcs(**tpr, TPR_THRESHOLD=0x10), mem), 7)  # bits 31:4
    assert_vmfail(run(vmcs(**dict(tpr, VIRTUAL_APIC_PAGE_ADDR=0x8100), TPR_THRESHOLD=0), mem), 7)
    # With "virtualize APIC accesses" the VTPR comparison is not made.
    f = run(vmcs(**tpr, TPR_THRESHOLD=6, SECONDARY_VM_EXEC_CONTROL=S_APIC_ACCESS,
                 APIC_ACCESS_ADDR=0xA000), mem)
    assert f is None


# A CPU that allows every secondary control and posted interrupts, to reach
# the dependency checks between them.
OPEN = replace(CAPS, pinbased=(CAPS.pinbased[0], 0xFF), procbased2=(0, 0xFFFFFFFF))


@pytest.mark.parametrize("changes", [
    {"SECONDARY_VM_EXEC_CONTROL": S_X2APIC},                                   # needs TPR shadow
    {"SECONDARY_VM_EXEC_CONTROL": S_VID},                                      # needs TPR shadow
    {"CPU_BASED_VM_EXEC_CONTROL": BASE["CPU_BASED_VM_EXEC_CONTROL"] | P_TPR_SHADOW,
     "VIRTUAL_APIC_PAGE_ADDR": 0x8000, "APIC_ACCESS_ADDR": 0xA000,
     "SECONDARY_VM_EXEC_CONTROL": S_X2APIC | S_APIC_ACCESS},                   # x2APIC and APIC accesses
    {"CPU_BASED_VM_EXEC_CONTROL": BASE["CPU_BASED_VM_EXEC_CONTROL"] | P_TPR_SHADOW,
     "VIRTUAL_APIC_PAGE_ADDR": 0x8000, "SECONDARY_VM_EXEC_CONTROL": S_VID},     # VID w/o ext-int exiting
    {"PIN_BASED_VM_EXEC_CONTROL": BASE["PIN_BASED_VM_EXEC_CONTROL"] | PIN_POSTED},  # posted w/o VID
    {"SECONDARY_VM_EXEC_CONTROL": S_PML, "PML_ADDRESS": 0x4000},               # PML w/o EPT
    {"SECONDARY_VM_EXEC_CONTROL": S_SHADOW_VMCS, "VMREAD_BITMAP": 0x4001, "VMWRITE_BITMAP": 0x5000},
])
def test_secondary_control_dependencies(changes):
    f = run(vmcs(**changes), caps=OPEN)
    assert_vmfail(f, 7)
    assert f.field.endswith(("CONTROL", "BITMAP")), str(f)


def test_posted_interrupt_requirements():
    ok = dict(PIN_BASED_VM_EXEC_CONTROL=BASE["PIN_BASED_VM_EXEC_CONTROL"] | PIN_POSTED | PIN_EXT_INTR,
              CPU_BASED_VM_EXEC_CONTROL=BASE["CPU_BASED_VM_EXEC_CONTROL"] | P_TPR_SHADOW,
              VIRTUAL_APIC_PAGE_ADDR=0x8000, SECONDARY_VM_EXEC_CONTROL=S_VID,
              VM_EXIT_CONTROLS=BASE["VM_EXIT_CONTROLS"] | X_ACK_INTR,
              POSTED_INTR_NV=0xF2, POSTED_INTR_DESC_ADDR=0x9040)
    assert run(vmcs(**ok), caps=OPEN) is None
    assert_vmfail(run(vmcs(**dict(ok, VM_EXIT_CONTROLS=BASE["VM_EXIT_CONTROLS"])), caps=OPEN), 7)
    assert_vmfail(run(vmcs(**dict(ok, POSTED_INTR_NV=0x1F2)), caps=OPEN), 7)
    assert_vmfail(run(vmcs(**dict(ok, POSTED_INTR_DESC_ADDR=0x9020)), caps=OPEN), 7)


@pytest.mark.parametrize("eptp,ok", [
    (0x5000 | 0x1E, True),            # WB, 4 levels
    (0x5000 | 0x18, True),            # UC, 4 levels
    (0x5000 | 0x5E, True),            # WB, 4 levels, A/D (supported)
    (0x5000 | 0x1B, False),           # memory type 3
    (0x5000 | 0x26, False),           # 5-level walk: not supported
    (0x5000 | 0x16, False),           # walk length 3
    (0x5000 | 0x9E, False),           # bit 7: supervisor shadow stack, not supported
    (0x5000 | 0x11E, False),          # reserved bit 8
    ((1 << 46) | 0x5000 | 0x1E, False),   # beyond MAXPHYADDR 46
])
def test_eptp_checks(eptp, ok):
    f = run(vmcs(SECONDARY_VM_EXEC_CONTROL=S_EPT, EPT_POINTER=eptp))
    if ok:
        assert f is None
    else:
        assert_vmfail(f, 7)
        assert f.field == "EPT_POINTER" and f.check.startswith("SECONDARY_EXEC_ENABLE_EPT requires a valid EPT_POINTER")


def test_eptp_ad_needs_the_capability():
    no_ad = replace(CAPS, ept_vpid_cap=CAPS.ept_vpid_cap & ~(1 << 21))
    assert_vmfail(run(vmcs(SECONDARY_VM_EXEC_CONTROL=S_EPT, EPT_POINTER=0x5000 | 0x5E), caps=no_ad), 7)


# --- VM-exit and VM-entry controls (error 7) ----------------------------------------

@pytest.mark.parametrize("changes", [
    {"VM_EXIT_CONTROLS": BASE["VM_EXIT_CONTROLS"] | X_SAVE_TIMER},     # without the preemption timer
    {"VM_EXIT_CONTROLS": BASE["VM_EXIT_CONTROLS"] & ~(1 << 0)},        # default1 bit 0
    {"VM_EXIT_MSR_STORE_COUNT": 1, "VM_EXIT_MSR_STORE_ADDR": 0x4008},
    {"VM_EXIT_MSR_LOAD_COUNT": 2, "VM_EXIT_MSR_LOAD_ADDR": (1 << 46) - 16},   # last byte beyond width
    {"VM_ENTRY_CONTROLS": BASE["VM_ENTRY_CONTROLS"] | E_SMM},          # not allowed-1
    {"VM_ENTRY_MSR_LOAD_COUNT": 1, "VM_ENTRY_MSR_LOAD_ADDR": 0x4004},
])
def test_exit_and_entry_control_failures(changes):
    f = run(vmcs(**changes))
    assert_vmfail(f, 7)
    assert_blames_a_change(f, changes)


def test_save_timer_with_timer_and_aligned_msr_areas_are_fine():
    assert run(vmcs(PIN_BASED_VM_EXEC_CONTROL=BASE["PIN_BASED_VM_EXEC_CONTROL"] | PIN_TIMER,
                    VM_EXIT_CONTROLS=BASE["VM_EXIT_CONTROLS"] | X_SAVE_TIMER,
                    VM_EXIT_MSR_STORE_COUNT=3, VM_EXIT_MSR_STORE_ADDR=0x4010)) is None


def test_entry_to_smm_is_refused_even_if_allowed():
    smm_caps = replace(CAPS, entry=(CAPS.entry[0], CAPS.entry[1] | E_SMM))
    assert_vmfail(run(vmcs(VM_ENTRY_CONTROLS=BASE["VM_ENTRY_CONTROLS"] | E_SMM), caps=smm_caps), 7)


VALID = 1 << 31
DELIVER = 1 << 11


def inject(info, error_code=0, length=0, base=BASE, **more):
    return vmcs(base, VM_ENTRY_INTR_INFO_FIELD=info, VM_ENTRY_EXCEPTION_ERROR_CODE=error_code,
                VM_ENTRY_INSTRUCTION_LEN=length, GUEST_RFLAGS=0x202, **more)


@pytest.mark.parametrize("vector", range(32))
def test_hardware_exception_error_code_consistency(vector):
    # SDM: deliver-error-code must be 1 exactly for #DF, #TS, #NP, #SS, #GP, #PF, #AC.
    has_code = vector in (8, 10, 11, 12, 13, 14, 17)
    good = VALID | (3 << 8) | vector | (DELIVER if has_code else 0)
    bad = good ^ DELIVER
    assert run(inject(good)) is None
    assert_vmfail(run(inject(bad)), 7)


def test_no_hw_error_code_cc_relaxes_the_rule():
    relaxed = replace(CAPS, basic=CAPS.basic | (1 << 56))
    assert run(inject(VALID | (3 << 8) | 6 | DELIVER), caps=relaxed) is None      # #UD with a code
    assert run(inject(VALID | (3 << 8) | 13), caps=relaxed) is None               # #GP without


def test_no_error_code_in_real_mode():
    assert_vmfail(run(inject(VALID | (3 << 8) | 13 | DELIVER, base=REAL_MODE)), 7)
    assert run(inject(VALID | (3 << 8) | 13, base=REAL_MODE)) is None


@pytest.mark.parametrize("info,code,length,ok", [
    (VALID | (1 << 8) | 0x20, 0, 0, False),          # type 1 reserved
    (VALID | (2 << 8) | 2, 0, 0, True),               # NMI, vector 2
    (VALID | (2 << 8) | 3, 0, 0, False),              # NMI must be vector 2
    (VALID | (3 << 8) | 32, 0, 0, False),             # hardware exception vector > 31
    (VALID | (0 << 8) | 0x30, 0, 0, True),            # external interrupt
    (VALID | (0 << 8) | 0x30 | DELIVER, 0, 0, False),  # no error code for an interrupt
    (VALID | (7 << 8), 0, 0, True),                   # other event: pending MTF (MTF supported)
    (VALID | (7 << 8) | 1, 0, 0, False),              # other event must be vector 0
    (VALID | (3 << 8) | 14 | DELIVER | (1 << 12), 0, 0, False),   # reserved bit 12
    (VALID | (3 << 8) | 14 | DELIVER, 0xFFFF, 0, True),
    (VALID | (3 << 8) | 14 | DELIVER, 0x10000, 0, False),          # error code bits 31:16
    (VALID | (4 << 8) | 0x80, 0, 2, True),            # software interrupt, length 2
    (VALID | (4 << 8) | 0x80, 0, 0, True),            # length 0: IA32_VMX_MISC[30] = 1 (issue 14)
    (VALID | (6 << 8) | 3, 0, 16, False),             # software exception, length 16
    (VALID | (5 << 8) | 1, 0, 1, True),               # privileged software exception (INT1)
    (VALID | (5 << 8) | 1, 0, 0, True),               # length 0: IA32_VMX_MISC[30] = 1
])
def test_event_injection_fields(info, code, length, ok):
    f = run(inject(info, code, length))
    if ok:
        assert f is None, str(f)
    else:
        assert_vmfail(f, 7)


def test_zero_length_injection_when_allowed():
    zero_ok = replace(CAPS, misc=CAPS.misc | (1 << 30))
    assert run(inject(VALID | (4 << 8) | 0x80, length=0), caps=zero_ok) is None


def test_mtf_event_needs_mtf_support():
    no_mtf = replace(CAPS, procbased=(CAPS.procbased[0], CAPS.procbased[1] & ~P_MTF))
    assert_vmfail(run(inject(VALID | (7 << 8)), caps=no_mtf), 7)


# --- host state (error 8) ----------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {"HOST_CR0": 0x80000030},                       # PE cleared: CR0_FIXED0
    {"HOST_CR0": 0x180000031},                      # bit 32: CR0_FIXED1
    {"HOST_CR4": 0x20},                             # VMXE cleared
    {"HOST_CR4": 0x2020 | (1 << 12)},               # LA57 not in CR4_FIXED1
    {"HOST_CR3": 1 << 46},
    {"HOST_IA32_SYSENTER_EIP": 0x0000800000000000},
    {"VM_EXIT_CONTROLS": BASE["VM_EXIT_CONTROLS"] | X_LOAD_PAT, "HOST_IA32_PAT": 0x0007040600070402},
    {"HOST_IA32_EFER": 0x100},                      # LMA != host address-space size
    {"HOST_IA32_EFER": 0x500 | (1 << 2)},           # reserved bit 2
    {"HOST_CS_SELECTOR": 0x0B},                     # RPL 3
    {"HOST_DS_SELECTOR": 0x14},                     # TI
    {"HOST_CS_SELECTOR": 0},
    {"HOST_TR_SELECTOR": 0},
    {"HOST_FS_BASE": 0x0001000000000000},
    {"HOST_GDTR_BASE": 0xFFFF7FFFFFFFF000},
    {"HOST_RIP": 0x0000800000000000},
    {"HOST_CR4": 0x2000},                           # 64-bit host without PAE
    {"VM_EXIT_CONTROLS": BASE["VM_EXIT_CONTROLS"] & ~X_HOST64, "HOST_IA32_EFER": 0},  # host in IA-32e
])
def test_host_state_failures(changes):
    f = run(vmcs(**changes))
    assert_vmfail(f, 8)
    assert_blames_a_change(f, changes)


def test_host_ss_null_allowed_for_64_bit_host():
    assert run(vmcs(HOST_SS_SELECTOR=0)) is None


def test_host_outside_ia32e_mode():
    host32 = vmcs(V8086, VM_EXIT_CONTROLS=BASE["VM_EXIT_CONTROLS"] & ~X_HOST64, HOST_IA32_EFER=0,
                  HOST_RIP=0x81000000)
    assert run(host32, host_in_ia32e=False) is None
    assert_vmfail(run(vmcs(host32, HOST_SS_SELECTOR=0), host_in_ia32e=False), 8)
    assert_vmfail(run(vmcs(host32, HOST_RIP=0x100000000), host_in_ia32e=False), 8)
    assert_vmfail(run(vmcs(host32, HOST_CR4=0x2000 | (1 << 17)), host_in_ia32e=False), 8)  # PCIDE
    assert_vmfail(run(BASE, host_in_ia32e=False), 8)   # 64-bit host / IA-32e guest outside IA-32e


def test_control_errors_come_before_host_errors():
    assert_vmfail(run(vmcs(CR3_TARGET_COUNT=9, HOST_CS_SELECTOR=0)), 7)


# --- guest control registers and MSRs (reason 33) -------------------------------------

@pytest.mark.parametrize("changes", [
    {"GUEST_CR0": 0x80000011},                            # NE cleared (CR0_FIXED0)
    {"GUEST_CR4": 0x20},                                  # VMXE cleared
    {"GUEST_CR4": 0x2020 | (1 << 22)},                    # bit 22 not in CR4_FIXED1
    {"VM_ENTRY_CONTROLS": BASE["VM_ENTRY_CONTROLS"] | E_LOAD_DBG, "GUEST_IA32_DEBUGCTL": 1 << 2},
    {"GUEST_CR4": 0x2000},                                # IA-32e guest without PAE
    {"GUEST_CR3": 1 << 46},
    {"VM_ENTRY_CONTROLS": BASE["VM_ENTRY_CONTROLS"] | E_LOAD_DBG, "GUEST_DR7": 1 << 32},
    {"GUEST_SYSENTER_ESP": 0x0000800000000000},
    {"VM_ENTRY_CONTROLS": BASE["VM_ENTRY_CONTROLS"] | E_LOAD_PAT, "GUEST_IA32_PAT": 0x0307040600070406},
    {"GUEST_IA32_EFER": 0x100},                           # LMA != IA-32e mode guest
    {"GUEST_IA32_EFER": 0x400},                           # LME != LMA with CR0.PG
    {"GUEST_IA32_EFER": 0x500 | (1 << 12)},               # reserved on Intel (SVME)
])
def test_guest_control_register_failures(changes):
    f = run(vmcs(**changes))
    assert_guest(f)
    assert_blames_a_change(f, changes)


def test_dr7_high_bits_only_checked_when_loading_debug_controls():
    assert run(vmcs(GUEST_DR7=1 << 32)) is None


def test_pcide_needs_ia32e_guest():
    assert_guest(run(vmcs(PAE, GUEST_CR4=0x2020 | (1 << 17))))


def test_unrestricted_guest_relaxes_pe_and_pg_only():
    assert run(REAL_MODE) is None
    no_ug = vmcs(REAL_MODE, SECONDARY_VM_EXEC_CONTROL=S_EPT)
    assert_guest(run(no_ug))                                       # PE, PG required
    assert_guest(run(vmcs(REAL_MODE, GUEST_CR0=0x10)))             # NE still required
    assert_guest(run(vmcs(REAL_MODE, GUEST_CR0=0x80000030)))       # PG without PE


def test_guest_cd_nw_are_never_checked_but_host_ones_are():
    strict = replace(CAPS, cr0_fixed1=0xFFFFFFFF & ~(1 << 29))     # a CPU refusing NW = 1
    assert run(vmcs(GUEST_CR0=0x80000031 | (1 << 29)), caps=strict) is None
    assert_vmfail(run(vmcs(HOST_CR0=0x80000031 | (1 << 29)), caps=strict), 8)


# --- guest segments --------------------------------------------------------------------

@pytest.mark.parametrize("changes", [
    {"GUEST_TR_SELECTOR": 0x1C},                          # TR TI
    {"GUEST_LDTR_SELECTOR": 0x2C, "GUEST_LDTR_AR_BYTES": 0x82},   # usable LDTR with TI
    {"GUEST_SS_SELECTOR": 0x13},                          # SS RPL != CS RPL
    {"GUEST_FS_BASE": 0x0000800000000000},
    {"GUEST_TR_BASE": 0xFFFF000000000000},
    {"GUEST_CS_BASE": 1 << 32},
    {"GUEST_DS_BASE": 1 << 32},                           # usable DS
    {"GUEST_CS_AR_BYTES": 0xA093},                        # CS type 3 without UG
    {"GUEST_CS_AR_BYTES": 0xA09A},                        # CS type 10: not accessed
    {"GUEST_SS_AR_BYTES": 0xC095},                        # SS type 5
    {"GUEST_DS_AR_BYTES": 0xC092},                        # DS not accessed
    {"GUEST_DS_AR_BYTES": 0xC099},                        # DS execute-only code
    {"GUEST_DS_AR_BYTES": 0xC083},                        # DS S = 0
    {"GUEST_CS_AR_BYTES": 0xA0BB},                        # non-conforming CS DPL 1 != SS DPL 0
    {"GUEST_CS_AR_BYTES": 0xA0BF},                        # conforming CS DPL 1 > SS DPL 0
    {"GUEST_SS_SELECTOR": 0x13, "GUEST_CS_SELECTOR": 0x0B},   # SS DPL 0 != RPL 3
    {"GUEST_DS_SELECTOR": 0x13},                          # DS DPL 0 < RPL 3
    {"GUEST_ES_AR_BYTES": 0xC013},                        # P = 0
    {"GUEST_CS_AR_BYTES": 0xA19B},                        # reserved bit 8
    {"GUEST_CS_AR_BYTES": 0xE09B},                        # L and D/B in an IA-32e guest
    {"GUEST_DS_LIMIT": 0xFFFFF000},                       # G = 1 with limit[11:0] != 0xfff
    {"GUEST_DS_AR_BYTES": 0x4093},                        # G = 0 with limit[31:20] != 0
    {"GUEST_ES_AR_BYTES": 0xC093 | (1 << 17)},            # reserved bit 17
    {"GUEST_TR_AR_BYTES": 0x83},                          # 16-bit busy TSS in an IA-32e guest
    {"GUEST_TR_AR_BYTES": 0x89},                          # available TSS
    {"GUEST_TR_AR_BYTES": 0x1008B},                       # TR unusable
    {"GUEST_TR_AR_BYTES": 0x0B},                          # TR P = 0
    {"GUEST_TR_AR_BYTES": 0x9B},                          # TR S = 1
    {"GUEST_LDTR_AR_BYTES": 0x83},                        # usable LDTR of type 3
    {"GUEST_LDTR_AR_BYTES": 0x82, "GUEST_LDTR_LIMIT": 0x100000},   # LDTR G = 0 with a big limit
])
def test_guest_segment_failures(changes):
    f = run(vmcs(**changes))
    assert_guest(f)
    assert_blames_a_change(f, changes)


def test_limit_with_both_granularities_possible():
    # limit 0x000FFFFF: bits 11:0 all 1 and bits 31:20 all 0, so G may be 0 or 1.
    assert run(vmcs(GUEST_SS_LIMIT=0xFFFFF)) is None
    assert run(vmcs(GUEST_SS_LIMIT=0xFFFFF, GUEST_SS_AR_BYTES=0x4093)) is None


def test_unusable_segments_skip_their_checks():
    assert run(vmcs(GUEST_DS_AR_BYTES=0x10000 | 0x1F0F, GUEST_DS_BASE=1 << 40, GUEST_DS_SELECTOR=0x13)) is None


def test_ring3_guest_and_its_segment_rules():
    ring3 = vmcs(GUEST_CS_SELECTOR=0x2B, GUEST_CS_AR_BYTES=0xA0FB, GUEST_SS_SELECTOR=0x33,
                 GUEST_SS_AR_BYTES=0xC0F3, GUEST_DS_SELECTOR=0x33, GUEST_DS_AR_BYTES=0xC0F3,
                 GUEST_ES_SELECTOR=0x33, GUEST_ES_AR_BYTES=0xC0F3)
    assert run(ring3) is None
    assert_guest(run(vmcs(ring3, GUEST_ACTIVITY_STATE=1)))        # HLT needs SS.DPL 0


@pytest.mark.parametrize("changes", [
    {"GUEST_CS_BASE": 0x12345},          # base must be selector * 16
    {"GUEST_SS_LIMIT": 0xFFFFF},         # limit must be 0xffff
    {"GUEST_DS_AR_BYTES": 0xF1},         # access rights must be 0xf3
])
def test_virtual_8086_rules(changes):
    f = run(vmcs(V8086, **changes))
    assert_guest(f)
    assert_blames_a_change(f, changes)


def test_vm_flag_rules():
    assert_guest(run(vmcs(GUEST_RFLAGS=0x20002)))                  # IA-32e guest with VM = 1
    assert_guest(run(vmcs(REAL_MODE, GUEST_RFLAGS=0x20002)))       # CR0.PE = 0 with VM = 1


def test_unrestricted_guest_segment_relaxations():
    # CS type 3 (data) and SS.RPL != CS.RPL are fine with UG; CS type 3 needs DPL 0.
    assert run(vmcs(REAL_MODE, GUEST_CS_AR_BYTES=0x93, GUEST_SS_SELECTOR=0x3)) is None
    assert_guest(run(vmcs(REAL_MODE, GUEST_CS_AR_BYTES=0xB3)))
    assert_guest(run(vmcs(REAL_MODE, GUEST_SS_AR_BYTES=0xF3, GUEST_CS_AR_BYTES=0xFF)))  # SS DPL 3, PE 0


# --- descriptor tables, RIP, RFLAGS -----------------------------------------------------

@pytest.mark.parametrize("changes", [
    {"GUEST_GDTR_BASE": 0x0000800000000000},
    {"GUEST_IDTR_LIMIT": 0x10000},
    {"GUEST_RIP": 0xFFFE800000000000},                              # 64-bit: bits 63:48 differ
    {"GUEST_RIP": 1 << 32, "GUEST_CS_AR_BYTES": 0xC09B},            # compatibility mode
    {"GUEST_RFLAGS": 0x0},                                          # bit 1 must be 1
    {"GUEST_RFLAGS": 0x2 | (1 << 3)},
    {"GUEST_RFLAGS": 0x2 | (1 << 15)},
    {"GUEST_RFLAGS": 0x2 | (1 << 22)},
    {"VM_ENTRY_INTR_INFO_FIELD": VALID | 0x30},                     # external interrupt with IF = 0
])
def test_guest_tables_rip_rflags_failures(changes):
    f = run(vmcs(**changes))
    assert_guest(f)
    assert_blames_a_change(f, changes)


def test_canonical_rip_in_64_bit_mode_is_fine():
    assert run(vmcs(GUEST_RIP=0xFFFF800000001000)) is None
    assert is_canonical(0xFFFF800000000000) and not is_canonical(0xFFFE800000000000)


# --- activity and interruptibility state --------------------------------------------------

HLT, SHUTDOWN, WAIT_SIPI = 1, 2, 3


@pytest.mark.parametrize("activity,info,ok", [
    (HLT, 0, True),
    (HLT, VALID | 0x30, True),                        # external interrupt
    (HLT, VALID | (2 << 8) | 2, True),                # NMI
    (HLT, VALID | (3 << 8) | 1, True),                # #DB
    (HLT, VALID | (3 << 8) | 18, True),               # #MC
    (HLT, VALID | (7 << 8), True),                    # pending MTF
    (HLT, VALID | (3 << 8) | 14 | DELIVER, False),    # #PF
    (HLT, VALID | (4 << 8) | 0x80, False),            # software interrupt
    (SHUTDOWN, VALID | (2 << 8) | 2, True),
    (SHUTDOWN, VALID | (3 << 8) | 18, True),
    (SHUTDOWN, VALID | 0x30, False),
    (WAIT_SIPI, 0, True),
    (WAIT_SIPI, VALID | (2 << 8) | 2, False),
    (4, 0, False),                                    # not an activity state
])
def test_activity_state_and_injection(activity, info, ok):
    f = run(inject(info, length=2, GUEST_ACTIVITY_STATE=activity))
    if ok:
        assert f is None, str(f)
    else:
        assert_guest(f)


def test_unsupported_activity_state():
    no_hlt = replace(CAPS, misc=CAPS.misc & ~(1 << 6))
    assert_guest(run(vmcs(GUEST_ACTIVITY_STATE=HLT), caps=no_hlt))


STI, MOVSS, SMI, NMI_BLOCK = 1, 2, 4, 8


@pytest.mark.parametrize("changes,qual", [
    ({"GUEST_INTERRUPTIBILITY_INFO": 1 << 5}, 0),                       # reserved
    ({"GUEST_INTERRUPTIBILITY_INFO": 1 << 4}, 0),                       # enclave: no SGX
    ({"GUEST_INTERRUPTIBILITY_INFO": STI | MOVSS, "GUEST_RFLAGS": 0x202}, 0),
    ({"GUEST_INTERRUPTIBILITY_INFO": STI}, 0),                          # STI with IF = 0
    ({"GUEST_INTERRUPTIBILITY_INFO": MOVSS, "GUEST_ACTIVITY_STATE": HLT}, 0),   # blocking needs active
    ({"GUEST_INTERRUPTIBILITY_INFO": MOVSS, "GUEST_RFLAGS": 0x202,
      "VM_ENTRY_INTR_INFO_FIELD": VALID | 0x30}, 0),                    # ext interrupt with MOV SS
    ({"GUEST_INTERRUPTIBILITY_INFO": MOVSS, "VM_ENTRY_INTR_INFO_FIELD": VALID | (2 << 8) | 2}, 0),
    ({"GUEST_INTERRUPTIBILITY_INFO": SMI}, 0),                          # not in SMM
    ({"GUEST_INTERRUPTIBILITY_INFO": STI, "GUEST_RFLAGS": 0x202,
      "VM_ENTRY_INTR_INFO_FIELD": VALID | (2 << 8) | 2}, 3),            # NMI with STI: qualification 3
    ({"GUEST_INTERRUPTIBILITY_INFO": NMI_BLOCK, "VM_ENTRY_INTR_INFO_FIELD": VALID | (2 << 8) | 2,
      "PIN_BASED_VM_EXEC_CONTROL": BASE["PIN_BASED_VM_EXEC_CONTROL"] | PIN_VNMI}, 0),
])
def test_interruptibility_failures(changes, qual):
    assert_guest(run(vmcs(**changes)), qual)


def test_interruptibility_allowed_cases():
    assert run(vmcs(GUEST_INTERRUPTIBILITY_INFO=STI, GUEST_RFLAGS=0x202)) is None
    assert run(vmcs(GUEST_INTERRUPTIBILITY_INFO=MOVSS)) is None
    # NMI injection with blocking by NMI is fine without virtual NMIs.
    assert run(vmcs(GUEST_INTERRUPTIBILITY_INFO=NMI_BLOCK, VM_ENTRY_INTR_INFO_FIELD=VALID | (2 << 8) | 2)) is None
    # A CPU that does not make the STI/NMI check.
    lax = replace(CAPS, nmi_injection_checks_sti=False)
    assert run(vmcs(GUEST_INTERRUPTIBILITY_INFO=STI, GUEST_RFLAGS=0x202,
                    VM_ENTRY_INTR_INFO_FIELD=VALID | (2 << 8) | 2), caps=lax) is None


# --- pending debug exceptions ------------------------------------------------------------

TF, BS = 1 << 8, 1 << 14


@pytest.mark.parametrize("pde,rflags,intr,debugctl,ok", [
    (1 << 4, 0x2, 0, 0, False),          # reserved bit 4
    (1 << 13, 0x2, 0, 0, False),         # reserved bit 13
    (1 << 16, 0x2, 0, 0, False),         # RTM: not supported
    (0xF | (1 << 12), 0x2, 0, 0, True),  # B3-B0 and enabled breakpoint
    (0, 0x202 | TF, STI, 0, False),      # TF = 1, BTF = 0, blocking: BS must be 1
    (BS, 0x202 | TF, STI, 0, True),
    (BS, 0x2, MOVSS, 0, False),          # TF = 0: BS must be 0
    (BS, 0x2 | TF, MOVSS, 2, False),     # BTF = 1: BS must be 0
    (BS, 0x2, 0, 0, True),               # no blocking, active: BS not checked
])
def test_pending_debug_exceptions(pde, rflags, intr, debugctl, ok):
    f = run(vmcs(GUEST_PENDING_DBG_EXCEPTIONS=pde, GUEST_RFLAGS=rflags,
                 GUEST_INTERRUPTIBILITY_INFO=intr, GUEST_IA32_DEBUGCTL=debugctl))
    if ok:
        assert f is None, str(f)
    else:
        assert_guest(f)


def test_bs_rule_applies_in_hlt():
    assert_guest(run(vmcs(GUEST_ACTIVITY_STATE=HLT, GUEST_RFLAGS=0x2 | TF)))


# --- VMCS link pointer (qualification 4) --------------------------------------------------

def test_vmcs_link_pointer(mem):
    rev = capabilities.VMCS_REVISION_ID
    mem.write_u32(0xC000, rev)
    assert run(vmcs(VMCS_LINK_POINTER=0xC000), mem) is None
    assert_guest(run(vmcs(VMCS_LINK_POINTER=0xC800), mem), 4)           # misaligned
    assert_guest(run(vmcs(VMCS_LINK_POINTER=1 << 46), mem), 4)          # beyond the width
    assert_guest(run(vmcs(VMCS_LINK_POINTER=0xD000), mem), 4)           # revision 0 there
    assert_guest(run(vmcs(VMCS_LINK_POINTER=0x1000000), mem), 4)        # outside RAM: reads all ones
    mem.write_u32(0xC000, rev | (1 << 31))                              # a shadow VMCS ...
    assert_guest(run(vmcs(VMCS_LINK_POINTER=0xC000), mem), 4)           # ... without VMCS shadowing
    mem.write_u32(0xC000, rev)
    assert_guest(run(vmcs(VMCS_LINK_POINTER=0xC000), mem, current_vmcs_pa=0xC000), 4)


def test_link_pointer_zero_is_not_all_ones(mem):
    assert_guest(run(vmcs(VMCS_LINK_POINTER=0), mem), 4)


# --- PDPTEs (qualification 2) ---------------------------------------------------------------

def test_pae_pdptes_from_memory(mem):
    for i in range(4):
        mem.write_u64(0x9000 + 8 * i, 0xA000 + 0x1000 * i + 1)
    mem.write_u64(0x9010, 0xC001 | (1 << 1))               # present, reserved bit 1
    assert_guest(run(PAE, mem), 2)
    mem.write_u64(0x9010, 0xFFFFFFFFFFFFFFFE)               # not present: ignored
    assert run(PAE, mem) is None
    mem.write_u64(0x9018, 0xD001 | (1 << 46))              # beyond MAXPHYADDR
    assert_guest(run(PAE, mem), 2)


def test_pae_pdptes_from_vmcs_with_ept(mem):
    ept_pae = vmcs(PAE, SECONDARY_VM_EXEC_CONTROL=S_EPT, GUEST_PDPTR0=0xA001, GUEST_PDPTR1=0,
                   GUEST_PDPTR2=0, GUEST_PDPTR3=0)
    mem.write_u64(0x9000, 0xA001 | (1 << 5))               # memory is not used with EPT
    assert run(ept_pae, mem) is None
    assert_guest(run(vmcs(ept_pae, GUEST_PDPTR2=0xB001 | (1 << 7)), mem), 2)


# --- MSR-load area (reason 34, qualification = entry number) -----------------------------------

def msr_area(mem, entries, addr=0xE000):
    for i, (index, reserved, data) in enumerate(entries):
        mem.write_u32(addr + 16 * i, index)
        mem.write_u32(addr + 16 * i + 4, reserved)
        mem.write_u64(addr + 16 * i + 8, data)
    return dict(VM_ENTRY_MSR_LOAD_COUNT=len(entries), VM_ENTRY_MSR_LOAD_ADDR=addr)


@pytest.mark.parametrize("bad,number", [
    ((0xC0000100, 0, 0), 2),          # IA32_FS_BASE
    ((0xC0000101, 0, 0), 2),          # IA32_GS_BASE
    ((0x808, 0, 0), 2),               # x2APIC TPR
    ((0x8FF, 0, 0), 2),
    ((0x9B, 0, 0), 2),                # IA32_SMM_MONITOR_CTL
    ((0x9E, 0, 0), 2),                # IA32_SMBASE
    ((0x174, 1, 0), 2),               # bits 63:32 of the entry not 0
])
def test_msr_load_failures(mem, bad, number):
    area = msr_area(mem, [(0x174, 0, 0x10), bad, (0x175, 0, 0)])
    f = run(vmcs(**area), mem)
    assert f is not None and f.kind is FailureKind.ENTRY_FAILURE_EXIT
    assert (f.exit_reason, f.qualification) == (MSR_LOAD_FAIL, number), str(f)


def test_msr_load_valid_and_wrmsr_fault_callback(mem):
    area = msr_area(mem, [(0x174, 0, 0x10), (0x7FF, 0, 0), (0x900, 0, 0)])
    assert run(vmcs(**area), mem) is None
    f = run(vmcs(**area), mem, msr_write_faults=lambda index, value: index == 0x900)
    assert (f.exit_reason, f.qualification) == (MSR_LOAD_FAIL, 3)


def test_msr_load_more_entries_than_the_limit(mem):
    # IA32_VMX_MISC[27:25] = 0: 512 entries recommended; entry 513 fails here.
    area = msr_area(mem, [(0x174, 0, 0)] * 513)
    f = run(vmcs(**area), mem)
    assert (f.exit_reason, f.qualification) == (MSR_LOAD_FAIL, 513)


def test_guest_state_is_checked_before_msr_loading(mem):
    area = msr_area(mem, [(0xC0000100, 0, 0)])
    assert_guest(run(vmcs(GUEST_RFLAGS=0, **area), mem))


# --- a real VMCS region ----------------------------------------------------------------------

def test_with_a_vmcs_region_in_memory():
    mem = PhysMem(1 << 20)
    region = Vmcs.format(mem, 0x10000)
    for name, value in BASE.items():
        region.set(name, value)
    read = mem.read
    assert check_vm_entry(region, CAPS, read, launch=True) is None
    region.launch_state = "launched"
    f = check_vm_entry(region, CAPS, read, launch=True)
    assert_vmfail(f, 4)
    assert f.name == "VMXERR_VMLAUNCH_NONCLEAR_VMCS"
    assert check_vm_entry(region, CAPS, read, launch=False) is None
    region.set("VMCS_LINK_POINTER", 0x10000)                # points at itself
    f = check_vm_entry(region, CAPS, read, launch=False)
    assert_guest(f, 4)
    assert f.name == "INVALID_STATE" and f.basic_reason == 33


# --- property: allowed settings of the pin-based controls ---------------------------------------

@settings(max_examples=200, deadline=None)
@given(pin=st.integers(0, 0xFFFFFFFF))
def test_pin_based_allowed_settings_property(pin):
    # SDM: the value is legal iff every allowed-0 bit (must be 1) is set and no
    # bit outside allowed-1 is set.  Modelled CPU: must-be-1 = bits 1, 2, 4 (0x16),
    # may-be-1 = bits 0-7 (0xff).
    legal = (pin & 0x16) == 0x16 and not pin & ~0xFF
    f = check_execution_controls(vmcs(PIN_BASED_VM_EXEC_CONTROL=pin), CAPS, PhysMem(4096).read)
    reserved_failure = f is not None and f.check.startswith("PIN_BASED_VM_EXEC_CONTROL:")
    assert reserved_failure == (not legal)
