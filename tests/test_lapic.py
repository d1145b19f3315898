"""Local APIC and APIC bus: expected values from the Intel SDM vol. 3A, APIC chapter.

Numbers below are written from the SDM (register addresses, bit positions,
formulas), never computed by the code under test.
"""
import pytest

from devirt_emu.platform.lapic import ApicBus, GeneralProtection, LocalApic


class Clock:
    """A virtual clock the test moves by hand (ns)."""

    def __init__(self):
        self.t = 0

    def __call__(self):
        return self.t


# IA32_APIC_BASE (MSR 1BH): BSP bit 8, EXTD bit 10, EN bit 11, base FEE00000H.
APIC_BASE_MSR = 0x1B
BASE = 0xFEE00000
BSP, EXTD, EN = 1 << 8, 1 << 10, 1 << 11

# x2APIC MSRs (SDM table "Local APIC Register Address Map Supported by x2APIC")
ID, VER, TPR, PPR, EOI, LDR, SVR = 0x802, 0x803, 0x808, 0x80A, 0x80B, 0x80D, 0x80F
ISR0, TMR0, IRR0, ESR = 0x810, 0x818, 0x820, 0x828
ICR, LVTT, LVTTHM, LVTPC, LINT0, LINT1, LVTERR = 0x830, 0x832, 0x833, 0x834, 0x835, 0x836, 0x837
TMICT, TMCCT, TDCR, SELF_IPI = 0x838, 0x839, 0x83E, 0x83F
TSC_DEADLINE = 0x6E0

# ICR fields
DM_LOWEST, DM_NMI, DM_INIT, DM_STARTUP = 1 << 8, 4 << 8, 5 << 8, 6 << 8
LOGICAL = 1 << 11
ASSERT = 1 << 14
LEVEL_TRIG = 1 << 15
SH_SELF, SH_ALL_INC, SH_ALL_BUT = 1 << 18, 2 << 18, 3 << 18

MASKED = 1 << 16
PERIODIC = 1 << 17
TSC_DEADLINE_MODE = 2 << 17


def machine(ids=(0,), x2apic=True, enable=True):
    clock = Clock()
    bus = ApicBus()
    delivered = []
    bus.on_deliver = delivered.append
    apics = [LocalApic(i, clock, bus, bsp=(n == 0)) for n, i in enumerate(ids)]
    for a in apics:
        if x2apic:
            a.wrmsr(APIC_BASE_MSR, BASE | EN | EXTD)
            if enable:
                a.wrmsr(SVR, 0x1FF)            # software enable, spurious vector FFH
        elif enable:
            a.mmio_write(0xF0, 4, 0x1FF)
    return clock, bus, apics, delivered


def one():
    clock, _, apics, _ = machine()
    return clock, apics[0]


