"""Exit-information encoders against values worked out by hand from the SDM's
tables (Vol. 3C, "VM Exits", "Exit Information").  Each expected number is
written out with the bit positions it comes from; none is computed by the
code under test.
"""
import pytest

from devirt_emu.events import Insn, Kind, MemOperand
from devirt_emu.vmx import controls as C
from devirt_emu.vmx import exit_info as xi

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
R9, R10, R12, R15 = 9, 10, 12, 15
ES, CS, SS, DS, FS, GS = range(6)


def mem(seg=DS, base=None, index=None, scale=1, disp=0, addr_size=8, size=8, rip=False):
    return MemOperand(seg, base, index, scale, disp, addr_size, size, rip)


# --- Table "Exit Qualification for Control-Register Accesses" -------------
def test_cr_qualification_mov_to_cr3_from_rbx():
    # bits 3:0 = 3 (CR3), 5:4 = 0 (MOV to CR), 11:8 = 3 (RBX)
    assert xi.cr_access_qualification(3, xi.CR_ACCESS_MOV_TO_CR, RBX) == 0x303


def test_cr_qualification_mov_from_cr8_to_r10():
    # 8 | 1 << 4 | 10 << 8
    assert xi.cr_access_qualification(8, xi.CR_ACCESS_MOV_FROM_CR, R10) == 0xA18


def test_cr_qualification_clts():
    # CR number 0, access type 2 in bits 5:4, nothing else
    assert xi.cr_access_qualification(0, xi.CR_ACCESS_CLTS) == 0x20


def test_cr_qualification_lmsw_memory():
    # type 3 (0x30), bit 6 memory operand (0x40), source 0x000B in bits 31:16
    assert xi.cr_access_qualification(0, xi.CR_ACCESS_LMSW, lmsw_memory=True,
                                      lmsw_source=0xB) == 0x000B0070


def test_cr_qualification_lmsw_register():
    assert xi.cr_access_qualification(0, xi.CR_ACCESS_LMSW, lmsw_source=0xFFFF) == 0xFFFF0030


def test_cr_qualification_rejects_bad_input():
    with pytest.raises(ValueError):
        xi.cr_access_qualification(16, 0, 0)
    with pytest.raises(ValueError):
        xi.cr_access_qualification(0, xi.CR_ACCESS_CLTS, RBX)
    with pytest.raises(ValueError):
        xi.cr_access_qualification(0, xi.CR_ACCESS_MOV_TO_CR, 0, lmsw_source=1)


# --- Table "Exit Qualification for MOV DR" ---------------------------------
def test_dr_qualification():
    assert xi.dr_access_qualification(7, False, RAX) == 0x007          # MOV DR7, RAX
    assert xi.dr_access_qualification(6, True, R15) == 0xF16           # MOV R15, DR6: bit 4
    with pytest.raises(ValueError):
        xi.dr_access_qualification(8, False, 0)


# --- Table "Exit Qualification for I/O Instructions" ----------------------
def test_io_qualification_out_dx_al():
    # size 1 -> 0, OUT -> bit 3 clear, DX -> bit 6 clear, port 0x3F8 in 31:16
    assert xi.io_qualification(1, False, False, False, False, 0x3F8) == 0x03F80000


def test_io_qualification_in_eax_imm():
    # size 4 -> 3, IN -> 8, immediate -> 0x40, port 0x71
    assert xi.io_qualification(4, True, False, False, True, 0x71) == 0x0071004B


def test_io_qualification_rep_outsw():
    # size 2 -> 1, string 0x10, REP 0x20, port 0x1F0
    assert xi.io_qualification(2, False, True, True, False, 0x1F0) == 0x01F00031


def test_io_qualification_rep_insb():
    assert xi.io_qualification(1, True, True, True, False, 0x60) == 0x00600038


def test_io_qualification_rejects_bad_input():
    for args in ((3, True, False, False, False, 0), (1, True, False, False, False, 0x10000),
                 (1, True, True, False, True, 0x10)):
        with pytest.raises(ValueError):
            xi.io_qualification(*args)


