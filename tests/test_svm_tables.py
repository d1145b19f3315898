"""The SVM tables (VMCB layout, intercept bits, exit codes) against the APM's values.

Expected values are stated from AMD64 APM Vol. 2, Appendix B (Tables B-1 and
B-2) and Appendix C (Table C-1), written out here by hand.
"""
import pytest

from devirt_emu.platform.memory import PhysMem
from devirt_emu.svm import exit_codes as ec
from devirt_emu.svm import intercepts as ic
from devirt_emu.svm import vmcb


# APM Table B-1 (control area) offsets, as printed in the APM.
CONTROL_OFFSETS = {
    "intercept_cr": 0x000, "intercept_dr": 0x004, "intercept_exceptions": 0x008,
    "intercept_word3": 0x00C, "intercept_word4": 0x010, "intercept_word5": 0x014,
    "pause_filter_thresh": 0x03C, "pause_filter_count": 0x03E, "iopm_base_pa": 0x040,
    "msrpm_base_pa": 0x048, "tsc_offset": 0x050, "asid": 0x058, "tlb_ctl": 0x05C,
    "int_ctl": 0x060, "int_vector": 0x064, "int_state": 0x068, "exit_code": 0x070,
    "exit_info_1": 0x078, "exit_info_2": 0x080, "exit_int_info": 0x088, "nested_ctl": 0x090,
    "avic_vapic_bar": 0x098, "ghcb_gpa": 0x0A0, "event_inj": 0x0A8, "nested_cr3": 0x0B0,
    "virt_ext": 0x0B8, "clean": 0x0C0, "next_rip": 0x0C8, "insn_len": 0x0D0,
    "insn_bytes": 0x0D1, "avic_backing_page": 0x0E0, "avic_logical_id": 0x0F0,
    "avic_physical_id": 0x0F8, "vmsa_pa": 0x108,
}
# APM Table B-2 (state-save area) offsets, relative to the save area's start.
SAVE_OFFSETS = {
    "es_selector": 0x000, "cs_selector": 0x010, "ss_selector": 0x020, "ds_selector": 0x030,
    "fs_selector": 0x040, "gs_selector": 0x050, "gdtr_selector": 0x060,
    "ldtr_selector": 0x070, "idtr_selector": 0x080, "tr_selector": 0x090, "cpl": 0x0CB,
    "efer": 0x0D0, "cr4": 0x148, "cr3": 0x150, "cr0": 0x158, "dr7": 0x160, "dr6": 0x168,
    "rflags": 0x170, "rip": 0x178, "rsp": 0x1D8, "rax": 0x1F8, "star": 0x200,
    "lstar": 0x208, "cstar": 0x210, "sfmask": 0x218, "kernel_gs_base": 0x220,
    "sysenter_cs": 0x228, "sysenter_esp": 0x230, "sysenter_eip": 0x238, "cr2": 0x240,
    "g_pat": 0x268, "dbgctl": 0x270, "br_from": 0x278, "br_to": 0x280,
    "last_excp_from": 0x288, "last_excp_to": 0x290,
}


@pytest.mark.parametrize("name, off", sorted(CONTROL_OFFSETS.items()))
def test_control_area_offsets(name, off):
    f = vmcb.field(name)
    assert (f.offset, f.area) == (off, "control")


@pytest.mark.parametrize("name, off", sorted(SAVE_OFFSETS.items()))
def test_save_area_offsets(name, off):
    f = vmcb.field(name)
    assert (f.offset, f.area) == (0x400 + off, "save")


def test_segment_layout_is_selector_attrib_limit_base():
    # APM 15.5.1 / Table B-2: each segment is 16 bytes: selector, attrib, limit, base
    cs = [vmcb.field(f"cs_{p}") for p in ("selector", "attrib", "limit", "base")]
    assert [(f.offset - 0x410, f.size) for f in cs] == [(0, 2), (2, 2), (4, 4), (8, 8)]


