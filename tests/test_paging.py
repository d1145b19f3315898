"""The platform's page walk (devirt_emu.platform.paging) against page tables
built here, for 32-bit, PAE and 4-level paging.

Every expectation is a literal from the Intel SDM Vol. 3A, chapter "Paging":

* 32-bit paging: PDE at CR3[31:12] + 4 * linear[31:22], PTE at PDE[31:12] +
  4 * linear[21:12]; a PDE with PS = 1 maps a 4-MiB page when CR4.PSE = 1
  (bits 31:22 of the address from the PDE, bits 39:32 from PDE bits 20:13
  with PSE-36; bit 21 reserved when MAXPHYADDR >= 40), and is a page-table
  pointer when CR4.PSE = 0.  No other reserved bits, no XD.
* PAE paging: PDPTE register linear[31:30]; PDE at PDPTE[M-1:12] + 8 *
  linear[29:21]; PTE at PDE[M-1:12] + 8 * linear[20:12]; a PDE with PS = 1
  maps a 2-MiB page; bits 62:MAXPHYADDR reserved (63 too with NXE = 0), 20:13
  in a 2-MiB PDE; PDPTE reserved bits 2:1, 8:5, 63:MAXPHYADDR.
* #PF error code: bit 0 P (protection or reserved bit), 1 W/R, 2 U/S, 3
  RSVD, 4 I/D (a fetch, only with CR4.PAE = 1 and IA32_EFER.NXE = 1).
* Access rights: user access needs U/S = 1 everywhere; a write needs R/W = 1
  everywhere at CPL 3, and at CPL 0 only with CR0.WP = 1; a fetch needs
  XD = 0 everywhere when NXE = 1.
* "PDPTE Registers": MOV to CR3 with PAE paging loads them; MOV to CR0/CR4
  does if PAE paging is on after it and it changes CR0.CD/NW/PG or
  CR4.PAE/PGE/PSE/SMEP.

The modelled CPU: MAXPHYADDR = 46 (CPUID 80000008H), PSE and PSE-36
(CPUID 01H EDX bits 3 and 17).
"""
import struct

import pytest

from devirt_emu.platform import paging
from devirt_emu.platform.cpuid import cpuid
from devirt_emu.platform.memory import PhysMem
from devirt_emu.platform.paging import PageFault, UnsupportedPaging, translate

CR0_PG_PE = 0x80000001
CR0_WP = 1 << 16
CR4_PSE, CR4_PAE, CR4_PGE, CR4_LA57 = 1 << 4, 1 << 5, 1 << 7, 1 << 12
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
P, RW, US, PS, A, D = 1, 2, 4, 0x80, 0x20, 0x40
XD = 1 << 63
# #PF error-code bits
E_P, E_W, E_U, E_RSVD, E_I = 1, 2, 4, 8, 16


def mem_with(entries: dict[int, int], size32=False) -> PhysMem:
    m = PhysMem(16 << 20)
    for pa, e in entries.items():
        m.write(pa, struct.pack("<I" if size32 else "<Q", e))
    return m


def pf(call) -> int:
    with pytest.raises(PageFault) as ei:
        call()
    return ei.value.error_code


def test_the_modelled_cpu_reports_pse_and_pse36():
    assert cpuid(1, 0, 0, 1)[3] & (1 << 3) and cpuid(1, 0, 0, 1)[3] & (1 << 17)
    assert cpuid(0x80000008, 0, 0, 1)[0] & 0xFF == 46


# ------------------------------------------------------------------ 32-bit paging
PD32, PT32 = 0x10000, 0x11000


def bits32(pde: int, pte: int = 0, *, pde_index=0x001, pte_index=0x234) -> PhysMem:
    """PDE ``pde_index`` of the directory at PD32, PTE ``pte_index`` of the table at PT32."""
    return mem_with({PD32 + 4 * pde_index: pde, PT32 + 4 * pte_index: pte}, size32=True)


LIN32 = (0x001 << 22) | (0x234 << 12) | 0x567        # 0x00634567


def test_32bit_4k_page():
    m = bits32(PT32 | P | RW, 0x00ABC000 | P | RW)
    assert translate(m, CR0_PG_PE, PD32, 0, 0, LIN32) == 0x00ABC567


