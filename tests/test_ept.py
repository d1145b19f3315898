"""EPT walk: translations, violations (SDM table "Exit Qualification for EPT
Violations"), misconfigurations (SDM "EPT Misconfigurations") and the
accessed/dirty flags (SDM "Accessed and Dirty Flags for EPT").

Expected values are written here from the SDM's bit layouts as literals:
qualification bits 0/1/2 = read/write/fetch, bits 5:3 = AND of the R/W/X bits
of the entries walked, bit 7 = guest linear address valid, bit 8 = access to
the translation (not to a guest paging-structure entry); entry bit 7 = page
size, bits 5:3 = memory type, bit 8 = accessed, bit 9 = dirty.
"""

import pytest
from hypothesis import given, settings, strategies as st

from devirt_emu.platform.memory import PhysMem
from devirt_emu.vmx.ept import (
    EptAccess, EptBuildError, EptBuilder, EptCaps, EptMisconfig, EptTranslation,
    EptViolation, LinearRights, PAGE_1G, PAGE_2M, PAGE_4K, ept_walk)

R, W, X = 1, 2, 4
READ, WRITE, FETCH = EptAccess.READ, EptAccess.WRITE, EptAccess.FETCH
WB_PWL4 = 0x1E          # EPTP bits 2:0 = 6 (WB), bits 5:3 = 3 (4 levels)
AD_ENABLE = 0x40        # EPTP bit 6

# Hand-built tables (independent of EptBuilder): PML4 at 0x10000, PDPT at
# 0x11000, PD at 0x12000, PT at 0x13000; each non-leaf entry RWX.
PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000


def mem_with_tables(pte=None, pde=None, pdpte=None, pml4e=None):
    """GPA 0x0040_3000 (PML4 idx 0, PDPT idx 0, PD idx 2, PT idx 3)."""
    m = PhysMem(16 << 20)
    m.write_u64(PML4 + 0 * 8, PDPT | 7 if pml4e is None else pml4e)
    m.write_u64(PDPT + 0 * 8, PD | 7 if pdpte is None else pdpte)
    m.write_u64(PD + 2 * 8, PT | 7 if pde is None else pde)
    m.write_u64(PT + 3 * 8, (0x00ABC000 | 0x30 | 7) if pte is None else pte)  # MT=6 WB
    return m


GPA = 0x0040_3123


def walk(m, access, eptp=PML4 | WB_PWL4, gpa=GPA, **kw):
    return ept_walk(m.read, m.write, eptp, gpa, access, **kw)


# --- translations ---------------------------------------------------------------

def test_4k_translation_hand_built():
    m = mem_with_tables()
    r = walk(m, READ)
    assert isinstance(r, EptTranslation)
    assert r.hpa == 0x00ABC123
    assert r.page_size == 4096
    assert r.rights == 7 and r.memory_type == 6 and not r.ignore_pat
    assert [s.level for s in r.path] == [4, 3, 2, 1]
    assert [s.entry_pa for s in r.path] == [PML4, PDPT, PD + 16, PT + 24]


def test_2m_translation_hand_built():
    # PDE with bit 7 set maps 2 MiB: HPA bits 51:21 from the PDE, 20:0 from the GPA.
    m = mem_with_tables(pde=0x0060_0000 | 0x80 | 0x30 | 7)
    r = walk(m, WRITE)
    assert isinstance(r, EptTranslation)
    assert r.page_size == 2 << 20
    assert r.hpa == 0x0060_0000 + (GPA & 0x1FFFFF)
    assert len(r.path) == 3


def test_1g_translation_hand_built():
    m = mem_with_tables(pdpte=0x4000_0000 | 0x80 | 0x30 | 7)
    r = walk(m, FETCH, gpa=0x2345_6789)
    assert isinstance(r, EptTranslation)
    assert r.page_size == 1 << 30
    assert r.hpa == 0x4000_0000 + 0x2345_6789
    assert len(r.path) == 2


@pytest.mark.parametrize("page_size", [PAGE_4K, PAGE_2M, PAGE_1G])
def test_builder_maps_each_page_size(page_size):
    m = PhysMem(8 << 20)
    b = EptBuilder(m, 0x10000, 0x10000)
    gpa = 3 * page_size
    hpa = 5 * page_size
    b.map(gpa, hpa, page_size, page_size=page_size, rights=R | W)
    r = walk(m, READ, eptp=b.eptp, gpa=gpa + 0x7F8)
    assert isinstance(r, EptTranslation)
    assert (r.hpa, r.page_size, r.rights, r.leaf_rights) == (hpa + 0x7F8, page_size, 3, 3)
    assert b.eptp & 0xFFF == 0x1E