# --- Table "Exit Qualification for Task Switches" ---------------------------
def test_task_switch_qualification():
    assert xi.task_switch_qualification(0x28, xi.TASK_SWITCH_IRET) == 0x40000028
    assert xi.task_switch_qualification(0x30, xi.TASK_SWITCH_IDT) == 0xC0000030
    assert xi.task_switch_qualification(0x08, xi.TASK_SWITCH_CALL) == 0x00000008
    assert xi.task_switch_qualification(0x10, xi.TASK_SWITCH_JMP) == 0x80000010
    with pytest.raises(ValueError):
        xi.task_switch_qualification(0x10000, 0)


# --- Linear address / displacement ------------------------------------------
def test_invlpg_qualification_clears_high_half_outside_64_bit_mode():
    assert xi.invlpg_qualification(0xFFFF800000001000, True) == 0xFFFF800000001000
    assert xi.invlpg_qualification(0x1_2345_6000, False) == 0x2345_6000


def test_displacement_qualification():
    assert xi.displacement_qualification(None, 0x401000) == 0             # register operand
    assert xi.displacement_qualification(mem(disp=-8), 0) == 0xFFFFFFFFFFFFFFF8
    assert xi.displacement_qualification(mem(disp=0x10, base=RAX), 0) == 0x10
    # RIP-relative: displacement plus the RIP of the next instruction
    assert xi.displacement_qualification(mem(disp=0x100, rip=True), 0x401005) == 0x401105


# --- Table "Exit Qualification for APIC-Access VM Exits" --------------------
def test_apic_access_qualification():
    assert xi.apic_access_qualification(0x300, xi.APIC_ACCESS_LINEAR_WRITE) == 0x1300
    assert xi.apic_access_qualification(0x010, xi.APIC_ACCESS_LINEAR_FETCH) == 0x2010
    assert xi.apic_access_qualification(0x080, xi.APIC_ACCESS_LINEAR_READ) == 0x0080
    # guest-physical access types carry no offset
    assert xi.apic_access_qualification(0x080, xi.APIC_ACCESS_GUEST_PHYS_EVENT_DELIVERY) == 0xA000
    with pytest.raises(ValueError):
        xi.apic_access_qualification(0, 4)


# --- Table "Exit Qualification for Debug Exceptions" ------------------------
def test_debug_qualification_from_dr6():
    # DR6 = BS (bit 14) + B0, RTM bit 16 = 1 and BLD bit 11 = 1 (both inactive)
    assert xi.debug_exception_qualification(0xFFFF4FF1) == 0x4001
    # BD (bit 13) inside an RTM region (DR6 bit 16 clear -> qualification bit 16 set)
    assert xi.debug_exception_qualification(0xFFFE2FF0) == 0x12000


def test_sipi_and_mwait_qualifications():
    assert xi.sipi_qualification(0x9F) == 0x9F
    assert xi.mwait_qualification(True) == 1
    assert xi.mwait_qualification(False) == 0


# --- VM-exit instruction information ----------------------------------------
def test_ins_outs_info():
    # OUTS with FS override, 64-bit addresses: 2 << 7 | 4 << 15
    assert xi.ins_outs_info(8, FS) == 0x20100
    # INS, 32-bit addresses: 1 << 7 (segment ES = 0)
    assert xi.ins_outs_info(4, ES) == 0x80


def test_invpcid_info():
    # INVPCID rdx, [rax + rcx*8 + 0x10]: scale 3, addr 2<<7, DS 3<<15, index 1<<18,
    # base 0<<23, Reg2 2<<28
    m = mem(base=RAX, index=RCX, scale=8, disp=0x10)
    assert xi.invalidate_info(m, RDX) == 0x20058103


def test_lgdt_info_64_bit():
    # LGDT [rbx]: no index (bit 22), base 3<<23, addr 0x100, DS 0x18000, identity 2<<28
    assert xi.gdtr_idtr_info(mem(base=RBX), 2, 8) == 0x21C18100


def test_sidt_info_32_bit():
    # SIDT [esi], 32-bit: addr 1<<7, DS, no index, base 6<<23, bit 11 operand size 32,
    # identity 1<<28
    assert xi.gdtr_idtr_info(mem(base=RSI, addr_size=4), 1, 4) == 0x13418880


def test_ldtr_tr_info():
    assert xi.ldtr_tr_info(None, RAX, 2) == 0x20000400        # LLDT ax: bit 10, identity 2
    assert xi.ldtr_tr_info(None, R9, 1) == 0x10000448         # STR r9: 9 << 3
    # SLDT [rip+0x20]: no base (bit 27), no index (bit 22), DS, 64-bit addresses
    assert xi.ldtr_tr_info(mem(disp=0x20, rip=True), None, 0) == 0x08418100
    with pytest.raises(ValueError):
        xi.ldtr_tr_info(None, None, 0)