def test_32bit_bits_63_32_of_the_linear_address_are_ignored():
    m = bits32(PT32 | P | RW, 0x00ABC000 | P | RW)
    assert translate(m, CR0_PG_PE, PD32, 0, 0, (0xFFFF << 32) | LIN32) == 0x00ABC567


def test_32bit_4m_page_with_pse():
    m = bits32(0x00C00000 | PS | P | RW)
    assert translate(m, CR0_PG_PE, PD32, CR4_PSE, 0, LIN32) == 0x00C00000 | 0x234567


def test_32bit_4m_page_pse36_high_address_bits():
    # PDE bits 20:13 = 0x81 -> physical bits 39:32 = 0x81
    m = bits32(0x00C00000 | (0x81 << 13) | PS | P)
    assert translate(m, CR0_PG_PE, PD32, CR4_PSE, 0, LIN32) == 0x81_00E3_4567


def test_32bit_ps_without_cr4_pse_is_a_page_table_pointer():
    m = bits32(PT32 | PS | P | RW, 0x00ABC000 | P)
    assert translate(m, CR0_PG_PE, PD32, 0, 0, LIN32) == 0x00ABC567


def test_32bit_4m_page_bit_21_is_reserved():
    m = bits32(0x00C00000 | (1 << 21) | PS | P | RW)
    assert pf(lambda: translate(m, CR0_PG_PE, PD32, CR4_PSE, 0, LIN32)) == E_P | E_RSVD
    assert pf(lambda: translate(m, CR0_PG_PE, PD32, CR4_PSE, 0, LIN32, write=True)) == \
        E_P | E_RSVD | E_W


def test_32bit_4k_entries_have_no_reserved_bits():
    # every bit set in a 4-KiB PTE (and PS clear in its PDE) is still a translation
    m = bits32(PT32 | P | RW, 0xFFFFFFFF)
    assert translate(m, CR0_PG_PE, PD32, CR4_PSE, 0, LIN32) == 0xFFFFF567


@pytest.mark.parametrize("kw, code", [
    ({}, 0),
    ({"write": True}, E_W),
    ({"user": True}, E_U),
    ({"user": True, "write": True}, E_U | E_W),
    ({"fetch": True}, 0),                         # 32-bit paging: no I/D bit, even with NXE
])
def test_32bit_not_present_error_codes(kw, code):
    m = bits32(PT32 | P | RW | US, 0)             # PTE not present
    assert pf(lambda: translate(m, CR0_PG_PE, PD32, 0, EFER_NXE, LIN32, **kw)) == code
    m = bits32(0)                                 # PDE not present
    assert pf(lambda: translate(m, CR0_PG_PE, PD32, 0, EFER_NXE, LIN32, **kw)) == code


def test_32bit_user_access_to_a_supervisor_page():
    m = bits32(PT32 | P | RW | US, 0x00ABC000 | P | RW)          # PTE U/S = 0
    assert pf(lambda: translate(m, CR0_PG_PE, PD32, 0, 0, LIN32, user=True)) == E_P | E_U
    m = bits32(PT32 | P | RW, 0x00ABC000 | P | RW | US)          # PDE U/S = 0
    assert pf(lambda: translate(m, CR0_PG_PE, PD32, 0, 0, LIN32, user=True, write=True)) == \
        E_P | E_U | E_W
    m = bits32(PT32 | P | RW | US, 0x00ABC000 | P | RW | US)
    assert translate(m, CR0_PG_PE, PD32, 0, 0, LIN32, user=True) == 0x00ABC567


def test_32bit_write_protect():
    m = bits32(PT32 | P | US, 0x00ABC000 | P | RW | US)           # PDE read-only
    # supervisor write: allowed with CR0.WP = 0, #PF with WP = 1
    assert translate(m, CR0_PG_PE, PD32, 0, 0, LIN32, write=True) == 0x00ABC567
    assert pf(lambda: translate(m, CR0_PG_PE | CR0_WP, PD32, 0, 0, LIN32, write=True)) == E_P | E_W
    # user write: #PF whatever WP
    assert pf(lambda: translate(m, CR0_PG_PE, PD32, 0, 0, LIN32, write=True, user=True)) == \
        E_P | E_W | E_U