def test_everything_fits_the_4k_page():
    assert all(f.offset + f.size <= 0x1000 for f in vmcb.TABLE)
    assert max(f.offset + f.size for f in vmcb.TABLE if f.area == "control") <= 0x400


def test_accessor_reads_and_writes_memory():
    mem = PhysMem(1 << 20)
    v = vmcb.Vmcb(mem, 0x3000)
    v["asid"] = 7
    v["rip"] = 0x1234_5678_9ABC
    assert mem.read_u32(0x3058) == 7
    assert mem.read_u64(0x3578) == 0x1234_5678_9ABC
    mem.write_u64(0x3078, 0xDEAD)
    assert v["exit_info_1"] == 0xDEAD
    v.exitcode = -1
    assert mem.read_u64(0x3070) == (1 << 64) - 1 and v.exitcode == -1
    v["insn_bytes"] = b"\x0f\xa2"
    assert mem.read(0x30D1, 3) == b"\x0f\xa2\x00"
    with pytest.raises(ValueError):
        v["tlb_ctl"] = 0x100
    with pytest.raises(KeyError, match="no VMCB field"):
        v["nope"]
    with pytest.raises(ValueError, match="aligned"):
        vmcb.Vmcb(mem, 0x3010)


INTERCEPT_BITS = {   # (word, bit) from Table B-1
    "INTERCEPT_CR0_READ": (0, 0), "INTERCEPT_CR15_READ": (0, 15), "INTERCEPT_CR0_WRITE": (0, 16),
    "INTERCEPT_CR8_WRITE": (0, 24), "INTERCEPT_DR7_READ": (1, 7), "INTERCEPT_DR7_WRITE": (1, 23),
    "INTERCEPT_EXCEPTION_14": (2, 14), "INTERCEPT_INTR": (3, 0), "INTERCEPT_NMI": (3, 1),
    "INTERCEPT_SMI": (3, 2), "INTERCEPT_INIT": (3, 3), "INTERCEPT_VINTR": (3, 4),
    "INTERCEPT_SELECTIVE_CR0": (3, 5), "INTERCEPT_STORE_IDTR": (3, 6),
    "INTERCEPT_LOAD_TR": (3, 13), "INTERCEPT_RDTSC": (3, 14), "INTERCEPT_RDPMC": (3, 15),
    "INTERCEPT_PUSHF": (3, 16), "INTERCEPT_POPF": (3, 17), "INTERCEPT_CPUID": (3, 18),
    "INTERCEPT_RSM": (3, 19), "INTERCEPT_IRET": (3, 20), "INTERCEPT_INTn": (3, 21),
    "INTERCEPT_INVD": (3, 22), "INTERCEPT_PAUSE": (3, 23), "INTERCEPT_HLT": (3, 24),
    "INTERCEPT_INVLPG": (3, 25), "INTERCEPT_INVLPGA": (3, 26), "INTERCEPT_IOIO_PROT": (3, 27),
    "INTERCEPT_MSR_PROT": (3, 28), "INTERCEPT_TASK_SWITCH": (3, 29),
    "INTERCEPT_FERR_FREEZE": (3, 30), "INTERCEPT_SHUTDOWN": (3, 31),
    "INTERCEPT_VMRUN": (4, 0), "INTERCEPT_VMMCALL": (4, 1), "INTERCEPT_VMLOAD": (4, 2),
    "INTERCEPT_VMSAVE": (4, 3), "INTERCEPT_STGI": (4, 4), "INTERCEPT_CLGI": (4, 5),
    "INTERCEPT_SKINIT": (4, 6), "INTERCEPT_RDTSCP": (4, 7), "INTERCEPT_ICEBP": (4, 8),
    "INTERCEPT_WBINVD": (4, 9), "INTERCEPT_MONITOR": (4, 10), "INTERCEPT_MWAIT": (4, 11),
    "INTERCEPT_MWAIT_COND": (4, 12), "INTERCEPT_XSETBV": (4, 13), "INTERCEPT_RDPRU": (4, 14),
    "TRAP_EFER_WRITE": (4, 15), "TRAP_CR0_WRITE": (4, 16), "TRAP_CR15_WRITE": (4, 31),
    "INTERCEPT_INVLPGB": (5, 0), "INTERCEPT_INVLPGB_ILLEGAL": (5, 1),
    "INTERCEPT_INVPCID": (5, 2), "INTERCEPT_MCOMMIT": (5, 3), "INTERCEPT_TLBSYNC": (5, 4),
}