def test_register_info():
    assert xi.register_info(R12, 8) == 0x1060      # RDRAND r12: 12 << 3 | 2 << 11
    assert xi.register_info(RAX, 2) == 0x0000      # RDSEED ax
    assert xi.register_info(RCX, 4) == 0x0808      # RDRAND ecx: 1 << 3 | 1 << 11
    with pytest.raises(ValueError):
        xi.register_info(RAX, 1)


def test_vmx_memory_info():
    # VMPTRLD [rsp+8]: base 4<<23, no index, SS 2<<15, addr 2<<7
    assert xi.vmx_memory_info(mem(seg=SS, base=RSP, disp=8)) == 0x02410100


def test_vmread_vmwrite_info():
    # VMREAD rax, rbx (register form): Reg1 = rax (r/m) 0<<3, bit 10, Reg2 = rbx 3<<28
    assert xi.vmread_vmwrite_info(None, RAX, RBX) == 0x30000400
    # VMWRITE rcx, [rdx + rsi*2]: scale 1, addr 0x100, DS, index 6<<18, base 2<<23,
    # Reg2 = rcx 1<<28
    m = mem(base=RDX, index=RSI, scale=2)
    assert xi.vmread_vmwrite_info(m, None, RCX) == 0x11198101


def test_instruction_info_from_insn():
    insn = Insn(Kind.INVPCID, 5, "invpcid rdx, [rax+rcx*8+0x10]", gpr=RDX,
                mem=mem(base=RAX, index=RCX, scale=8, disp=0x10))
    assert xi.instruction_info(insn) == 0x20058103
    vmread = Insn(Kind.VMREAD, 3, "vmread rax, rbx", gpr=RBX, gpr2=RAX)
    assert xi.instruction_info(vmread) == 0x30000400
    outs = Insn(Kind.OUTS, 2, "rep outsb", port=None, io_size=1, rep=True, addr_size=8)
    assert xi.instruction_info(outs) == 0x18100          # DS (3 << 15) | 2 << 7
    assert xi.instruction_info(Insn(Kind.HLT, 1, "hlt")) is None
    with pytest.raises(ValueError):
        xi.instruction_info(Insn(Kind.VMCLEAR, 4, "vmclear"))   # no memory operand


# --- Interruption information / IDT-vectoring information -------------------
def test_interruption_info():
    # #PF: vector 14, type 3 (8 << 8 = 0x300), error code bit 11, valid bit 31
    assert xi.interruption_info(14, C.INTR_TYPE_HARD_EXCEPTION, True) == 0x80000B0E
    assert xi.interruption_info(2, C.INTR_TYPE_NMI_INTR) == 0x80000202
    assert xi.interruption_info(0x20, C.INTR_TYPE_EXT_INTR) == 0x80000020
    assert xi.interruption_info(3, C.INTR_TYPE_SOFT_EXCEPTION) == 0x80000603
    assert xi.interruption_info(1, C.INTR_TYPE_PRIV_SW_EXCEPTION) == 0x80000501
    # #GP with error code and NMI unblocking due to IRET (bit 12)
    assert xi.interruption_info(13, C.INTR_TYPE_HARD_EXCEPTION, True, True) == 0x80001B0D


def test_interruption_info_rejects_inconsistent_input():
    with pytest.raises(ValueError):
        xi.interruption_info(3, C.INTR_TYPE_NMI_INTR)              # NMI must be vector 2
    with pytest.raises(ValueError):
        xi.interruption_info(0x30, C.INTR_TYPE_HARD_EXCEPTION)  # exceptions are 0..31
    with pytest.raises(ValueError):
        xi.interruption_info(3, C.INTR_TYPE_SOFT_EXCEPTION, True)  # no error code
    with pytest.raises(ValueError):
        xi.interruption_info(0, C.INTR_TYPE_RESERVED)           # type 1 is reserved


def test_idt_vectoring_info():
    assert xi.idt_vectoring_info(0x80, C.INTR_TYPE_SOFT_INTR) == 0x80000480
    assert xi.idt_vectoring_info(8, C.INTR_TYPE_HARD_EXCEPTION, True) == 0x80000B08