def test_32bit_fetch_is_never_execute_disabled():
    m = bits32(PT32 | P, 0x00ABC000 | P)
    assert translate(m, CR0_PG_PE, PD32, 0, EFER_NXE, LIN32, fetch=True) == 0x00ABC567


# ------------------------------------------------------------------ PAE paging
PDPT, PD, PT = 0x20000, 0x21000, 0x22000
# linear: PDPTE 2, PDE 0x1A3, PTE 0x045, offset 0x678
LINPAE = (2 << 30) | (0x1A3 << 21) | (0x045 << 12) | 0x678        # 0xB4645678
PDPTES = (0, 0, PD | P, 0)


def pae(pde: int, pte: int = 0) -> PhysMem:
    return mem_with({PD + 8 * 0x1A3: pde, PT + 8 * 0x045: pte})


def test_pae_4k_page_through_the_pdpte_registers():
    m = pae(PT | P | RW, 0x1234_5678_9000 | P | RW)
    assert translate(m, CR0_PG_PE, PDPT, CR4_PAE, 0, LINPAE, pdptes=PDPTES) == 0x1234_5678_9678


def test_pae_2m_page():
    m = pae(0x3_4560_0000 | PS | P | RW)
    assert translate(m, CR0_PG_PE, PDPT, CR4_PAE, 0, LINPAE, pdptes=PDPTES) == \
        0x3_4560_0000 | 0x45678


def test_pae_uses_the_registers_not_the_table_in_memory():
    m = pae(PT | P | RW, 0xABC000 | P | RW)
    m.write(PDPT + 16, struct.pack("<Q", 0x30000 | P))       # memory says another PD
    assert translate(m, CR0_PG_PE, PDPT, CR4_PAE, 0, LINPAE, pdptes=PDPTES) == 0xABC678
    # without registers given, translate reads the table at CR3[31:5] (PDPTE 2 -> 0x30000: empty)
    assert pf(lambda: translate(m, CR0_PG_PE, PDPT, CR4_PAE, 0, LINPAE)) == 0


def test_pae_pdpte_register_with_a_reserved_bit():
    # only a PDPTE loaded without its check can hold one (the core's lazy reload after a
    # CR3 change it did not see, see PaeRegisters): the walk then faults with RSVD
    m = pae(PT | P | RW, 0xABC000 | P | RW)
    assert pf(lambda: translate(m, CR0_PG_PE, PDPT, CR4_PAE, 0, LINPAE,
                                pdptes=(0, 0, PD | P | (1 << 1), 0))) == E_P | E_RSVD


def test_pae_not_present_pdpte():
    m = pae(PT | P | RW, 0xABC000 | P | RW)
    assert pf(lambda: translate(m, CR0_PG_PE, PDPT, CR4_PAE, 0, LINPAE, pdptes=(0,) * 4,
                                write=True)) == E_W


@pytest.mark.parametrize("pde, pte, nxe", [
    (PT | P | RW | (1 << 62), 0xABC000 | P, True),            # PDE bit 62 (62:46 reserved)
    (PT | P | RW | (1 << 46), 0xABC000 | P, True),            # PDE bit MAXPHYADDR
    (PT | P | RW, 0xABC000 | P | (1 << 52), True),            # PTE bit 52 (reserved, not ignored)
    (PT | P | RW, 0xABC000 | P | XD, False),                  # XD with NXE = 0
    (0x600000 | PS | P | (1 << 13), 0, False),                # 2-MiB PDE bit 13
    (0x600000 | PS | P | (1 << 20), 0, False),                # 2-MiB PDE bit 20
])
def test_pae_reserved_bits(pde, pte, nxe):
    m = pae(pde, pte)
    efer = EFER_NXE if nxe else 0
    assert pf(lambda: translate(m, CR0_PG_PE, PDPT, CR4_PAE, efer, LINPAE, pdptes=PDPTES)) == \
        E_P | E_RSVD
    assert pf(lambda: translate(m, CR0_PG_PE, PDPT, CR4_PAE, efer, LINPAE, pdptes=PDPTES,
                                user=True, write=True)) == E_P | E_RSVD | E_U | E_W