def irr_has(apic, vector):
    return bool(apic.rdmsr(IRR0 + vector // 32) >> (vector % 32) & 1)


def latch_esr(apic):
    """SDM: write ESR (0 in x2APIC mode) just before reading it."""
    apic.wrmsr(ESR, 0)
    return apic.rdmsr(ESR)


# --------------------------------------------------------------------------
# Priority arbitration
# --------------------------------------------------------------------------

def put_in_service(apic, vector):
    apic.accept(vector)
    assert apic.acknowledge() == vector


@pytest.mark.parametrize("tpr, isr_vector, expected_ppr", [
    (0x00, None, 0x00),      # nothing: PPR = TPR
    (0x35, None, 0x35),      # PPR = TPR[7:0] when no ISR bit is set
    (0x35, 0x41, 0x40),      # TPR class 3 < ISRV class 4: PPR[7:4]=4, PPR[3:0]=0
    (0x55, 0x41, 0x55),      # TPR class 5 > ISRV class 4: PPR = TPR
    (0x4A, 0x41, 0x4A),      # equal classes: model-specific, this model keeps TPR[3:0]
])
def test_ppr_is_max_of_tpr_and_isrv_class(tpr, isr_vector, expected_ppr):
    _, a = one()
    if isr_vector is not None:
        put_in_service(a, isr_vector)
    a.wrmsr(TPR, tpr)
    assert a.rdmsr(PPR) == expected_ppr


def test_pending_needs_a_class_above_ppr():
    _, a = one()
    a.wrmsr(TPR, 0x50)
    a.accept(0x5F)                              # class 5, not above class 5
    assert a.pending_vector() is None
    a.accept(0x60)                              # class 6
    assert a.pending_vector() == 0x60


def test_tpr_masks_and_unmasks():
    _, a = one()
    a.accept(0x41)
    a.wrmsr(TPR, 0x40)
    assert a.pending_vector() is None
    assert a.acknowledge() == 0xFF              # INTA finds nothing: spurious vector
    assert irr_has(a, 0x41)                     # still requested
    a.wrmsr(TPR, 0x3F)
    assert a.pending_vector() == 0x41


def test_highest_vector_first_and_isr_blocks_lower_classes():
    _, a = one()
    for v in (0x31, 0x92, 0x50):
        a.accept(v)
    assert a.acknowledge() == 0x92
    assert a.rdmsr(ISR0 + 4) == 1 << (0x92 - 128)
    assert a.rdmsr(PPR) == 0x90
    assert a.pending_vector() is None          # 0x50, 0x31 below class 9
    a.wrmsr(EOI, 0)
    assert a.acknowledge() == 0x50
    a.wrmsr(EOI, 0)
    assert a.acknowledge() == 0x31


def test_isr_nesting_and_eoi_order():
    _, a = one()
    put_in_service(a, 0x50)
    a.accept(0x58)                              # same class as in service: waits
    assert a.pending_vector() is None
    a.accept(0x80)                              # higher class nests
    assert a.acknowledge() == 0x80
    assert a.rdmsr(ISR0 + 2) == 1 << (0x50 - 64)
    assert a.rdmsr(ISR0 + 4) == 1 << 0
    a.wrmsr(EOI, 0)                             # clears the highest ISR bit: 0x80
    assert a.rdmsr(ISR0 + 4) == 0
    assert a.rdmsr(PPR) == 0x50
    assert a.pending_vector() is None
    a.wrmsr(EOI, 0)                             # 0x50
    assert a.rdmsr(PPR) == 0
    assert a.acknowledge() == 0x58


def test_spurious_vector_comes_from_svr_and_leaves_isr():
    _, a = one()
    a.wrmsr(SVR, 0x100 | 0xE7)
    assert a.acknowledge() == 0xE7
    assert all(a.rdmsr(ISR0 + i) == 0 for i in range(8))


def test_irr_tmr_words_and_trigger_mode():
    _, a = one()
    a.accept(0x41, trigger_level=True)          # vector 41H: word 2, bit 1
    assert a.rdmsr(IRR0 + 2) == 0x2
    assert a.rdmsr(TMR0 + 2) == 0x2             # TMR set for level-triggered
    a.accept(0x41)                              # edge: TMR cleared
    assert a.rdmsr(TMR0 + 2) == 0


def test_level_deassert_sets_nothing():
    _, a = one()
    assert a.accept(0x70, level=False, trigger_level=True) is False
    assert a.rdmsr(IRR0 + 3) == 0


def test_illegal_vector_sets_receive_illegal_and_is_dropped():
    _, a = one()
    assert a.accept(0x0F) is False
    assert a.rdmsr(IRR0) == 0
    assert latch_esr(a) == 1 << 6               # ESR bit 6: receive illegal vector


def test_software_disabled_drops_fixed_keeps_nmi():
    clock, bus, (a, b), _ = machine(ids=(0, 1))
    b.wrmsr(SVR, 0xFF)                          # bit 8 clear: software disabled
    a.wrmsr(ICR, (1 << 32) | 0x40)
    assert b.rdmsr(IRR0 + 2) == 0
    a.wrmsr(ICR, (1 << 32) | DM_NMI)
    assert b.take_nmi() is True


def test_cr8_is_tpr_high_nibble():
    _, a = one()
    a.write_cr8(0x5)
    assert a.rdmsr(TPR) == 0x50
    a.wrmsr(TPR, 0xA7)
    assert a.read_cr8() == 0xA
    with pytest.raises(GeneralProtection):
        a.write_cr8(0x10)


# --------------------------------------------------------------------------
# ICR routing
# --------------------------------------------------------------------------

def irr_set(apics, vector):
    return [a.apic_id for a in apics if a.irr >> vector & 1]


def test_physical_destination_x2apic():
    _, _, apics, delivered = machine(ids=(0, 1, 2, 3))
    apics[0].wrmsr(ICR, (2 << 32) | 0x40)       # x2APIC: destination in bits 63:32
    assert irr_set(apics, 0x40) == [2]
    assert delivered == [2]


def test_physical_broadcast_x2apic():
    _, _, apics, delivered = machine(ids=(0, 1, 2, 3))
    apics[1].wrmsr(ICR, (0xFFFFFFFF << 32) | 0x41)
    assert irr_set(apics, 0x41) == [0, 1, 2, 3]
    assert delivered == [0, 2, 3]               # not the sender itself


@pytest.mark.parametrize("shorthand, expected", [
    (SH_SELF, [1]),
    (SH_ALL_INC, [0, 1, 2, 3]),
    (SH_ALL_BUT, [0, 2, 3]),
])
def test_shorthands(shorthand, expected):
    _, _, apics, delivered = machine(ids=(0, 1, 2, 3))
    apics[1].wrmsr(ICR, (3 << 32) | shorthand | 0x42)   # destination ignored
    assert irr_set(apics, 0x42) == expected
    assert delivered == [i for i in expected if i != 1]


def test_x2apic_ldr_is_derived_from_id():
    # SDM: logical x2APIC ID = (x2APIC ID[19:4] << 16) | (1 << x2APIC ID[3:0])
    _, _, apics, _ = machine(ids=(0x25, 0x11))
    assert apics[0].rdmsr(LDR) == 0x00020020
    assert apics[1].rdmsr(LDR) == 0x00010002


def test_logical_cluster_destination_x2apic():
    _, _, apics, _ = machine(ids=(0, 1, 2, 17, 18))
    apics[0].wrmsr(ICR, (((0 << 16) | 0b0110) << 32) | LOGICAL | 0x43)   # cluster 0, IDs 1, 2
    assert irr_set(apics, 0x43) == [1, 2]
    apics[0].wrmsr(ICR, (((1 << 16) | 0b0100) << 32) | LOGICAL | 0x44)   # cluster 1, ID 18
    assert irr_set(apics, 0x44) == [18]


def xapic_send(apic, dest8, low):
    apic.mmio_write(0x310, 4, dest8 << 24)      # ICR high: destination in bits 31:24
    apic.mmio_write(0x300, 4, low)              # writing ICR low sends


def test_xapic_physical_and_broadcast():
    _, _, apics, _ = machine(ids=(0, 1, 2), x2apic=False)
    xapic_send(apics[0], 2, 0x45)
    assert irr_set(apics, 0x45) == [2]
    xapic_send(apics[0], 0xFF, 0x46)            # FFH: broadcast
    assert irr_set(apics, 0x46) == [0, 1, 2]


def test_xapic_flat_logical():
    _, _, apics, _ = machine(ids=(0, 1, 2, 3), x2apic=False)
    for a, logical_id in zip(apics, (0x01, 0x02, 0x04, 0x08)):
        a.mmio_write(0xD0, 4, logical_id << 24)  # LDR bits 31:24
    assert apics[0].mmio_read(0xE0, 4) == 0xFFFFFFFF   # DFR reset: flat model
    xapic_send(apics[0], 0x06, LOGICAL | 0x47)
    assert irr_set(apics, 0x47) == [1, 2]


def test_xapic_cluster_logical():
    _, _, apics, _ = machine(ids=(0, 1, 2, 3), x2apic=False)
    ldrs = (0x01, 0x11, 0x12, 0x21)             # cluster in bits 7:4, member bits 3:0
    for a, logical_id in zip(apics, ldrs):
        a.mmio_write(0xE0, 4, 0x0FFFFFFF)       # DFR model 0000b: cluster
        a.mmio_write(0xD0, 4, logical_id << 24)
    xapic_send(apics[0], 0x13, LOGICAL | 0x48)  # cluster 1, members 0 and 1
    assert irr_set(apics, 0x48) == [1, 2]


def test_lowest_priority_goes_to_lowest_id_of_the_set():
    _, _, apics, _ = machine(ids=(0, 1, 2, 3))
    apics[0].wrmsr(ICR, ((0b1100) << 32) | LOGICAL | DM_LOWEST | 0x49)   # IDs 2, 3
    assert irr_set(apics, 0x49) == [2]


def test_nmi_init_sipi_pending():
    _, _, (a, b), delivered = machine(ids=(0, 1))
    a.wrmsr(ICR, (1 << 32) | DM_NMI)
    a.wrmsr(ICR, (1 << 32) | ASSERT | DM_INIT)
    a.wrmsr(ICR, (1 << 32) | ASSERT | DM_STARTUP | 0x08)
    assert delivered == [1, 1, 1]
    assert b.irr == 0                           # NMI/INIT/SIPI bypass IRR
    assert b.take_nmi() is True and b.take_nmi() is False
    assert b.take_init() is True and b.take_init() is False
    assert b.take_sipi() == 0x08 and b.take_sipi() is None


def test_init_level_deassert_is_ignored():
    _, _, (a, b), delivered = machine(ids=(0, 1))
    a.wrmsr(ICR, (1 << 32) | LEVEL_TRIG | DM_INIT)    # level 0, trigger level
    assert b.take_init() is False
    assert delivered == []


def test_self_shorthand_with_nmi_is_invalid():
    _, _, (a,), _ = machine()
    a.wrmsr(ICR, SH_SELF | DM_NMI)
    assert a.take_nmi() is False


def test_level_triggered_ipi_is_issued_edge():
    _, _, (a, b), _ = machine(ids=(0, 1))
    a.wrmsr(ICR, (1 << 32) | ASSERT | LEVEL_TRIG | 0x60)
    assert b.rdmsr(IRR0 + 3) == 1
    assert b.rdmsr(TMR0 + 3) == 0


def test_send_illegal_vector():
    _, _, (a, b), _ = machine(ids=(0, 1))
    a.wrmsr(ICR, (1 << 32) | 0x05)
    assert b.irr == 0
    assert latch_esr(a) == 1 << 5               # ESR bit 5: send illegal vector
    assert latch_esr(b) == 0


def test_hardware_disabled_apic_receives_nothing():
    _, _, (a, b), _ = machine(ids=(0, 1))
    b.wrmsr(APIC_BASE_MSR, BASE)                # EN=0
    a.wrmsr(ICR, (1 << 32) | DM_NMI)
    a.wrmsr(ICR, (1 << 32) | 0x50)
    assert b.take_nmi() is False and b.irr == 0


def test_icr_readback_and_reserved_bits_x2apic():
    _, _, (a, b), _ = machine(ids=(0, 1))
    a.wrmsr(ICR, (1 << 32) | 0x51)
    assert a.rdmsr(ICR) == (1 << 32) | 0x51
    a.wrmsr(ICR, (1 << 32) | (1 << 12) | 0x52)  # bit 12 (busy) ignored on Intel
    assert a.rdmsr(ICR) == (1 << 32) | 0x52
    for bit in (13, 16, 17, 20, 31):
        with pytest.raises(GeneralProtection):
            a.wrmsr(ICR, (1 << 32) | (1 << bit) | 0x53)


def test_self_ipi_register():
    _, a = one()
    a.wrmsr(SELF_IPI, 0x44)
    assert a.rdmsr(IRR0 + 2) == 1 << 4
    a.wrmsr(SELF_IPI, 0x03)
    assert latch_esr(a) == 1 << 5
    with pytest.raises(GeneralProtection):
        a.wrmsr(SELF_IPI, 0x144)                # bits 31:8 reserved


# --------------------------------------------------------------------------
# Timer
# --------------------------------------------------------------------------

# SDM figure "Divide Configuration Register": bits 3, 1, 0.
DIVIDERS = {0b0000: 2, 0b0001: 4, 0b0010: 8, 0b0011: 16,
            0b1000: 32, 0b1001: 64, 0b1010: 128, 0b1011: 1}


@pytest.mark.parametrize("tdcr, div", sorted(DIVIDERS.items()))
def test_one_shot_counts_down_at_divided_rate(tdcr, div):
    clock, a = one()
    a.wrmsr(TDCR, tdcr)
    a.wrmsr(LVTT, 0xEC)                         # one-shot, unmasked, vector ECH
    a.wrmsr(TMICT, 100)
    assert a.rdmsr(TMCCT) == 100
    assert a.next_event_ns() == 100 * div
    clock.t = 30 * div
    assert a.rdmsr(TMCCT) == 70
    clock.t = 100 * div - 1
    assert a.rdmsr(TMCCT) == 1
    assert not irr_has(a, 0xEC)
    clock.t = 100 * div
    assert a.update(clock.t) is True
    assert irr_has(a, 0xEC)
    assert a.rdmsr(TMCCT) == 0                  # one-shot: stays at zero
    assert a.next_event_ns() is None


def test_periodic_reloads_without_drift():
    clock, a = one()
    a.wrmsr(TDCR, 0b1011)                       # divide by 1
    a.wrmsr(LVTT, PERIODIC | 0xEC)
    a.wrmsr(TMICT, 10)
    clock.t = 13
    assert a.rdmsr(TMCCT) == 7                  # reloaded to 10 at t=10, 3 ticks since
    assert irr_has(a, 0xEC)
    assert a.next_event_ns() == 20
    assert a.acknowledge() == 0xEC
    a.wrmsr(EOI, 0)
    a.update(25)                                # late: the schedule stays 10, 20, 30
    assert a.next_event_ns() == 30
    assert irr_has(a, 0xEC)
    a.update(57)                                # 30, 40, 50 missed: next is 60
    assert a.next_event_ns() == 60
    clock.t = 57
    assert a.rdmsr(TMCCT) == 3


def test_masked_timer_counts_but_raises_nothing():
    clock, a = one()
    a.wrmsr(TDCR, 0b1011)
    a.wrmsr(LVTT, MASKED | 0xEC)
    a.wrmsr(TMICT, 10)
    assert a.next_event_ns() is None
    clock.t = 4
    assert a.rdmsr(TMCCT) == 6
    clock.t = 50
    a.update(50)
    assert a.irr == 0


def test_tmict_zero_stops_the_timer():
    clock, a = one()
    a.wrmsr(LVTT, 0xEC)
    a.wrmsr(TMICT, 100)
    clock.t = 10
    a.wrmsr(TMICT, 0)
    assert a.rdmsr(TMCCT) == 0
    assert a.next_event_ns() is None
    clock.t = 10_000
    a.update(clock.t)
    assert a.irr == 0


def test_tmict_write_restarts_the_count():
    clock, a = one()
    a.wrmsr(TDCR, 0b1011)
    a.wrmsr(LVTT, 0xEC)
    a.wrmsr(TMICT, 100)
    clock.t = 60
    a.wrmsr(TMICT, 100)
    assert a.rdmsr(TMCCT) == 100
    assert a.next_event_ns() == 160


def test_divider_change_continues_the_count():
    clock, a = one()
    a.wrmsr(LVTT, 0xEC)
    a.wrmsr(TMICT, 100)                         # TDCR reset 0: divide by 2
    clock.t = 20
    assert a.rdmsr(TMCCT) == 90
    a.wrmsr(TDCR, 0b1011)                       # now divide by 1
    clock.t = 30
    assert a.rdmsr(TMCCT) == 80
    assert a.next_event_ns() == 20 + 90


def test_tsc_deadline_arm_fire_disarm():
    clock, a = one()
    a.wrmsr(LVTT, TSC_DEADLINE_MODE | 0xEC)
    a.wrmsr(TSC_DEADLINE, 1000)
    assert a.rdmsr(TSC_DEADLINE) == 1000
    assert a.next_event_ns() == 1000            # TSC == virtual ns (1 GHz)
    clock.t = 999
    a.update(999)
    assert a.irr == 0
    clock.t = 1000                              # TSC equals the deadline: fires
    a.update(1000)
    assert irr_has(a, 0xEC)
    assert a.rdmsr(TSC_DEADLINE) == 0           # disarms itself and clears the MSR
    assert a.next_event_ns() is None


def test_tsc_deadline_in_the_past_fires_at_once_and_zero_disarms():
    clock, a = one()
    clock.t = 5000
    a.wrmsr(LVTT, TSC_DEADLINE_MODE | 0xEC)
    a.wrmsr(TSC_DEADLINE, 4000)
    assert irr_has(a, 0xEC)
    a.acknowledge()
    a.wrmsr(EOI, 0)
    a.wrmsr(TSC_DEADLINE, 9000)
    a.wrmsr(TSC_DEADLINE, 0)
    clock.t = 10_000
    a.update(clock.t)
    assert a.irr == 0


def test_tsc_deadline_mode_ignores_tmict_and_tmcct_reads_zero():
    clock, a = one()
    a.wrmsr(LVTT, TSC_DEADLINE_MODE | 0xEC)
    a.wrmsr(TMICT, 100)
    assert a.rdmsr(TMCCT) == 0
    assert a.next_event_ns() is None


def test_deadline_msr_ignored_outside_tsc_deadline_mode():
    clock, a = one()
    a.wrmsr(LVTT, 0xEC)                         # one-shot mode
    a.wrmsr(TSC_DEADLINE, 1000)
    assert a.rdmsr(TSC_DEADLINE) == 0
    clock.t = 2000
    a.update(2000)
    assert a.irr == 0


def test_changing_timer_mode_disarms():
    clock, a = one()
    a.wrmsr(LVTT, 0xEC)
    a.wrmsr(TMICT, 100)
    a.wrmsr(LVTT, PERIODIC | 0xEC)              # one-shot -> periodic
    assert a.rdmsr(TMCCT) == 0
    assert a.next_event_ns() is None
    a.wrmsr(LVTT, TSC_DEADLINE_MODE | 0xEC)
    a.wrmsr(TSC_DEADLINE, 500)
    a.wrmsr(LVTT, 0xEC)                         # TSC-deadline -> one-shot
    a.wrmsr(LVTT, TSC_DEADLINE_MODE | 0xEC)
    assert a.rdmsr(TSC_DEADLINE) == 0
    clock.t = 10_000
    a.update(clock.t)
    assert a.irr == 0


def test_mask_change_does_not_change_mode_or_disarm():
    clock, a = one()
    a.wrmsr(TDCR, 0b1011)
    a.wrmsr(LVTT, MASKED | 0xEC)
    a.wrmsr(TMICT, 10)
    clock.t = 5
    a.wrmsr(LVTT, 0xEC)                         # unmask only
    assert a.next_event_ns() == 10
    clock.t = 10
    a.update(10)
    assert irr_has(a, 0xEC)


def test_timer_interrupt_with_illegal_vector_is_an_error():
    clock, a = one()
    a.wrmsr(LVTERR, 0xFE)                       # error interrupt unmasked, vector FEH
    a.wrmsr(TDCR, 0b1011)
    a.wrmsr(LVTT, 0x08)
    a.wrmsr(TMICT, 1)
    clock.t = 1
    a.update(1)
    assert not irr_has(a, 0x08)
    assert irr_has(a, 0xFE)
    assert latch_esr(a) == 1 << 6


# --------------------------------------------------------------------------
# x2APIC #GP cases
# --------------------------------------------------------------------------

@pytest.mark.parametrize("msr", [0x800, 0x801, 0x804, 0x809, 0x80C, 0x80E, 0x831, 0x83A,
                                 0x840, 0x8FF])
def test_reserved_x2apic_msrs_gp(msr):
    _, a = one()
    with pytest.raises(GeneralProtection):
        a.rdmsr(msr)
    with pytest.raises(GeneralProtection):
        a.wrmsr(msr, 0)


@pytest.mark.parametrize("msr", [ID, VER, PPR, LDR, ISR0, TMR0 + 7, IRR0 + 3, TMCCT])
def test_write_to_read_only_gp(msr):
    _, a = one()
    with pytest.raises(GeneralProtection):
        a.wrmsr(msr, 0)


@pytest.mark.parametrize("msr", [EOI, SELF_IPI])
def test_read_of_write_only_gp(msr):
    _, a = one()
    with pytest.raises(GeneralProtection):
        a.rdmsr(msr)


@pytest.mark.parametrize("msr, value", [
    (EOI, 1),                 # WRMSR of a non-zero value to EOI
    (ESR, 1),                 # WRMSR of a non-zero value to ESR
    (TPR, 0x100),             # TPR bits 31:8 reserved
    (TPR, 1 << 32),           # upper 32 bits of every MSR but ICR reserved
    (SVR, 1 << 9),            # focus processor checking: reserved (P4 and later)
    (SVR, 1 << 10),
    (TDCR, 1 << 2),           # TDCR bit 2 reserved
    (TDCR, 1 << 4),
    (LVTT, 1 << 19),          # LVT timer bits 31:19 reserved
    (LVTT, 1 << 8),           # the timer LVT has no delivery mode field
    (LVTT, 3 << 17),          # timer mode 11b reserved
    (LVTERR, 1 << 8),
    (LINT0, 1 << 17),
    (TMICT, 1 << 32),
])
def test_reserved_bits_gp(msr, value):
    _, a = one()
    with pytest.raises(GeneralProtection):
        a.wrmsr(msr, value)


def test_x2apic_msrs_gp_when_not_in_x2apic_mode():
    _, _, (a,), _ = machine(x2apic=False)
    with pytest.raises(GeneralProtection):
        a.rdmsr(ID)
    with pytest.raises(GeneralProtection):
        a.wrmsr(EOI, 0)


def test_x2apic_id_and_version():
    _, _, (a,), _ = machine(ids=(0x123,))
    assert a.rdmsr(ID) == 0x123                 # 32-bit x2APIC ID
    version = a.rdmsr(VER)
    assert 0x10 <= version & 0xFF <= 0x15       # integrated APIC
    assert (version >> 16) & 0xFF == 6          # Max LVT Entry = 7 entries - 1


# --------------------------------------------------------------------------
# IA32_APIC_BASE transitions
# --------------------------------------------------------------------------

def test_apic_base_reset_values():
    _, _, (bsp, ap), _ = machine(ids=(0, 1), x2apic=False, enable=False)
    assert bsp.rdmsr(APIC_BASE_MSR) == 0xFEE00900    # base, EN, BSP
    assert ap.rdmsr(APIC_BASE_MSR) == 0xFEE00800
    assert bsp.xapic_enabled and not bsp.x2apic_enabled
    assert bsp.mmio_base == 0xFEE00000
    assert bsp.mmio_read(0xF0, 4) == 0xFF       # SVR after reset: 000000FFH


def test_legal_and_illegal_transitions():
    _, _, (a,), _ = machine(x2apic=False, enable=False)
    with pytest.raises(GeneralProtection):      # EN=0, EXTD=1: invalid state
        a.wrmsr(APIC_BASE_MSR, BASE | EXTD)
    a.wrmsr(APIC_BASE_MSR, BASE | EN | EXTD)    # xAPIC -> x2APIC
    assert a.x2apic_enabled
    with pytest.raises(GeneralProtection):      # x2APIC -> xAPIC directly
        a.wrmsr(APIC_BASE_MSR, BASE | EN)
    a.wrmsr(APIC_BASE_MSR, BASE)                # x2APIC -> disabled
    assert not a.x2apic_enabled and not a.xapic_enabled
    with pytest.raises(GeneralProtection):      # disabled -> x2APIC directly
        a.wrmsr(APIC_BASE_MSR, BASE | EN | EXTD)
    a.wrmsr(APIC_BASE_MSR, BASE | EN)           # disabled -> xAPIC
    assert a.xapic_enabled


@pytest.mark.parametrize("bad_bit", [0, 7, 9, 46, 63])
def test_apic_base_reserved_bits(bad_bit):
    _, _, (a,), _ = machine(x2apic=False, enable=False)
    with pytest.raises(GeneralProtection):
        a.wrmsr(APIC_BASE_MSR, BASE | EN | (1 << bad_bit))


def test_apic_base_moves_the_mmio_page_and_bsp_is_read_only():
    _, _, (a,), _ = machine(x2apic=False, enable=False)
    a.wrmsr(APIC_BASE_MSR, 0xFED00000 | EN)     # BSP bit written 0: ignored
    assert a.mmio_base == 0xFED00000
    assert a.rdmsr(APIC_BASE_MSR) == 0xFED00000 | EN | BSP


def test_disable_loses_state_but_keeps_id():
    _, _, (a,), _ = machine(ids=(7,))
    a.wrmsr(TPR, 0x30)
    a.accept(0x80)
    a.wrmsr(APIC_BASE_MSR, BASE)
    a.wrmsr(APIC_BASE_MSR, BASE | EN)
    assert a.mmio_read(0x80, 4) == 0            # TPR
    assert a.mmio_read(0x200 + 0x40, 4) == 0    # IRR word 4
    assert a.mmio_read(0xF0, 4) == 0xFF
    assert a.mmio_read(0x20, 4) == 7 << 24      # xAPIC ID in bits 31:24


def test_init_reset_keeps_mode_and_id():
    _, _, (a,), _ = machine(ids=(3,))
    a.wrmsr(TPR, 0x30)
    a.wrmsr(LVTT, 0xEC)
    a.init_reset()
    assert a.x2apic_enabled
    assert a.rdmsr(ID) == 3
    assert a.rdmsr(TPR) == 0
    assert a.rdmsr(LVTT) == MASKED
    assert a.rdmsr(SVR) == 0xFF


# --------------------------------------------------------------------------
# xAPIC MMIO
# --------------------------------------------------------------------------

def test_xapic_registers_through_mmio():
    _, _, (a,), _ = machine(ids=(5,), x2apic=False)
    assert a.mmio_read(0x20, 4) == 5 << 24
    a.mmio_write(0x80, 4, 0x25)
    assert a.mmio_read(0x80, 4) == 0x25
    assert a.mmio_read(0xA0, 4) == 0x25         # PPR
    a.mmio_write(0xD0, 4, 0x03FFFFFF)           # LDR: only bits 31:24
    assert a.mmio_read(0xD0, 4) == 0x03000000
    a.mmio_write(0xE0, 4, 0)                    # DFR bits 27:0 read as ones
    assert a.mmio_read(0xE0, 4) == 0x0FFFFFFF
    a.mmio_write(0x20, 4, 0)                    # ID read-only here: ignored
    assert a.mmio_read(0x20, 4) == 5 << 24


def test_xapic_partial_reads():
    _, _, (a,), _ = machine(ids=(0x9A,), x2apic=False)
    assert a.mmio_read(0x23, 1) == 0x9A         # high byte of the ID register
    assert a.mmio_read(0x24, 4) == 0            # rest of the 16-byte slot


def test_xapic_eoi_and_irr_isr():
    _, _, (a,), _ = machine(x2apic=False)
    a.accept(0x61)
    assert a.mmio_read(0x230, 4) == 1 << 1      # IRR word 3 (200H + 3*10H)
    assert a.acknowledge() == 0x61
    assert a.mmio_read(0x130, 4) == 1 << 1      # ISR word 3
    a.mmio_write(0xB0, 4, 0)
    assert a.mmio_read(0x130, 4) == 0


def test_xapic_illegal_register_address():
    _, _, (a,), _ = machine(x2apic=False)
    assert a.mmio_read(0x10, 4) == 0            # reserved slot
    a.mmio_write(0x280, 4, 0)
    assert a.mmio_read(0x280, 4) == 1 << 7      # ESR bit 7: illegal register address
    a.mmio_write(0x3F0, 4, 0x40)                # SELF IPI does not exist in xAPIC mode
    assert a.irr == 0


def test_esr_latch_and_back_to_back_clear():
    _, _, (a,), _ = machine(x2apic=False)
    a.accept(3)
    assert a.mmio_read(0x280, 4) == 0           # not latched yet
    a.mmio_write(0x280, 4, 0)
    assert a.mmio_read(0x280, 4) == 1 << 6
    a.mmio_write(0x280, 4, 0)                   # back-to-back writes clear
    assert a.mmio_read(0x280, 4) == 0


def test_error_interrupt_through_lvt_error():
    _, _, (a,), _ = machine(x2apic=False)
    a.mmio_write(0x370, 4, 0xFE)
    a.accept(2)
    assert a.pending_vector() == 0xFE


def test_xapic_icr_delivery_status_idle_and_high_half():
    _, _, (a, b), _ = machine(ids=(0, 1), x2apic=False)
    xapic_send(a, 1, 0x50)
    assert a.mmio_read(0x300, 4) & (1 << 12) == 0
    assert a.mmio_read(0x310, 4) == 1 << 24
    assert b.mmio_read(0x220, 4) == 1 << 16     # vector 50H: IRR word 2 (220H), bit 16


def test_software_disable_masks_every_lvt():
    _, _, (a,), _ = machine(x2apic=False)
    for off in (0x2F0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370):
        a.mmio_write(off, 4, 0x40)
    a.mmio_write(0xF0, 4, 0xFF)                 # clear bit 8: software disable
    for off in (0x2F0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370):
        assert a.mmio_read(off, 4) & MASKED
    a.mmio_write(0x320, 4, 0x40)                # unmask attempt is ignored
    assert a.mmio_read(0x320, 4) == MASKED | 0x40


def test_xapic_timer_through_mmio():
    clock, _, (a,), _ = machine(x2apic=False)
    a.mmio_write(0x3E0, 4, 0b1011)
    a.mmio_write(0x320, 4, 0xEC)
    a.mmio_write(0x380, 4, 50)
    clock.t = 20
    assert a.mmio_read(0x390, 4) == 30


def test_misaligned_or_narrow_writes_ignored():
    _, _, (a,), _ = machine(x2apic=False)
    a.mmio_write(0x81, 1, 0x30)
    a.mmio_write(0x84, 4, 0x30)
    assert a.mmio_read(0x80, 4) == 0


def test_mmio_off_in_x2apic_mode():
    _, a = one()
    assert a.mmio_read(0x20, 4) == 0xFFFFFFFF
    a.mmio_write(0x80, 4, 0x40)
    assert a.rdmsr(TPR) == 0


def test_bad_mmio_arguments():
    _, a = one()
    with pytest.raises(ValueError):
        a.mmio_read(0xFFE, 4)
    with pytest.raises(ValueError):
        a.mmio_read(0, 3)