@pytest.mark.parametrize("name, wb", sorted(INTERCEPT_BITS.items()))
def test_intercept_bits(name, wb):
    word, b = wb
    assert ic.bit(name) == 32 * word + b
    words = ic.words_from_names([name])
    assert words[word] == 1 << b and sum(words) == 1 << b
    assert ic.names_from_words(words) == [name]


def test_every_intercept_bit_of_words_0_to_4_is_named():
    assert all(32 * w + i in ic.BY_BIT for w in range(5) for i in range(32))


EXIT_CODES = {   # Table C-1
    "READ_CR0": 0x0, "WRITE_CR8": 0x18, "READ_DR7": 0x27, "WRITE_DR7": 0x37, "EXCP_0": 0x40,
    "EXCP_14": 0x4E, "EXCP_31": 0x5F, "INTR": 0x60, "NMI": 0x61, "SMI": 0x62, "INIT": 0x63,
    "VINTR": 0x64, "CR0_SEL_WRITE": 0x65, "IDTR_READ": 0x66, "TR_WRITE": 0x6D,
    "RDTSC": 0x6E, "RDPMC": 0x6F, "PUSHF": 0x70, "POPF": 0x71, "CPUID": 0x72, "RSM": 0x73,
    "IRET": 0x74, "SWINT": 0x75, "INVD": 0x76, "PAUSE": 0x77, "HLT": 0x78, "INVLPG": 0x79,
    "INVLPGA": 0x7A, "IOIO": 0x7B, "MSR": 0x7C, "TASK_SWITCH": 0x7D, "FERR_FREEZE": 0x7E,
    "SHUTDOWN": 0x7F, "VMRUN": 0x80, "VMMCALL": 0x81, "VMLOAD": 0x82, "VMSAVE": 0x83,
    "STGI": 0x84, "CLGI": 0x85, "SKINIT": 0x86, "RDTSCP": 0x87, "ICEBP": 0x88,
    "WBINVD": 0x89, "MONITOR": 0x8A, "MWAIT": 0x8B, "MWAIT_COND": 0x8C, "XSETBV": 0x8D,
    "RDPRU": 0x8E, "EFER_WRITE_TRAP": 0x8F, "CR0_WRITE_TRAP": 0x90, "CR15_WRITE_TRAP": 0x9F,
    "INVLPGB": 0xA0, "INVLPGB_ILLEGAL": 0xA1, "INVPCID": 0xA2, "MCOMMIT": 0xA3,
    "TLBSYNC": 0xA4, "NPF": 0x400, "AVIC_INCOMPLETE_IPI": 0x401,
    "AVIC_UNACCELERATED_ACCESS": 0x402, "VMGEXIT": 0x403, "INVALID": -1,
}


@pytest.mark.parametrize("name, code", sorted(EXIT_CODES.items()))
def test_exit_codes(name, code):
    assert ec.TABLE[name] == code
    assert ec.name_of(code) == name
    assert ec.name_of(code & ((1 << 64) - 1)) == name    # as the 64-bit EXITCODE


def test_instruction_intercepts_and_exit_codes_line_up():
    # APM: the word-3/word-4 intercepts and exit codes 0x60-0x8F are in the same order
    for name, b in ic.TABLE.items():
        if 96 <= b < 128 + 15:
            assert b - 96 + 0x60 in ec.BY_CODE, name