def test_pae_execute_disable():
    m = pae(PT | P | RW | XD, 0xABC000 | P | RW)               # XD in the PDE
    kw = {"pdptes": PDPTES}
    assert translate(m, CR0_PG_PE, PDPT, CR4_PAE, EFER_NXE, LINPAE, **kw) == 0xABC678
    assert pf(lambda: translate(m, CR0_PG_PE, PDPT, CR4_PAE, EFER_NXE, LINPAE, fetch=True,
                                **kw)) == E_P | E_I
    # a fetch from a not-present page reports I/D too (PAE, NXE = 1); not with NXE = 0
    m = pae(PT | P | RW, 0)
    assert pf(lambda: translate(m, CR0_PG_PE, PDPT, CR4_PAE, EFER_NXE, LINPAE, fetch=True,
                                **kw)) == E_I
    assert pf(lambda: translate(m, CR0_PG_PE, PDPT, CR4_PAE, 0, LINPAE, fetch=True, **kw)) == 0


def test_pae_user_and_write_protect():
    m = pae(PT | P | US, 0xABC000 | P | RW | US)              # PDE read-only, user
    kw = {"pdptes": PDPTES}
    assert translate(m, CR0_PG_PE, PDPT, CR4_PAE, 0, LINPAE, write=True, **kw) == 0xABC678
    assert pf(lambda: translate(m, CR0_PG_PE | CR0_WP, PDPT, CR4_PAE, 0, LINPAE, write=True,
                                **kw)) == E_P | E_W
    m = pae(PT | P | RW, 0xABC000 | P | RW | US)              # PDE supervisor
    assert pf(lambda: translate(m, CR0_PG_PE, PDPT, CR4_PAE, 0, LINPAE, user=True, **kw)) == \
        E_P | E_U


@pytest.mark.parametrize("entry, bad", [
    (0x21000 | P, 0),
    (0x21000 | P | (1 << 1), 1 << 1),
    (0x21000 | P | (1 << 2), 1 << 2),
    (0x21000 | P | (1 << 5), 1 << 5),
    (0x21000 | P | (1 << 8), 1 << 8),
    (0x21000 | P | (1 << 46), 1 << 46),
    (0x21000 | P | XD, XD),                   # XD is reserved in a PDPTE
    (0x21000 | P | (1 << 3) | (1 << 4) | (0x7 << 9), 0),    # PWT, PCD, ignored 11:9
    (0x21000 | (1 << 1) | XD, 0),             # not present: nothing is reserved
])
def test_pdpte_reserved_bits(entry, bad):
    assert paging.pdpte_reserved(entry) == bad


def test_pdpt_address_is_cr3_bits_31_5():
    assert paging.pdpt_address(0xFFFF_FFFF_1234_56FF) == 0x1234_56E0


@pytest.mark.parametrize("cr, old0, old4, new0, new4, efer, loads", [
    (3, CR0_PG_PE, CR4_PAE, CR0_PG_PE, CR4_PAE, 0, True),            # MOV CR3 with PAE paging
    (3, CR0_PG_PE, 0, CR0_PG_PE, 0, 0, False),                       # 32-bit paging
    (3, 1, CR4_PAE, 1, CR4_PAE, 0, False),                           # paging off
    (3, CR0_PG_PE, CR4_PAE, CR0_PG_PE, CR4_PAE, EFER_LME | EFER_LMA, False),   # IA-32e
    (0, 1, CR4_PAE, CR0_PG_PE, CR4_PAE, 0, True),                    # turning paging on
    (4, CR0_PG_PE, 0, CR0_PG_PE, CR4_PAE, 0, True),                  # 32-bit -> PAE
    (4, CR0_PG_PE, CR4_PAE, CR0_PG_PE, CR4_PAE | CR4_PGE, 0, True),  # PGE changed
    (4, CR0_PG_PE, CR4_PAE, CR0_PG_PE, CR4_PAE | CR4_PSE, 0, True),  # PSE changed
    (4, CR0_PG_PE, CR4_PAE, CR0_PG_PE, CR4_PAE | (1 << 20), 0, True),   # SMEP changed
    (4, CR0_PG_PE, CR4_PAE, CR0_PG_PE, CR4_PAE | (1 << 9), 0, False),   # OSFXSR: no
    (0, CR0_PG_PE, CR4_PAE, CR0_PG_PE | (1 << 30), CR4_PAE, 0, True),   # CD changed
    (0, CR0_PG_PE, CR4_PAE, CR0_PG_PE | (1 << 29), CR4_PAE, 0, True),   # NW changed
    (0, CR0_PG_PE, CR4_PAE, CR0_PG_PE | CR0_WP, CR4_PAE, 0, False),     # WP: no
    (0, CR0_PG_PE, CR4_PAE, 1, CR4_PAE, 0, False),                   # paging turned off
])
def test_when_mov_to_cr_loads_the_pdptes(cr, old0, old4, new0, new4, efer, loads):
    assert paging.pdptes_reload(cr, old0, old4, new0, new4, efer) is loads