def test_memory_type_and_ignore_pat_reported():
    m = mem_with_tables(pte=0x00ABC000 | 0x40 | (1 << 3) | 7)   # WC, IPAT
    r = walk(m, READ)
    assert r.memory_type == 1 and r.ignore_pat


# --- permissions and the violation qualification ----------------------------------

RIGHTS = [0b001, 0b011, 0b101, 0b111, 0b100]   # R, RW, RX, RWX, X (execute-only)


EXEC_ONLY = EptCaps(execute_only=True)


def test_modelled_cpu_caps():
    # the default model (Xeon Scalable 1st gen): execute-only translations (which every
    # EPT-capable Intel part has, issue 14), 2M/1G pages and A/D flags.
    caps = EptCaps.modelled()
    assert (caps.execute_only, caps.pages_2m, caps.pages_1g, caps.ad_flags, caps.advanced_exit_info) == \
        (True, True, True, True, False)


@pytest.mark.parametrize("rights", RIGHTS)
@pytest.mark.parametrize("access,bit", [(READ, 1), (WRITE, 2), (FETCH, 4)])
def test_leaf_permissions(rights, access, bit):
    m = mem_with_tables(pte=0x00ABC000 | 0x30 | rights)
    r = walk(m, access, gla=0x7000_0123, gla_is_translation=True, caps=EXEC_ONLY)
    if rights & bit:
        assert isinstance(r, EptTranslation)
    else:
        assert isinstance(r, EptViolation)
        # bits 2:0 access, 5:3 rights, bit 7 GLA valid, bit 8 translation
        assert r.qualification == bit | (rights << 3) | 0x80 | 0x100
        assert r.gpa == GPA and r.gla == 0x7000_0123


def test_rights_are_anded_across_levels():
    # PDPTE read-only, leaf RWX: a write violates; bits 5:3 show the AND (R only).
    m = mem_with_tables(pdpte=PD | 1)
    r = walk(m, WRITE)
    assert isinstance(r, EptViolation)
    assert r.qualification == 0b000_010 | (0b001 << 3)
    # and the read is allowed with effective rights R even though the leaf is RWX
    r = walk(m, READ)
    assert isinstance(r, EptTranslation) and r.rights == 1 and r.leaf_rights == 7


@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_not_present_at_each_level(level):
    kw = {4: "pml4e", 3: "pdpte", 2: "pde", 1: "pte"}[level]
    # A not-present entry (bits 2:0 = 0) ignores its other bits: garbage there
    # is not a misconfiguration.
    m = mem_with_tables(**{kw: 0xFFF0_0000_0000_FFF8})
    r = walk(m, FETCH)
    assert isinstance(r, EptViolation)
    assert r.qualification == 0b100          # fetch; AND of rights is 0; no GLA
    assert len(r.path) == 5 - level
    assert r.gpa == GPA


def test_rmw_reports_read_and_write():
    m = mem_with_tables(pte=0x00ABC000 | 0x30 | R)
    r = walk(m, READ | WRITE)
    assert isinstance(r, EptViolation)
    assert r.qualification == 0b011 | (0b001 << 3)


def test_paging_structure_access_without_ad_is_a_read():
    # Guest paging-structure entry on a read-only page, EPT A/D off: a read.
    m = mem_with_tables(pte=0x00ABC000 | 0x30 | R)
    r = walk(m, READ, gla=0xFFFF_8000_0000_1000, gla_is_translation=False)
    assert isinstance(r, EptTranslation)


def test_paging_structure_access_with_ad_is_a_write():
    # With EPTP bit 6 the same access needs write permission, and the
    # violation reports bits 0 and 1, GLA valid (bit 7), bit 8 clear.
    m = mem_with_tables(pte=0x00ABC000 | 0x30 | R)
    r = walk(m, READ, eptp=PML4 | WB_PWL4 | AD_ENABLE,
             gla=0xFFFF_8000_0000_1000, gla_is_translation=False)
    assert isinstance(r, EptViolation)
    assert r.qualification == 0b011 | (0b001 << 3) | 0x80