# ------------------------------------------------------------------ 4-level paging
PML4, PDPT4, PD4, PT4 = 0x30000, 0x31000, 0x32000, 0x33000
LIN4 = (0x0A5 << 39) | (0x15A << 30) | (0x0C3 << 21) | (0x11D << 12) | 0xEEE
LMA = EFER_LME | EFER_LMA


def level4(pml4e, pdpte=0, pde=0, pte=0) -> PhysMem:
    return mem_with({PML4 + 8 * 0x0A5: pml4e, PDPT4 + 8 * 0x15A: pdpte,
                     PD4 + 8 * 0x0C3: pde, PT4 + 8 * 0x11D: pte})


def test_4level_4k_and_1g_pages():
    m = level4(PDPT4 | P | RW, PD4 | P | RW, PT4 | P | RW, 0x2_0000_5000 | P)
    assert translate(m, CR0_PG_PE, PML4, CR4_PAE, LMA, LIN4) == 0x2_0000_5EEE
    m = level4(PDPT4 | P | RW, 0x40_0000_0000 | PS | P | RW)
    assert translate(m, CR0_PG_PE, PML4, CR4_PAE, LMA, LIN4) == \
        0x40_0000_0000 | (0x0C3 << 21) | (0x11D << 12) | 0xEEE


@pytest.mark.parametrize("m, efer", [
    (level4(PDPT4 | P | PS), LMA),                                   # PS in a PML4E
    (level4(PDPT4 | P, 0x40_0000_0000 | PS | P | (1 << 13)), LMA),   # 1-GiB PDPTE bit 13
    (level4(PDPT4 | P | (1 << 51)), LMA),                            # bit 51 (51:46)
    (level4(PDPT4 | P | XD), LMA),                                   # XD without NXE
])
def test_4level_reserved_bits(m, efer):
    assert pf(lambda: translate(m, CR0_PG_PE, PML4, CR4_PAE, efer, LIN4)) == E_P | E_RSVD


def test_4level_fetch_of_an_execute_disabled_page():
    m = level4(PDPT4 | P | RW | XD, PD4 | P | RW, PT4 | P | RW, 0x5000 | P)
    efer = LMA | EFER_NXE
    assert pf(lambda: translate(m, CR0_PG_PE, PML4, CR4_PAE, efer, LIN4, fetch=True)) == E_P | E_I


def test_5level_paging_is_not_modelled():
    with pytest.raises(UnsupportedPaging):
        translate(PhysMem(1 << 20), CR0_PG_PE, PML4, CR4_PAE | CR4_LA57, LMA, 0)


def test_paging_off_is_32_bit_identity():
    assert translate(PhysMem(1 << 20), 1, 0, 0, 0, 0x1_2345_6789) == 0x2345_6789


# ------------------------------------------------------------------ the walk itself
def test_walk_reports_the_entries_it_used_top_first():
    m = bits32(PT32 | P | RW, 0x00ABC000 | P | RW)
    w = paging.walk(paging.PagingMode.BITS32, LIN32, PD32,
                    lambda pa, n: m.read_u32(pa) if n == 4 else m.read_u64(pa), code=0)
    assert [(a, s) for a, _, s in w.entries] == [(PD32 + 4, 4), (PT32 + 4 * 0x234, 4)]
    assert (w.pa, w.page_size) == (0x00ABC567, 4096)
    m = pae(0x600000 | PS | P | RW)
    w = paging.walk(paging.PagingMode.PAE, LINPAE, PDPT, lambda pa, n: m.read_u64(pa), code=0,
                    pdptes=PDPTES)
    assert [(a, s) for a, _, s in w.entries] == [(PD + 8 * 0x1A3, 8)]    # not the PDPTE register
    assert w.page_size == 2 << 20