def test_gla_invalid_leaves_bits_7_and_8_clear():
    m = mem_with_tables(pte=0x00ABC000 | 0x30 | R)
    r = walk(m, WRITE)
    assert r.qualification & 0x180 == 0 and r.gla is None


def test_advanced_exit_information_bits_9_to_11():
    caps = EptCaps(advanced_exit_info=True)
    m = mem_with_tables(pte=0x00ABC000 | 0x30 | R)
    r = walk(m, WRITE, gla=0x1000, gla_is_translation=True,
             guest_rights=LinearRights(user=True, writable=True, executable=False), caps=caps)
    assert r.qualification == 0b010 | (0b001 << 3) | 0x80 | 0x100 | 0x200 | 0x400
    # Paging-structure access: bits 9-11 are not reported.
    r = walk(m, WRITE, gla=0x1000, gla_is_translation=False, caps=caps)
    assert r.qualification == 0b010 | (0b001 << 3) | 0x80


# --- misconfigurations ------------------------------------------------------------

@pytest.mark.parametrize("rwx", [0b010, 0b110])
@pytest.mark.parametrize("level", [4, 3, 2, 1])
def test_write_without_read_is_misconfig_at_any_level(rwx, level):
    kw = {4: "pml4e", 3: "pdpte", 2: "pde", 1: "pte"}[level]
    base = {4: PDPT, 3: PD, 2: PT, 1: 0x00ABC000 | 0x30}[level]
    m = mem_with_tables(**{kw: base | rwx})
    r = walk(m, READ)
    assert isinstance(r, EptMisconfig)
    assert r.gpa == GPA and r.path[-1].level == level


def test_execute_only_needs_the_capability():
    m = mem_with_tables(pte=0x00ABC000 | 0x30 | X)
    assert isinstance(walk(m, FETCH, caps=EXEC_ONLY), EptTranslation)
    # a CPU without IA32_VMX_EPT_VPID_CAP bit 0: a misconfiguration
    assert isinstance(walk(m, FETCH, caps=EptCaps(execute_only=False)), EptMisconfig)


@pytest.mark.parametrize("mt", [2, 3, 7])
def test_reserved_memory_type_in_leaf(mt):
    m = mem_with_tables(pte=0x00ABC000 | (mt << 3) | 7)
    assert isinstance(walk(m, READ), EptMisconfig)
    m = mem_with_tables(pde=0x0060_0000 | 0x80 | (mt << 3) | 7)
    assert isinstance(walk(m, READ), EptMisconfig)


@pytest.mark.parametrize("mt", [0, 1, 4, 5, 6])
def test_valid_memory_types_in_leaf(mt):
    m = mem_with_tables(pte=0x00ABC000 | (mt << 3) | 7)
    assert isinstance(walk(m, READ), EptTranslation)


@pytest.mark.parametrize("kw,value", [
    ("pml4e", PDPT | 7 | (1 << 3)),            # PML4E bits 7:3 reserved
    ("pml4e", PDPT | 7 | (1 << 7)),
    ("pdpte", PD | 7 | (1 << 5)),              # non-leaf PDPTE bits 6:3 reserved
    ("pde", PT | 7 | (1 << 6)),                # non-leaf PDE bits 6:3 reserved
    ("pde", 0x0060_0000 | 0x80 | 0x30 | 7 | (1 << 12)),     # 2 MiB leaf bits 20:12
    ("pdpte", 0x4000_0000 | 0x80 | 0x30 | 7 | (1 << 29)),   # 1 GiB leaf bits 29:12
    ("pte", 0x00ABC000 | 0x30 | 7 | (1 << 46)),  # bits 51:M with M = 46
    ("pte", 0x00ABC000 | 0x30 | 7 | (1 << 51)),
])
def test_reserved_bits(kw, value):
    r = walk(mem_with_tables(**{kw: value}), READ)
    assert isinstance(r, EptMisconfig), r


def test_ignored_bits_are_ignored():
    # PTE bit 7, bit 10 (no mode-based execute), bit 11, bits 62:52, 63: ignored.
    m = mem_with_tables(pte=0x00ABC000 | 0x30 | 7 | (1 << 7) | (1 << 10) | (1 << 11)
                        | (0x7FF << 52) | (1 << 63))
    r = walk(m, READ)
    assert isinstance(r, EptTranslation) and r.hpa == 0x00ABC123


def test_maxphyaddr_moves_the_reserved_boundary():
    m = mem_with_tables(pte=0x00ABC000 | 0x30 | 7 | (1 << 40))
    assert isinstance(walk(m, READ, caps=EptCaps(maxphyaddr=46)), EptTranslation)
    assert isinstance(walk(m, READ, caps=EptCaps(maxphyaddr=39)), EptMisconfig)


def test_large_pages_need_the_capability():
    m = mem_with_tables(pde=0x0060_0000 | 0x80 | 0x30 | 7)
    assert isinstance(walk(m, READ, caps=EptCaps(pages_2m=False)), EptMisconfig)
    m = mem_with_tables(pdpte=0x4000_0000 | 0x80 | 0x30 | 7)
    assert isinstance(walk(m, READ, caps=EptCaps(pages_1g=False)), EptMisconfig)


def test_misconfiguration_beats_permission_violation():
    # PML4E is read-only (a write would violate) but the PTE has memory type 2.
    m = mem_with_tables(pml4e=PDPT | 1, pte=0x00ABC000 | (2 << 3) | 7)
    assert isinstance(walk(m, WRITE), EptMisconfig)


# --- accessed and dirty flags ------------------------------------------------------

def entries(m):
    return [m.read_u64(a) for a in (PML4, PDPT, PD + 16, PT + 24)]


def test_no_ad_updates_without_eptp_bit_6():
    m = mem_with_tables()
    before = entries(m)
    walk(m, WRITE)
    assert entries(m) == before


def test_read_sets_accessed_on_every_entry_not_dirty():
    m = mem_with_tables()
    before = entries(m)
    assert isinstance(walk(m, READ, eptp=PML4 | WB_PWL4 | AD_ENABLE), EptTranslation)
    assert entries(m) == [e | 0x100 for e in before]


def test_write_sets_dirty_on_the_leaf_only():
    m = mem_with_tables()
    before = entries(m)
    walk(m, WRITE, eptp=PML4 | WB_PWL4 | AD_ENABLE)
    after = entries(m)
    assert after[:3] == [e | 0x100 for e in before[:3]]
    assert after[3] == before[3] | 0x300


def test_dirty_on_2m_leaf():
    m = mem_with_tables(pde=0x0060_0000 | 0x80 | 0x30 | 7)
    walk(m, WRITE, eptp=PML4 | WB_PWL4 | AD_ENABLE)
    assert m.read_u64(PD + 16) & 0x300 == 0x300


def test_guest_paging_structure_access_sets_dirty_with_ad():
    m = mem_with_tables()
    walk(m, READ, eptp=PML4 | WB_PWL4 | AD_ENABLE, gla=0x1234, gla_is_translation=False)
    assert m.read_u64(PT + 24) & 0x300 == 0x300


def test_violation_and_misconfig_leave_flags_alone():
    m = mem_with_tables(pte=0x00ABC000 | 0x30 | R)
    before = entries(m)
    assert isinstance(walk(m, WRITE, eptp=PML4 | WB_PWL4 | AD_ENABLE), EptViolation)
    assert entries(m) == before


def test_ad_eptp_without_capability_is_rejected():
    m = mem_with_tables()
    with pytest.raises(ValueError, match="accessed/dirty"):
        walk(m, READ, eptp=PML4 | WB_PWL4 | AD_ENABLE, caps=EptCaps(ad_flags=False))


# --- bad input ------------------------------------------------------------------

@pytest.mark.parametrize("kw", [
    dict(eptp=PML4 | 0x26),                 # page-walk length 5
    dict(gpa=1 << 48),
    dict(gpa=-1),
    dict(gla_is_translation=True),          # without a gla
])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        walk(mem_with_tables(), READ, **kw)


@pytest.mark.parametrize("access", [0, 8, FETCH | READ, "read", True])
def test_bad_access(access):
    with pytest.raises(ValueError, match="access"):
        walk(mem_with_tables(), access)


# --- builder ----------------------------------------------------------------------

def test_builder_rejects_clashes_and_bad_alignment():
    m = PhysMem(8 << 20)
    b = EptBuilder(m, 0x10000, 0x10000)
    b.map(0x0, 0x0, PAGE_2M, page_size=PAGE_2M)
    with pytest.raises(EptBuildError, match="larger page"):
        b.map(0x1000, 0x1000, PAGE_4K)
    b.map(PAGE_2M, PAGE_2M, PAGE_4K)
    with pytest.raises(EptBuildError, match="smaller pages"):
        b.map(PAGE_2M, PAGE_2M, PAGE_2M, page_size=PAGE_2M)
    with pytest.raises(EptBuildError, match="multiples"):
        b.map(0x1800, 0x0, PAGE_4K)
    with pytest.raises(EptBuildError):
        EptBuilder(m, 0x10001, 0x1000)


def test_builder_pool_exhaustion():
    m = PhysMem(8 << 20)
    b = EptBuilder(m, 0x10000, 0x2000)    # room for the PML4 and one more table
    with pytest.raises(EptBuildError, match="exhausted"):
        b.map(0x0, 0x0, PAGE_4K)


def test_builder_unmap():
    m = PhysMem(8 << 20)
    b = EptBuilder(m, 0x10000, 0x10000)
    b.map(0x0, 0x100000, 4 * PAGE_4K)
    b.unmap(PAGE_4K, 2 * PAGE_4K)
    assert isinstance(walk(m, READ, eptp=b.eptp, gpa=0x0), EptTranslation)
    assert isinstance(walk(m, READ, eptp=b.eptp, gpa=PAGE_4K), EptViolation)
    assert isinstance(walk(m, READ, eptp=b.eptp, gpa=2 * PAGE_4K + 5), EptViolation)
    assert isinstance(walk(m, READ, eptp=b.eptp, gpa=3 * PAGE_4K), EptTranslation)
    b.map(PAGE_2M, PAGE_2M, PAGE_2M, page_size=PAGE_2M)
    with pytest.raises(EptBuildError, match="partly"):
        b.unmap(PAGE_2M, PAGE_4K)


def test_builder_entry_address_lets_tests_corrupt_entries():
    m = PhysMem(8 << 20)
    b = EptBuilder(m, 0x10000, 0x10000)
    b.map(0x5000, 0x9000, PAGE_4K)
    pte = b.entry_address(0x5000, 1)
    m.write_u64(pte, m.read_u64(pte) | (3 << 3))   # memory type 3 | 6 = 7: reserved
    assert isinstance(walk(m, READ, eptp=b.eptp, gpa=0x5000), EptMisconfig)


# --- property: the violation rule as the SDM states it ----------------------------

@settings(max_examples=150, deadline=None)
@given(rights=st.lists(st.sampled_from([1, 3, 5, 7]), min_size=4, max_size=4),
       access=st.sampled_from([READ, WRITE, FETCH, READ | WRITE]))
def test_violation_iff_some_entry_lacks_the_right(rights, access):
    pml4e, pdpte, pde, pte = rights
    m = mem_with_tables(pml4e=PDPT | pml4e, pdpte=PD | pdpte, pde=PT | pde,
                        pte=0x00ABC000 | 0x30 | pte)
    needed = {READ: 1, WRITE: 2, FETCH: 4, READ | WRITE: 3}[access]
    allowed = all((r & needed) == needed for r in rights)
    r = walk(m, access)
    if allowed:
        assert isinstance(r, EptTranslation)
    else:
        assert isinstance(r, EptViolation)
        anded = pml4e & pdpte & pde & pte
        assert r.qualification == needed | (anded << 3)


def test_builder_snapshot_and_restore():
    m = PhysMem(8 << 20)
    b = EptBuilder(m, 0x10000, 0x10000)
    b.map(0x5000, 0x9000, PAGE_4K, rights=R)
    snap = b.snapshot()
    b.map(0x6000, 0xA000, PAGE_4K)                         # changed after the snapshot
    m.write_u64(b.entry_address(0x5000, 1), 0)
    b2 = EptBuilder(m, 0x10000, 0x10000)                   # a new builder over the same pool
    b2.restore(snap)
    r = walk(m, READ, eptp=b2.eptp, gpa=0x5123)
    assert isinstance(r, EptTranslation) and r.hpa == 0x9123 and r.rights == R
    assert isinstance(walk(m, READ, eptp=b2.eptp, gpa=0x6000), EptViolation)
    other = EptBuilder(m, 0x40000, 0x10000)
    with pytest.raises(EptBuildError, match="snapshot"):
        other.restore(snap)
