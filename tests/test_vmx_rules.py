"""VMX exit rules, reason by reason and control by control, both sides.

Every expected value is written here from the SDM (Vol. 3C "VMX Non-Root
Operation" and "VM Exits", Vol. 3D Appendix C for the reason numbers), never
taken from the code under test: reason numbers are literals, qualifications
and instruction information are worked out bit by bit in the comments.

The VMCS is the real :class:`Vmcs` over :class:`PhysMem` for features the
modelled CPU advertises; features it does not advertise (VMCS shadowing, VM
functions, ENCLS exiting) are checked with a dictionary VMCS, since the rules
accept anything with ``vmread``.
"""
import pytest

from devirt_emu.events import Event, Insn, Kind, MemOperand
from devirt_emu.platform.memory import PhysMem
from devirt_emu.vmx import exit_reasons as er
from devirt_emu.vmx import rules
from devirt_emu.vmx.exit_reasons import Timing
from devirt_emu.vmx.fields import VmcsField as F
from devirt_emu.vmx.rules import Decision, Fault, PauseLoop, RuleInputError
from devirt_emu.vmx.vmcs import Vmcs

RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
DS = 3

# Control bits, SDM Vol. 3C tables of the VM-execution controls (bit positions).
PIN_EXT_INTR = 1 << 0
PIN_NMI = 1 << 3
PIN_VIRTUAL_NMIS = 1 << 5
PIN_PREEMPTION_TIMER = 1 << 6
P_INTR_WINDOW = 1 << 2
P_HLT = 1 << 7
P_INVLPG = 1 << 9
P_MWAIT = 1 << 10
P_RDPMC = 1 << 11
P_RDTSC = 1 << 12
P_CR3_LOAD = 1 << 15
P_CR3_STORE = 1 << 16
P_CR8_LOAD = 1 << 19
P_CR8_STORE = 1 << 20
P_TPR_SHADOW = 1 << 21
P_NMI_WINDOW = 1 << 22
P_MOV_DR = 1 << 23
P_UNCOND_IO = 1 << 24
P_IO_BITMAPS = 1 << 25
P_MSR_BITMAPS = 1 << 28
P_MONITOR = 1 << 29
P_PAUSE = 1 << 30
P_SECONDARY = 1 << 31
S_VIRT_APIC = 1 << 0
S_DESC = 1 << 2
S_RDTSCP = 1 << 3
S_WBINVD = 1 << 6
S_APIC_REG_VIRT = 1 << 8
S_PLE = 1 << 10
S_RDRAND = 1 << 11
S_INVPCID = 1 << 12
S_VMFUNC = 1 << 13
S_SHADOW_VMCS = 1 << 14
S_ENCLS = 1 << 15
S_RDSEED = 1 << 16
S_XSAVES = 1 << 20
S_USR_WAIT = 1 << 26
EXIT_ACK_INTR = 1 << 15

IO_A, IO_B, MSR_BM, APIC_PAGE = 0x10000, 0x11000, 0x12000, 0x20000

# 64-bit CPL-0 guest: CR0 = PG|NE|ET|MP|PE|WP ; CR4 = PAE|VMXE|OSXSAVE ; EFER = LME|LMA|NXE
REGS64 = dict(cpl=0, mode=64, cr0=0x80050033, cr4=0x42020, efer=0xD00, rflags=0x2,
              rax=0, rcx=0, rdx=0, rbx=0, rsp=0x8000, rbp=0, rsi=0, rdi=0,
              r8=0, r9=0, r10=0, r11=0, r12=0, r13=0, r14=0, r15=0)


def regs(**kw):
    r = dict(REGS64)
    r.update(kw)
    return r


def ievent(kind, length, *, regs_=None, linear=None, port=None, extra=None, rip=0x401000,
           **insn_fields):
    insn = Insn(kind, length, kind.value.lower(), **insn_fields)
    return Event(kind, 0, rip, insn, linear=linear, port=port, regs=regs_ or regs(),
                 extra=extra or {})


def mem(seg=DS, base=None, index=None, scale=1, disp=0, addr_size=8, size=8, rip=False):
    return MemOperand(seg, base, index, scale, disp, addr_size, size, rip)


class Machine:
    """A real VMCS over PhysMem, plus the bitmaps at fixed addresses."""

    def __init__(self):
        self.mem = PhysMem(0x40000)
        self.vmcs = Vmcs.format(self.mem, 0x1000)
        self.vmcs.set("IO_BITMAP_A", IO_A)
        self.vmcs.set("IO_BITMAP_B", IO_B)
        self.vmcs.set("MSR_BITMAP", MSR_BM)

    def set(self, **fields):
        for name, value in fields.items():
            self.vmcs.set(name, value)
        return self

    def bit(self, base, n):
        self.mem.write_u8(base + n // 8, self.mem.read_u8(base + n // 8) | 1 << (n % 8))

    def decide(self, event, **kw):
        return rules.decide(event, self.vmcs, self.mem.read, **kw)


class DictVmcs:
    """A VMCS as a dictionary, for controls the modelled CPU does not advertise."""

    def __init__(self, **fields):
        self.f = {int(F[k]): v for k, v in fields.items()}

    def vmread(self, field):
        return self.f.get(int(field), 0)


class DictMem:
    def __init__(self):
        self.b = bytearray(0x40000)

    def __call__(self, pa, n):
        return bytes(self.b[pa:pa + n])

    def bit(self, base, n):
        self.b[base + n // 8] |= 1 << (n % 8)


@pytest.fixture
def m():
    return Machine()


def assert_exit(d, reason, name, qualification=0, length=None, info=None):
    assert isinstance(d, Decision) and d.exit, d
    assert (d.reason, d.name) == (reason, name)
    assert d.qualification == qualification, hex(d.qualification)
    assert d.instruction_length == length
    assert d.instruction_info == info, d.instruction_info and hex(d.instruction_info)


def assert_no_exit(d):
    assert isinstance(d, Decision) and not d.exit, d
    assert d.reason is None


def assert_fault(d, vector, error_code=None):
    assert isinstance(d, Fault), d
    assert (d.vector, d.error_code) == (vector, error_code)


# ===========================================================================
# The exit-reason table (SDM Appendix C numbers, Linux names)
# ===========================================================================
@pytest.mark.parametrize("number,name", [
    (0, "EXCEPTION_NMI"), (1, "EXTERNAL_INTERRUPT"), (2, "TRIPLE_FAULT"), (3, "INIT_SIGNAL"),
    (4, "SIPI_SIGNAL"), (7, "INTERRUPT_WINDOW"), (8, "NMI_WINDOW"), (9, "TASK_SWITCH"),
    (10, "CPUID"), (11, "GETSEC"), (12, "HLT"), (13, "INVD"), (14, "INVLPG"), (15, "RDPMC"),
    (16, "RDTSC"), (17, "RSM"), (18, "VMCALL"), (19, "VMCLEAR"), (20, "VMLAUNCH"),
    (21, "VMPTRLD"), (22, "VMPTRST"), (23, "VMREAD"), (24, "VMRESUME"), (25, "VMWRITE"),
    (26, "VMOFF"), (27, "VMON"), (28, "CR_ACCESS"), (29, "DR_ACCESS"), (30, "IO_INSTRUCTION"),
    (31, "MSR_READ"), (32, "MSR_WRITE"), (33, "INVALID_STATE"), (34, "MSR_LOAD_FAIL"),
    (36, "MWAIT_INSTRUCTION"), (37, "MONITOR_TRAP_FLAG"), (39, "MONITOR_INSTRUCTION"),
    (40, "PAUSE_INSTRUCTION"), (41, "MCE_DURING_VMENTRY"), (43, "TPR_BELOW_THRESHOLD"),
    (44, "APIC_ACCESS"), (45, "EOI_INDUCED"), (46, "GDTR_IDTR"), (47, "LDTR_TR"),
    (48, "EPT_VIOLATION"), (49, "EPT_MISCONFIG"), (50, "INVEPT"), (51, "RDTSCP"),
    (52, "PREEMPTION_TIMER"), (53, "INVVPID"), (54, "WBINVD"), (55, "XSETBV"),
    (56, "APIC_WRITE"), (57, "RDRAND"), (58, "INVPCID"), (59, "VMFUNC"), (60, "ENCLS"),
    (61, "RDSEED"), (62, "PML_FULL"), (63, "XSAVES"), (64, "XRSTORS"), (67, "UMWAIT"),
    (68, "TPAUSE"), (74, "BUS_LOCK"), (75, "NOTIFY"),
])
def test_exit_reason_numbers(number, name):
    assert er.reason(number).name == name
    assert er.reason(name).number == number


def test_exit_reason_table_columns():
    # SDM: MTF, TPR below threshold, EOI-induced and APIC-write exits are trap-like
    for n in (37, 43, 45, 56):
        assert er.reason(n).timing is Timing.TRAP
    # VM-entry failures
    for n in (33, 34, 41):
        assert er.reason(n).timing is Timing.ENTRY
    # instruction length: defined for CPUID, undefined for an external interrupt
    assert er.reason(10).length is er.Length.ALWAYS
    assert er.reason(1).length is er.Length.UNDEFINED
    assert er.reason(30).info is er.InfoFormat.INS_OUTS
    assert er.reason(58).info is er.InfoFormat.INVALIDATE
    assert er.reason(0x8000001C).name == "CR_ACCESS"     # bit 31 ignored
    with pytest.raises(KeyError):
        er.reason(35)
    assert er.name_of(35) == "REASON_35"


def test_every_event_kind_has_a_rule():
    assert set(rules.RULES) | rules.RECORD_KINDS == set(Kind)
    assert not set(rules.RULES) & rules.RECORD_KINDS
    with pytest.raises(RuleInputError):
        rules.decide(Event(Kind.VM_EXIT, 0, 0, regs=regs()), DictVmcs(), None)


# ===========================================================================
# Unconditional exits
# ===========================================================================
def test_cpuid_always_exits(m):
    assert_exit(m.decide(ievent(Kind.CPUID, 2)), 10, "CPUID", length=2)


def test_cpuid_exits_at_cpl3(m):
    assert_exit(m.decide(ievent(Kind.CPUID, 2, regs_=regs(cpl=3))), 10, "CPUID", length=2)


def test_getsec(m):
    assert_fault(m.decide(ievent(Kind.GETSEC, 2)), 6)                     # CR4.SMXE=0: #UD
    d = m.decide(ievent(Kind.GETSEC, 2, regs_=regs(cr4=REGS64["cr4"] | 1 << 14)))
    assert_exit(d, 11, "GETSEC", length=2)


def test_invd(m):
    assert_exit(m.decide(ievent(Kind.INVD, 2)), 13, "INVD", length=2)
    assert_fault(m.decide(ievent(Kind.INVD, 2, regs_=regs(cpl=3))), 13, 0)


def test_xsetbv(m):
    assert_exit(m.decide(ievent(Kind.XSETBV, 3)), 55, "XSETBV", length=3)
    assert_fault(m.decide(ievent(Kind.XSETBV, 3, regs_=regs(cpl=3))), 13, 0)
    assert_fault(m.decide(ievent(Kind.XSETBV, 3, regs_=regs(cr4=0x2020))), 6)   # no OSXSAVE


def test_vmcall_exits_in_every_mode_and_cpl(m):
    for r in (regs(), regs(cpl=3), regs(cr0=0x10, mode=16, efer=0)):
        assert_exit(m.decide(ievent(Kind.VMCALL, 3, regs_=r)), 18, "VMCALL", length=3)


def test_vmclear_exits_with_displacement_and_info(m):
    # VMCLEAR [rbx+0x40]: qualification = displacement 0x40; info: no index (bit 22),
    # base rbx 3<<23 (0x1800000), DS 3<<15, 64-bit addresses 2<<7 -> 0x01C18100
    ev = ievent(Kind.VMCLEAR, 5, mem=mem(base=RBX, disp=0x40))
    assert_exit(m.decide(ev), 19, "VMCLEAR", 0x40, 5, 0x01C18100)


def test_vmx_instruction_exits_even_at_cpl3(m):
    # the non-root VM exit comes before the CPL > 0 #GP in VMLAUNCH's pseudocode
    assert_exit(m.decide(ievent(Kind.VMLAUNCH, 3, regs_=regs(cpl=3))), 20, "VMLAUNCH", length=3)


@pytest.mark.parametrize("kind,number,name", [
    (Kind.VMLAUNCH, 20, "VMLAUNCH"), (Kind.VMRESUME, 24, "VMRESUME"), (Kind.VMXOFF, 26, "VMOFF")])
def test_vmx_instructions_without_operands(m, kind, number, name):
    assert_exit(m.decide(ievent(kind, 3)), number, name, length=3)


def test_vmx_instruction_ud_cases(m):
    real = regs(cr0=0x10, mode=16, efer=0)
    compat = regs(mode=32)                    # EFER.LMA=1 with CS.L=0
    v86 = regs(rflags=0x20002, cpl=3, mode=16, efer=0, cr0=0x11)
    for r in (real, compat, v86):
        assert_fault(m.decide(ievent(Kind.VMPTRLD, 4, regs_=r, mem=mem(base=RAX))), 6)
    # register operand
    assert_fault(m.decide(ievent(Kind.VMPTRLD, 3, gpr=RAX)), 6)
    # VMXON with CR4.VMXE=0
    assert_fault(m.decide(ievent(Kind.VMXON, 4, regs_=regs(cr4=0x40020), mem=mem(base=RAX))), 6)
    assert_exit(m.decide(ievent(Kind.VMXON, 4, mem=mem(base=RAX))), 27, "VMON", 0, 4,
                0x00418100)   # base rax 0<<23, no index 1<<22, DS, 64-bit


def test_invept_invvpid_exit_with_reg2(m):
    # INVEPT rdx, [rsi]: Reg2 = rdx 2<<28, base rsi 6<<23, no index, DS, 64-bit
    ev = ievent(Kind.INVEPT, 5, gpr=RDX, mem=mem(base=RSI))
    assert_exit(m.decide(ev), 50, "INVEPT", 0, 5, 0x23418100)
    ev = ievent(Kind.INVVPID, 5, gpr=RDX, mem=mem(base=RSI, disp=-16))
    assert_exit(m.decide(ev), 53, "INVVPID", 0xFFFFFFFFFFFFFFF0, 5, 0x23418100)


def test_vmread_without_shadowing_exits(m):
    # VMREAD rax, rbx: info Reg1 = rax, bit 10, Reg2 = rbx 3<<28
    ev = ievent(Kind.VMREAD, 3, gpr=RBX, gpr2=RAX)
    assert_exit(m.decide(ev), 23, "VMREAD", 0, 3, 0x30000400)


def test_vmread_vmwrite_bitmaps_with_vmcs_shadowing():
    dm = DictMem()
    v = DictVmcs(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY, SECONDARY_VM_EXEC_CONTROL=S_SHADOW_VMCS,
                 VMREAD_BITMAP=0x3000, VMWRITE_BITMAP=0x4000)
    dm.bit(0x4000, 0x681E)                      # VMWRITE of GUEST_RIP exits
    read_rip = ievent(Kind.VMREAD, 3, gpr=RBX, gpr2=RAX, regs_=regs(rbx=0x681E))
    assert_no_exit(rules.decide(read_rip, v, dm))
    write_rip = ievent(Kind.VMWRITE, 3, gpr=RBX, gpr2=RAX, regs_=regs(rbx=0x681E))
    assert_exit(rules.decide(write_rip, v, dm), 25, "VMWRITE", 0, 3, 0x30000400)
    # an encoding with bits 63:15 set always exits
    big = ievent(Kind.VMREAD, 3, gpr=RBX, gpr2=RAX, regs_=regs(rbx=0x18000))
    assert_exit(rules.decide(big, v, dm), 23, "VMREAD", 0, 3, 0x30000400)


def test_vmfunc():
    dm = DictMem()
    ev = lambda **r: ievent(Kind.VMFUNC, 3, regs_=regs(**r))
    off = DictVmcs(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY)
    assert_fault(rules.decide(ev(rax=0), off, dm), 6)
    v = DictVmcs(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY, SECONDARY_VM_EXEC_CONTROL=S_VMFUNC,
                 VM_FUNCTION_CONTROL=1, EPTP_LIST_ADDRESS=0x5000)
    assert_exit(rules.decide(ev(rax=1), v, dm), 59, "VMFUNC", length=3)     # function 1 off
    assert_exit(rules.decide(ev(rax=0, rcx=512), v, dm), 59, "VMFUNC", length=3)
    assert_exit(rules.decide(ev(rax=0, rcx=3), v, dm), 59, "VMFUNC", length=3)   # entry 0: bad
    dm.b[0x5000 + 8 * 3:0x5000 + 8 * 4] = (0x7000 | 0x18 | 6).to_bytes(8, "little")  # WB, 4-level
    assert_no_exit(rules.decide(ev(rax=0, rcx=3), v, dm))


@pytest.mark.parametrize("eptp, valid", [
    (0x7000 | 0x18 | 6, True),                 # WB, 4-level walk
    (0x7000 | 0x18 | 0, True),                 # UC, 4-level walk
    (0x7000 | 0x18 | 6 | 0x40, True),          # A/D flags: the modelled CPU has them
    (0x7000 | 0x18 | 6 | 1 << 45, True),       # an address bit below MAXPHYADDR (46)
    (0x7000 | 0x18 | 6 | 1 << 47, False),      # bit 47: beyond MAXPHYADDR, below bit 52
    (0x7000 | 0x18 | 6 | 0x80, False),         # supervisor shadow stack: not supported
    (0x7000 | 0x18 | 6 | 0x100, False),        # reserved bit 8
    (0x7000 | 0x10 | 6, False),                # page-walk length 3
    (0x7000 | 0x18 | 5, False),                # memory type 5
])
def test_vmfunc_eptp_switching_checks_the_eptp_as_vm_entry_does(eptp, valid):
    """SDM "EPTP Switching": an EPTP-list entry that VM entry would reject as the EPT
    pointer causes a VMFUNC VM exit; one it would accept is switched to with no exit."""
    from devirt_emu.vmx.entry import EntryCaps, eptp_problem
    caps = EntryCaps.modelled()
    assert (eptp_problem(eptp, caps.ept_vpid_cap, caps.maxphyaddr) is None) == valid
    dm = DictMem()
    dm.b[0x5000 + 8 * 3:0x5000 + 8 * 4] = eptp.to_bytes(8, "little")
    v = DictVmcs(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY, SECONDARY_VM_EXEC_CONTROL=S_VMFUNC,
                 VM_FUNCTION_CONTROL=1, EPTP_LIST_ADDRESS=0x5000)
    out = rules.decide(ievent(Kind.VMFUNC, 3, regs_=regs(rax=0, rcx=3)), v, dm)
    if valid:
        assert_no_exit(out)
    else:
        assert_exit(out, 59, "VMFUNC", length=3)


def test_encls_bitmap():
    dm = DictMem()
    v = DictVmcs(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY, SECONDARY_VM_EXEC_CONTROL=S_ENCLS,
                 ENCLS_EXITING_BITMAP=(1 << 2) | (1 << 63))
    assert_exit(rules.decide(ievent(Kind.ENCLS, 3, regs_=regs(rax=2)), v, dm), 60, "ENCLS",
                length=3)
    assert_no_exit(rules.decide(ievent(Kind.ENCLS, 3, regs_=regs(rax=1)), v, dm))
    # EAX >= 63 consults bit 63
    assert_exit(rules.decide(ievent(Kind.ENCLS, 3, regs_=regs(rax=0x100)), v, dm), 60, "ENCLS",
                length=3)
    assert_no_exit(rules.decide(ievent(Kind.ENCLS, 3, regs_=regs(rax=2)),
                                DictVmcs(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY), dm))
    assert_fault(rules.decide(ievent(Kind.ENCLS, 3, regs_=regs(rax=2, cpl=3)), v, dm), 6)


# ===========================================================================
# Primary controls
# ===========================================================================
def test_hlt(m):
    assert_no_exit(m.decide(ievent(Kind.HLT, 1)))
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_HLT)
    d = m.decide(ievent(Kind.HLT, 1))
    assert_exit(d, 12, "HLT", length=1)
    assert d.cause == ("CPU_BASED_HLT_EXITING=1",)
    assert d.timing is Timing.FAULT
    assert_fault(m.decide(ievent(Kind.HLT, 1, regs_=regs(cpl=3))), 13, 0)


def test_hlt_no_exit_cause(m):
    assert m.decide(ievent(Kind.HLT, 1)).cause == ("CPU_BASED_HLT_EXITING=0",)


def test_invlpg(m):
    ev = ievent(Kind.INVLPG, 3, linear=0xFFFF800000123000, mem=mem(base=RAX))
    assert_no_exit(m.decide(ev))
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_INVLPG)
    assert_exit(m.decide(ev), 14, "INVLPG", 0xFFFF800000123000, 3)
    # outside 64-bit mode bits 63:32 of the qualification are cleared
    ev32 = ievent(Kind.INVLPG, 3, linear=0x1_0040_0000, regs_=regs(mode=32, efer=0),
                  mem=mem(base=RAX, addr_size=4))
    assert_exit(m.decide(ev32), 14, "INVLPG", 0x0040_0000, 3)
    assert_fault(m.decide(ievent(Kind.INVLPG, 3, linear=0, regs_=regs(cpl=3),
                                 mem=mem(base=RAX))), 13, 0)


def test_rdpmc(m):
    assert_no_exit(m.decide(ievent(Kind.RDPMC, 2)))
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_RDPMC)
    assert_exit(m.decide(ievent(Kind.RDPMC, 2)), 15, "RDPMC", length=2)
    assert_fault(m.decide(ievent(Kind.RDPMC, 2, regs_=regs(cpl=3))), 13, 0)        # CR4.PCE=0
    d = m.decide(ievent(Kind.RDPMC, 2, regs_=regs(cpl=3, cr4=REGS64["cr4"] | 1 << 8)))
    assert_exit(d, 15, "RDPMC", length=2)


def test_rdtsc(m):
    assert_no_exit(m.decide(ievent(Kind.RDTSC, 2)))
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_RDTSC)
    assert_exit(m.decide(ievent(Kind.RDTSC, 2)), 16, "RDTSC", length=2)
    tsd = REGS64["cr4"] | 1 << 2
    assert_fault(m.decide(ievent(Kind.RDTSC, 2, regs_=regs(cpl=3, cr4=tsd))), 13, 0)
    assert_exit(m.decide(ievent(Kind.RDTSC, 2, regs_=regs(cpl=0, cr4=tsd))), 16, "RDTSC",
                length=2)
    assert_exit(m.decide(ievent(Kind.RDTSC, 2, regs_=regs(cpl=3))), 16, "RDTSC", length=2)


def test_rdtscp(m):
    assert_fault(m.decide(ievent(Kind.RDTSCP, 3)), 6)           # secondary controls off
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_RDTSC, SECONDARY_VM_EXEC_CONTROL=S_RDTSCP)
    assert_fault(m.decide(ievent(Kind.RDTSCP, 3)), 6)           # not activated: acts as 0
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_RDTSC | P_SECONDARY)
    assert_exit(m.decide(ievent(Kind.RDTSCP, 3)), 51, "RDTSCP", length=3)
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY)
    assert_no_exit(m.decide(ievent(Kind.RDTSCP, 3)))


def test_monitor_mwait(m):
    assert_no_exit(m.decide(ievent(Kind.MONITOR, 3)))
    assert_no_exit(m.decide(ievent(Kind.MWAIT, 3)))
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_MONITOR | P_MWAIT)
    assert_exit(m.decide(ievent(Kind.MONITOR, 3)), 39, "MONITOR_INSTRUCTION", length=3)
    assert_exit(m.decide(ievent(Kind.MWAIT, 3)), 36, "MWAIT_INSTRUCTION", 0, 3)
    # MWAIT qualification bit 0: monitoring hardware armed
    d = m.decide(ievent(Kind.MWAIT, 3, extra={"monitor_armed": True}))
    assert_exit(d, 36, "MWAIT_INSTRUCTION", 1, 3)
    assert_fault(m.decide(ievent(Kind.MWAIT, 3, regs_=regs(cpl=3))), 6)
    assert_fault(m.decide(ievent(Kind.MONITOR, 3, regs_=regs(cpl=3))), 6)


def test_pause_exiting(m):
    assert_no_exit(m.decide(ievent(Kind.PAUSE, 2)))
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_PAUSE)
    assert_exit(m.decide(ievent(Kind.PAUSE, 2, regs_=regs(cpl=3))), 40, "PAUSE_INSTRUCTION",
                length=2)


def test_pause_loop_exiting(m):
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY, SECONDARY_VM_EXEC_CONTROL=S_PLE,
          PLE_GAP=128, PLE_WINDOW=4096)

    def pause(tsc, state, cpl=0):
        return m.decide(ievent(Kind.PAUSE, 2, regs_=regs(tsc=tsc, cpl=cpl)), pause_loop=state)

    d = pause(1000, PauseLoop())                  # first PAUSE after VM entry
    assert_no_exit(d)
    assert d.pause_loop == PauseLoop(1000, 1000)
    state = d.pause_loop
    t = 1000
    while t - 1000 <= 4096:                       # PAUSEs 100 ticks apart: one loop
        t += 100
        d = pause(t, state)
        state = d.pause_loop
        if d.exit:
            break
    # exits on the first PAUSE more than PLE_WINDOW after the loop's first PAUSE
    assert_exit(d, 40, "PAUSE_INSTRUCTION", length=2)
    assert t == 1000 + 4100
    # a gap larger than PLE_GAP starts a new loop: no exit
    d = pause(1000 + 4100 + 200, PauseLoop(1000, 1000 + 4000))
    assert_no_exit(d)
    assert d.pause_loop == PauseLoop(5300, 5300)
    # at CPL 3 PAUSE-loop exiting is ignored
    assert_no_exit(pause(9999, PauseLoop(0, 9990), cpl=3))


def test_pause_loop_needs_tsc(m):
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY, SECONDARY_VM_EXEC_CONTROL=S_PLE)
    with pytest.raises(RuleInputError, match="tsc"):
        m.decide(ievent(Kind.PAUSE, 2))


# ===========================================================================
# Secondary controls
# ===========================================================================
def test_wbinvd_and_wbnoinvd(m):
    assert_no_exit(m.decide(ievent(Kind.WBINVD, 2)))
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY, SECONDARY_VM_EXEC_CONTROL=S_WBINVD)
    assert_exit(m.decide(ievent(Kind.WBINVD, 2)), 54, "WBINVD", length=2)
    assert_exit(m.decide(ievent(Kind.WBNOINVD, 3)), 54, "WBINVD", length=3)
    assert_fault(m.decide(ievent(Kind.WBINVD, 2, regs_=regs(cpl=3))), 13, 0)


def test_rdrand_rdseed(m):
    ev = ievent(Kind.RDRAND, 4, gpr=12, op_size=8)
    assert_no_exit(m.decide(ev))
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY, SECONDARY_VM_EXEC_CONTROL=S_RDRAND | S_RDSEED)
    # info: r12 in 6:3 (0x60), 64-bit operand size 2 in 12:11 (0x1000)
    assert_exit(m.decide(ev), 57, "RDRAND", 0, 4, 0x1060)
    assert_exit(m.decide(ievent(Kind.RDSEED, 3, gpr=RCX, op_size=4)), 61, "RDSEED", 0, 3, 0x808)


def test_umwait_tpause(m):
    ev = ievent(Kind.TPAUSE, 4, gpr=RCX, op_size=4)
    assert_fault(m.decide(ev), 6)                              # no enable user wait and pause
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY, SECONDARY_VM_EXEC_CONTROL=S_USR_WAIT)
    assert_no_exit(m.decide(ev))
    assert_no_exit(m.decide(ievent(Kind.UMONITOR, 4, gpr=RAX)))
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY | P_RDTSC)
    # TPAUSE ecx: 1 << 3 | 32-bit operand size 1 << 11
    assert_exit(m.decide(ev), 68, "TPAUSE", 0, 4, 0x808)
    assert_exit(m.decide(ievent(Kind.UMWAIT, 4, gpr=RDI, op_size=4)), 67, "UMWAIT", 0, 4, 0x838)


def test_invpcid(m):
    ev = ievent(Kind.INVPCID, 5, gpr=RDX, mem=mem(base=RAX, index=RCX, scale=8, disp=0x10))
    assert_fault(m.decide(ev), 6)                              # enable INVPCID = 0
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY, SECONDARY_VM_EXEC_CONTROL=S_INVPCID)
    assert_no_exit(m.decide(ev))                               # INVLPG exiting = 0
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY | P_INVLPG)
    # qualification = displacement 0x10; info worked out in test_exit_info: 0x20058103
    assert_exit(m.decide(ev), 58, "INVPCID", 0x10, 5, 0x20058103)
    assert_fault(m.decide(ievent(Kind.INVPCID, 5, gpr=RDX, regs_=regs(cpl=3),
                                 mem=mem(base=RAX))), 13, 0)


def test_xsaves_xrstors(m):
    r = regs(rax=0x300, rdx=0, xss=0x100)
    ev = ievent(Kind.XSAVES, 4, regs_=r, mem=mem(base=RDI))
    assert_fault(m.decide(ev), 6)                               # enable XSAVES/XRSTORS = 0
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY, SECONDARY_VM_EXEC_CONTROL=S_XSAVES,
          XSS_EXIT_BITMAP=0x200)
    assert_no_exit(m.decide(ev))                                # 0x300 & 0x100 & 0x200 = 0
    m.set(XSS_EXIT_BITMAP=0x100)
    # info: base rdi 7<<23, no index 1<<22, DS, 64-bit -> 0x03C18100
    assert_exit(m.decide(ev), 63, "XSAVES", 0, 4, 0x03C18100)
    ev = ievent(Kind.XRSTORS, 4, regs_=r, mem=mem(base=RDI, disp=0x40))
    assert_exit(m.decide(ev), 64, "XRSTORS", 0x40, 4, 0x03C18100)
    assert_fault(m.decide(ievent(Kind.XSAVES, 4, regs_=regs(cpl=3, xss=1),
                                 mem=mem(base=RDI))), 13, 0)


def test_descriptor_tables(m):
    lgdt = ievent(Kind.LGDT, 3, mem=mem(base=RBX), op_size=8)
    assert_no_exit(m.decide(lgdt))
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY, SECONDARY_VM_EXEC_CONTROL=S_DESC)
    assert_exit(m.decide(lgdt), 46, "GDTR_IDTR", 0, 3, 0x21C18100)
    # SGDT at CPL 3 without UMIP: the exit; with UMIP: #GP(0)
    sgdt = lambda r: ievent(Kind.SGDT, 3, regs_=r, mem=mem(base=RBX), op_size=8)
    # identity SGDT = 0: 0x01C18100
    assert_exit(m.decide(sgdt(regs(cpl=3))), 46, "GDTR_IDTR", 0, 3, 0x01C18100)
    assert_fault(m.decide(sgdt(regs(cpl=3, cr4=REGS64["cr4"] | 1 << 11))), 13, 0)
    assert_fault(m.decide(ievent(Kind.LGDT, 3, regs_=regs(cpl=3), mem=mem(base=RBX))), 13, 0)
    # STR r9 (register form): 9<<3 | bit 10 | identity 1<<28
    assert_exit(m.decide(ievent(Kind.STR, 4, gpr=9)), 47, "LDTR_TR", 0, 4, 0x10000448)
    # LLDT in real-address mode: #UD
    assert_fault(m.decide(ievent(Kind.LLDT, 3, gpr=RAX, regs_=regs(cr0=0x10, mode=16, efer=0))),
                 6)


# ===========================================================================
# Control registers
# ===========================================================================
def mov_to_cr(cr, gpr=RAX, **r):
    return ievent(Kind.MOV_TO_CR, 3, cr=cr, gpr=gpr, regs_=regs(**r))


def mov_from_cr(cr, gpr=RAX, **r):
    return ievent(Kind.MOV_FROM_CR, 3, cr=cr, gpr=gpr, regs_=regs(**r))


def test_mov_to_cr0_mask_and_shadow(m):
    m.set(CR0_GUEST_HOST_MASK=0xFFFFFFFFFFFFFFF7, CR0_READ_SHADOW=0x80050033)  # all but TS
    assert_no_exit(m.decide(mov_to_cr(0, rax=0x80050033)))
    assert_no_exit(m.decide(mov_to_cr(0, rax=0x8005003B)))   # only TS differs: TS not masked
    # MOV CR0, RBX: qualification 0 | 0<<4 | 3<<8
    d = m.decide(mov_to_cr(0, RBX, rbx=0x80050031))          # MP cleared: masked bit differs
    assert_exit(d, 28, "CR_ACCESS", 0x300, 3)
    # a masked bit above 31 differing also exits (the instruction would then #GP)
    assert_exit(m.decide(mov_to_cr(0, rax=0x80050033 | 1 << 40)), 28, "CR_ACCESS", 0x000, 3)


def test_mov_to_cr4_mask_and_shadow(m):
    m.set(CR4_GUEST_HOST_MASK=1 << 13, CR4_READ_SHADOW=0)     # VMXE owned by the host
    assert_no_exit(m.decide(mov_to_cr(4, rax=0x20)))          # VMXE=0 matches the shadow
    assert_exit(m.decide(mov_to_cr(4, rax=0x2020)), 28, "CR_ACCESS", 0x004, 3)


def test_mov_to_cr3_and_targets(m):
    assert_no_exit(m.decide(mov_to_cr(3, rax=0x5000)))        # CR3-load exiting = 0
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_CR3_LOAD)
    assert_exit(m.decide(mov_to_cr(3, rax=0x5000)), 28, "CR_ACCESS", 0x003, 3)   # count 0
    m.set(CR3_TARGET_COUNT=3, CR3_TARGET_VALUE0=0x1000, CR3_TARGET_VALUE1=0x2000,
          CR3_TARGET_VALUE2=0x5000, CR3_TARGET_VALUE3=0x9000)
    assert_no_exit(m.decide(mov_to_cr(3, rax=0x5000)))        # equals target 2
    # target 3 is beyond CR3_TARGET_COUNT: not considered
    assert_exit(m.decide(mov_to_cr(3, RCX, rcx=0x9000)), 28, "CR_ACCESS", 0x103, 3)
    m.set(CR3_TARGET_COUNT=4)
    assert_no_exit(m.decide(mov_to_cr(3, RCX, rcx=0x9000)))   # now target 3 counts
    assert_exit(m.decide(mov_to_cr(3, rax=0x7000)), 28, "CR_ACCESS", 0x003, 3)
    m.set(CR3_TARGET_COUNT=5)
    with pytest.raises(RuleInputError):
        m.decide(mov_to_cr(3, rax=0x5000))


def test_mov_from_cr3_and_cr8(m):
    assert_no_exit(m.decide(mov_from_cr(3)))
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_CR3_STORE | P_CR8_STORE)
    assert_exit(m.decide(mov_from_cr(3, RDX)), 28, "CR_ACCESS", 0x213, 3)   # 3|1<<4|2<<8
    assert_exit(m.decide(mov_from_cr(8, 10)), 28, "CR_ACCESS", 0xA18, 3)    # 8|1<<4|10<<8
    assert_no_exit(m.decide(mov_from_cr(0)))                  # reads the shadow, never exits
    assert_no_exit(m.decide(mov_from_cr(4)))


def test_mov_to_cr8(m):
    assert_no_exit(m.decide(mov_to_cr(8, rax=5)))
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_CR8_LOAD)
    assert_exit(m.decide(mov_to_cr(8, rax=5)), 28, "CR_ACCESS", 0x008, 3)


def test_mov_to_cr8_tpr_shadow_below_threshold(m):
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_TPR_SHADOW, TPR_THRESHOLD=3)
    # new VTPR[7:4] = 2 < threshold 3: trap-like exit 43 after the write
    d = m.decide(mov_to_cr(8, rax=2))
    assert_exit(d, 43, "TPR_BELOW_THRESHOLD", 0, None)
    assert d.timing is Timing.TRAP
    assert_no_exit(m.decide(mov_to_cr(8, rax=3)))
    assert_fault(m.decide(mov_to_cr(8, rax=0x10)), 13, 0)      # bits 63:4 reserved


def test_cr_number_and_privilege_faults(m):
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_CR3_LOAD)
    assert_fault(m.decide(mov_to_cr(1)), 6)
    assert_fault(m.decide(mov_to_cr(5)), 6)
    assert_fault(m.decide(mov_to_cr(8, mode=32, efer=0)), 6)   # CR8 outside 64-bit mode
    assert_fault(m.decide(mov_to_cr(3, cpl=3)), 13, 0)
    assert_no_exit(m.decide(mov_to_cr(2, rax=0x1234)))         # CR2 never exits


def test_clts(m):
    clts = ievent(Kind.CLTS, 2)
    m.set(CR0_GUEST_HOST_MASK=0x8, CR0_READ_SHADOW=0x8)
    assert_exit(m.decide(clts), 28, "CR_ACCESS", 0x20, 2)      # type 2 in 5:4
    m.set(CR0_READ_SHADOW=0)
    assert_no_exit(m.decide(clts))
    m.set(CR0_GUEST_HOST_MASK=0, CR0_READ_SHADOW=0x8)
    assert_no_exit(m.decide(clts))
    assert_fault(m.decide(ievent(Kind.CLTS, 2, regs_=regs(cpl=3))), 13, 0)


def test_lmsw(m):
    def lmsw(src):
        return ievent(Kind.LMSW, 3, gpr=RAX, regs_=regs(rax=src))

    m.set(CR0_GUEST_HOST_MASK=0x1, CR0_READ_SHADOW=0x0)
    # PE masked, set in the source, clear in the shadow: type 3 (0x30), source in 31:16
    assert_exit(m.decide(lmsw(0x1)), 28, "CR_ACCESS", 0x00010030, 3)
    m.set(CR0_READ_SHADOW=0x1)
    assert_no_exit(m.decide(lmsw(0x0)))                        # LMSW cannot clear PE
    m.set(CR0_GUEST_HOST_MASK=0x8, CR0_READ_SHADOW=0x0)
    m.set(CR0_GUEST_HOST_MASK=0x1, CR0_READ_SHADOW=0x1)
    assert_no_exit(m.decide(lmsw(0x1)))                        # PE already set in the shadow
    m.set(CR0_GUEST_HOST_MASK=0x8, CR0_READ_SHADOW=0x0)
    assert_exit(m.decide(lmsw(0x8)), 28, "CR_ACCESS", 0x00080030, 3)   # TS differs
    assert_no_exit(m.decide(lmsw(0x6)))                        # MP/EM not masked
    # memory operand: bit 6 set, guest-linear address recorded
    ev = ievent(Kind.LMSW, 4, mem=mem(base=RBX, size=2), linear=0x7000,
                extra={"lmsw_source": 0x8})
    d = m.decide(ev)
    assert_exit(d, 28, "CR_ACCESS", 0x00080070, 4)
    assert d.guest_linear_address == 0x7000


# ===========================================================================
# Debug registers
# ===========================================================================
def mov_dr(kind, dr, gpr=RAX, **r):
    return ievent(kind, 3, dr=dr, gpr=gpr, regs_=regs(dr7=0x400, **r))


def test_mov_dr_exiting(m):
    assert_no_exit(m.decide(mov_dr(Kind.MOV_TO_DR, 7)))
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_MOV_DR)
    assert_exit(m.decide(mov_dr(Kind.MOV_TO_DR, 7)), 29, "DR_ACCESS", 0x007, 3)
    assert_exit(m.decide(mov_dr(Kind.MOV_FROM_DR, 6, 15)), 29, "DR_ACCESS", 0xF16, 3)


def test_mov_dr_exit_has_priority_over_cpl_and_dr4(m):
    # SDM: MOV-DR exits take priority over the CPL #GP and the CR4.DE DR4/DR5 #UD
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_MOV_DR)
    assert_exit(m.decide(mov_dr(Kind.MOV_TO_DR, 7, cpl=3)), 29, "DR_ACCESS", 0x007, 3)
    d = m.decide(mov_dr(Kind.MOV_FROM_DR, 4, cr4=REGS64["cr4"] | 1 << 3))
    assert_exit(d, 29, "DR_ACCESS", 0x014, 3)


def test_mov_dr_faults_without_exiting(m):
    assert_fault(m.decide(mov_dr(Kind.MOV_TO_DR, 7, cpl=3)), 13, 0)
    assert_fault(m.decide(mov_dr(Kind.MOV_TO_DR, 5, cr4=REGS64["cr4"] | 1 << 3)), 6)
    assert_no_exit(m.decide(mov_dr(Kind.MOV_TO_DR, 5)))        # CR4.DE=0: DR5 aliases DR7
    ev = ievent(Kind.MOV_TO_DR, 3, dr=0, gpr=RAX, regs_=regs(dr7=0x2400))   # DR7.GD
    assert_fault(m.decide(ev), 1)


# ===========================================================================
# I/O instructions
# ===========================================================================
def out_dx(port, size=1, **r):
    return ievent(Kind.OUT, 1, io_size=size, port=port, regs_=regs(**r))


def test_io_unconditional(m):
    assert_no_exit(m.decide(out_dx(0x3F8)))
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_UNCOND_IO)
    assert_exit(m.decide(out_dx(0x3F8)), 30, "IO_INSTRUCTION", 0x03F80000, 1)
    # IN eax, 0x71 (immediate): size 4 -> 3, IN bit 3, immediate bit 6
    ev = Event(Kind.IN, 0, 0x401000, Insn(Kind.IN, 2, "in eax, 0x71", port=0x71, io_size=4),
               port=0x71, regs=regs())
    assert_exit(m.decide(ev), 30, "IO_INSTRUCTION", 0x0071004B, 2)


def test_io_bitmaps(m):
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_IO_BITMAPS | P_UNCOND_IO)
    assert_no_exit(m.decide(out_dx(0x3F8)))                    # bitmaps win over unconditional
    m.bit(IO_A, 0x3F9)
    assert_no_exit(m.decide(out_dx(0x3F8)))
    # a 2-byte access covers 0x3F8 and 0x3F9: size 2 -> 1
    assert_exit(m.decide(out_dx(0x3F8, 2)), 30, "IO_INSTRUCTION", 0x03F80001, 1)
    m.bit(IO_B, 0x8000 - 0x8000)                               # port 0x8000 in bitmap B
    assert_exit(m.decide(out_dx(0x8000)), 30, "IO_INSTRUCTION", 0x80000000, 1)
    # crossing from bitmap A into bitmap B
    assert_exit(m.decide(out_dx(0x7FFF, 2)), 30, "IO_INSTRUCTION", 0x7FFF0001, 1)
    assert_no_exit(m.decide(out_dx(0x7FFE, 1)))
    # wrap past 0xFFFF always exits; 4-byte size code is 3
    assert_exit(m.decide(out_dx(0xFFFE, 4)), 30, "IO_INSTRUCTION", 0xFFFE0003, 1)


def test_io_wrap_exits_with_empty_bitmaps(m):
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_IO_BITMAPS)
    assert_no_exit(m.decide(out_dx(0xFFFF, 1)))
    assert_no_exit(m.decide(out_dx(0xFFFC, 4)))                # ends exactly at 0xFFFF
    assert_exit(m.decide(out_dx(0xFFFF, 2)), 30, "IO_INSTRUCTION", 0xFFFF0001, 1)
    assert_exit(m.decide(out_dx(0xFFFD, 4)), 30, "IO_INSTRUCTION", 0xFFFD0003, 1)


def test_io_string_info_and_linear_address(m):
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_UNCOND_IO)
    ev = ievent(Kind.OUTS, 2, io_size=1, rep=True, port=0x3F8, linear=0x9000, addr_size=8,
                mem=mem(base=RSI, size=1))
    d = m.decide(ev)
    # string 0x10, REP 0x20; info: DS 3<<15 | 64-bit 2<<7
    assert_exit(d, 30, "IO_INSTRUCTION", 0x03F80030, 2, 0x18100)
    assert d.guest_linear_address == 0x9000


def test_io_permission_fault_comes_first(m):
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_UNCOND_IO)
    denied = out_dx(0x3F8, cpl=3)
    denied.extra["io_permitted"] = False
    assert_fault(m.decide(denied), 13, 0)
    allowed = out_dx(0x3F8, cpl=3)
    allowed.extra["io_permitted"] = True
    assert_exit(m.decide(allowed), 30, "IO_INSTRUCTION", 0x03F80000, 1)
    # CPL 3 > IOPL 2: the TSS decides
    with pytest.raises(RuleInputError, match="io_permitted"):
        m.decide(out_dx(0x3F8, cpl=3, rflags=0x2002))
    # IOPL 3 allows CPL 3 without consulting the TSS
    assert_exit(m.decide(out_dx(0x3F8, cpl=3, rflags=0x3002)), 30, "IO_INSTRUCTION",
                0x03F80000, 1)
    with pytest.raises(RuleInputError, match="io_permitted"):
        m.decide(out_dx(0x3F8, cpl=3))


# ===========================================================================
# MSRs
# ===========================================================================
def msr(kind, ecx, **r):
    return ievent(kind, 2, regs_=regs(rcx=ecx, **r))


def test_msr_without_bitmaps_always_exits(m):
    assert_exit(m.decide(msr(Kind.RDMSR, 0x10)), 31, "MSR_READ", length=2)
    assert_exit(m.decide(msr(Kind.WRMSR, 0x6E0)), 32, "MSR_WRITE", length=2)


def test_msr_bitmap_quarters(m):
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_MSR_BITMAPS)
    assert_no_exit(m.decide(msr(Kind.RDMSR, 0x10)))
    # read-low at offset 0, read-high at 0x400, write-low at 0x800, write-high at 0xC00
    m.bit(MSR_BM + 0x000, 0x10)
    m.bit(MSR_BM + 0x400, 0x80)          # IA32_EFER 0xC0000080, read
    m.bit(MSR_BM + 0x800, 0x6E0)         # TSC_DEADLINE, write
    m.bit(MSR_BM + 0xC00, 0x102)         # KERNEL_GS_BASE 0xC0000102, write
    d = m.decide(msr(Kind.RDMSR, 0x10))
    assert_exit(d, 31, "MSR_READ", length=2)
    assert d.cause == ("CPU_BASED_USE_MSR_BITMAPS=1", "MSR bitmap read-low bit 0x10=1")
    assert_no_exit(m.decide(msr(Kind.WRMSR, 0x10)))
    assert_exit(m.decide(msr(Kind.RDMSR, 0xC0000080)), 31, "MSR_READ", length=2)
    assert_no_exit(m.decide(msr(Kind.WRMSR, 0xC0000080)))
    assert_exit(m.decide(msr(Kind.WRMSR, 0x6E0)), 32, "MSR_WRITE", length=2)
    assert_no_exit(m.decide(msr(Kind.RDMSR, 0x6E0)))
    assert_exit(m.decide(msr(Kind.WRMSR, 0xC0000102)), 32, "MSR_WRITE", length=2)
    assert_no_exit(m.decide(msr(Kind.RDMSR, 0xC0000102)))


def test_msr_out_of_bitmap_range_always_exits(m):
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_MSR_BITMAPS)
    for ecx in (0x2000, 0x4B564DBC, 0xC0002000, 0xBFFFFFFF):
        assert_exit(m.decide(msr(Kind.RDMSR, ecx)), 31, "MSR_READ", length=2)
        assert_exit(m.decide(msr(Kind.WRMSR, ecx)), 32, "MSR_WRITE", length=2)


def test_msr_uses_ecx_only_and_cpl3_faults(m):
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_MSR_BITMAPS)
    assert_no_exit(m.decide(msr(Kind.RDMSR, 0xFFFFFFFF_00000010)))   # RCX high half ignored
    assert_fault(m.decide(msr(Kind.RDMSR, 0x10, cpl=3)), 13, 0)


# ===========================================================================
# Exceptions, NMI, interrupts, INIT, SIPI, triple fault, task switch
# ===========================================================================
def exc(vector, error_code=None, cr2=None, insn=None, **r):
    return Event(Kind.EXCEPTION, 0, 0x401000, insn, vector=vector, error_code=error_code,
                 cr2=cr2, regs=regs(**r))


def test_exception_bitmap(m):
    assert_no_exit(m.decide(exc(6)))
    m.set(EXCEPTION_BITMAP=1 << 6 | 1 << 13)
    d = m.decide(exc(6))
    # #UD: vector 6, type 3, valid -> 0x80000306; instruction length undefined for faults
    assert_exit(d, 0, "EXCEPTION_NMI", 0, None)
    assert d.interruption_info == 0x80000306
    d = m.decide(exc(13, error_code=0x10))
    assert d.interruption_info == 0x80000B0D and d.error_code == 0x10
    # real-address mode: no error code
    d = m.decide(exc(13, error_code=0, cr0=0x10, mode=16, efer=0))
    assert d.interruption_info == 0x8000030D and d.error_code is None


@pytest.mark.parametrize("bit14,pfec,mask,match,exits", [
    # SDM: with bit 14 = 1 a #PF exits iff (PFEC & mask) == match; with 0, iff not
    (1, 0x2, 0x0, 0x0, True),      # mask 0 match 0: every #PF with bit 14 set
    (0, 0x2, 0x0, 0x0, False),     # ... and none with bit 14 clear
    (1, 0x3, 0x1, 0x1, True),      # present-bit faults only
    (1, 0x2, 0x1, 0x1, False),
    (0, 0x2, 0x1, 0x1, True),      # not-present faults exit with bit 14 clear
    (0, 0x3, 0x1, 0x1, False),
    (1, 0x0, 0x0, 0xFFFFFFFF, False),   # match not reachable under mask: never
    (0, 0x0, 0x0, 0xFFFFFFFF, True),    # ... so with bit 14 clear: always
])
def test_page_fault_mask_and_match(m, bit14, pfec, mask, match, exits):
    m.set(EXCEPTION_BITMAP=bit14 << 14, PAGE_FAULT_ERROR_CODE_MASK=mask,
          PAGE_FAULT_ERROR_CODE_MATCH=match)
    d = m.decide(exc(14, error_code=pfec, cr2=0xDEAD000))
    if exits:
        # qualification = faulting linear address; info 14 | 3<<8 | EC | valid
        assert_exit(d, 0, "EXCEPTION_NMI", 0xDEAD000, None)
        assert d.interruption_info == 0x80000B0E and d.error_code == pfec
    else:
        assert_no_exit(d)


def test_debug_exception_qualification(m):
    m.set(EXCEPTION_BITMAP=1 << 1)
    ev = exc(1)
    ev.extra["dr6"] = 0xFFFF4FF1          # single step + B0
    d = m.decide(ev)
    assert_exit(d, 0, "EXCEPTION_NMI", 0x4001, None)
    assert d.interruption_info == 0x80000301


def test_software_exceptions_have_length_and_type(m):
    m.set(EXCEPTION_BITMAP=1 << 3 | 1 << 1 | 1 << 4)
    d = m.decide(ievent(Kind.INT3, 1))
    assert_exit(d, 0, "EXCEPTION_NMI", 0, 1)
    assert d.interruption_info == 0x80000603       # type 6 software exception
    d = m.decide(ievent(Kind.INT1, 1))
    assert_exit(d, 0, "EXCEPTION_NMI", 0, 1)
    assert d.interruption_info == 0x80000501       # type 5 privileged software exception
    # an EXCEPTION event raised by INT3 is the same software exception
    d = m.decide(exc(3, insn=Insn(Kind.INT3, 1, "int3")))
    assert d.interruption_info == 0x80000603 and d.instruction_length == 1
    # INTO: #UD in 64-bit mode, nothing when OF=0, #OF (type 6) when OF=1 in 32-bit mode
    assert_fault(m.decide(ievent(Kind.INTO, 1)), 6)
    assert_no_exit(m.decide(ievent(Kind.INTO, 1, regs_=regs(mode=32, efer=0))))
    d = m.decide(ievent(Kind.INTO, 1, regs_=regs(mode=32, efer=0, rflags=0x802)))
    assert d.interruption_info == 0x80000604 and d.instruction_length == 1


def test_fault_during_software_interrupt_delivery_has_length(m):
    # SDM: the instruction length is defined for exits due to faults during
    # delivery of a software interrupt (INT 0x80 through a gate with DPL < CPL)
    m.set(EXCEPTION_BITMAP=1 << 13)
    d = m.decide(exc(13, error_code=0x402, insn=Insn(Kind.INT, 2, "int 0x80", vector=0x80),
                     cpl=3))
    assert_exit(d, 0, "EXCEPTION_NMI", 0, 2)
    assert d.interruption_info == 0x80000B0D and d.error_code == 0x402
    # a #GP from an ordinary instruction: undefined
    d = m.decide(exc(13, error_code=0, insn=Insn(Kind.WRMSR, 2, "wrmsr")))
    assert d.instruction_length is None


def test_exception_nmi_unblocking_due_to_iret(m):
    m.set(EXCEPTION_BITMAP=1 << 13)
    ev = exc(13, error_code=0)
    ev.extra["iret_unblocked_nmi"] = True
    assert m.decide(ev).interruption_info == 0x80001B0D       # bit 12 set (NMI exiting = 0)
    m.set(PIN_BASED_VM_EXEC_CONTROL=0x16 | PIN_NMI)           # NMI exiting, no virtual NMIs
    assert m.decide(ev).interruption_info == 0x80000B0D


def test_nmi(m):
    nmi = Event(Kind.NMI, 0, 0x401000, regs=regs())
    assert_no_exit(m.decide(nmi))
    m.set(PIN_BASED_VM_EXEC_CONTROL=0x16 | PIN_NMI)
    d = m.decide(nmi)
    assert_exit(d, 0, "EXCEPTION_NMI", 0, None)
    assert d.interruption_info == 0x80000202


def test_external_interrupt(m):
    intr = Event(Kind.INTERRUPT, 0, 0x401000, vector=0xEC, regs=regs())
    assert_no_exit(m.decide(intr))
    m.set(PIN_BASED_VM_EXEC_CONTROL=0x16 | PIN_EXT_INTR)
    d = m.decide(intr)
    assert_exit(d, 1, "EXTERNAL_INTERRUPT", 0, None)
    assert d.interruption_info == 0                            # not acknowledged
    m.set(VM_EXIT_CONTROLS=m.vmcs.get("VM_EXIT_CONTROLS") | EXIT_ACK_INTR)
    assert m.decide(intr).interruption_info == 0x800000EC


def test_posted_interrupt_notification_vector_does_not_exit():
    v = DictVmcs(PIN_BASED_VM_EXEC_CONTROL=PIN_EXT_INTR | 1 << 7, VM_EXIT_CONTROLS=EXIT_ACK_INTR,
                 POSTED_INTR_NV=0xF2)
    assert_no_exit(rules.decide(Event(Kind.INTERRUPT, 0, 0, vector=0xF2, regs=regs()), v, None))
    d = rules.decide(Event(Kind.INTERRUPT, 0, 0, vector=0xF1, regs=regs()), v, None)
    assert d.interruption_info == 0x800000F1


def test_init_sipi_triple_fault(m):
    assert_exit(m.decide(Event(Kind.INIT, 0, 0, regs=regs())), 3, "INIT_SIGNAL")
    sipi = lambda state: Event(Kind.SIPI, 0, 0, vector=0x9F, regs=regs(activity_state=state))
    assert_exit(m.decide(sipi(3)), 4, "SIPI_SIGNAL", 0x9F)     # wait-for-SIPI
    assert_no_exit(m.decide(sipi(0)))
    assert_exit(m.decide(Event(Kind.TRIPLE_FAULT, 0, 0, regs=regs())), 2, "TRIPLE_FAULT")


def test_task_switch(m):
    ev = Event(Kind.TASK_SWITCH, 0, 0x401000, Insn(Kind.TASK_SWITCH, 7, "ljmp 0x28:0"),
               regs=regs(mode=32, efer=0), extra={"tss_selector": 0x28, "task_switch_source": "JMP"})
    assert_exit(m.decide(ev), 9, "TASK_SWITCH", 0x80000028, 7)
    ev = Event(Kind.TASK_SWITCH, 0, 0x401000, regs=regs(mode=32, efer=0),
               extra={"tss_selector": 0x30, "task_switch_source": "IDT"})
    assert_exit(m.decide(ev), 9, "TASK_SWITCH", 0xC0000030, None)


# ===========================================================================
# APIC accesses
# ===========================================================================
def apic(access, offset, value=None, size=4):
    extra = {"gpa": APIC_PAGE + offset, "access": access, "size": size}
    if value is not None:
        extra["value"] = value
    return Event(Kind.APIC_ACCESS, 0, 0x401000, Insn(Kind.APIC_ACCESS, 6, "mov"),
                 linear=0xFEE00000 + offset, regs=regs(), extra=extra)


def test_apic_access(m):
    assert_no_exit(m.decide(apic("read", 0x300)))              # not virtualized
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY, SECONDARY_VM_EXEC_CONTROL=S_VIRT_APIC,
          APIC_ACCESS_ADDR=APIC_PAGE)
    d = m.decide(apic("read", 0x300))
    assert_exit(d, 44, "APIC_ACCESS", 0x0300, None)            # type 0 linear read
    assert d.guest_physical_address == APIC_PAGE + 0x300
    assert_exit(m.decide(apic("write", 0x0B0, 0)), 44, "APIC_ACCESS", 0x10B0, None)
    assert_exit(m.decide(apic("fetch", 0x010)), 44, "APIC_ACCESS", 0x2010, None)
    # TPR access without TPR shadow exits
    assert_exit(m.decide(apic("read", 0x080)), 44, "APIC_ACCESS", 0x0080, None)
    other = apic("read", 0x300)
    other.extra["gpa"] = APIC_PAGE + 0x1000 + 0x300
    assert_no_exit(m.decide(other))                            # not the APIC-access page


def test_apic_tpr_virtualization(m):
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY | P_TPR_SHADOW,
          SECONDARY_VM_EXEC_CONTROL=S_VIRT_APIC, APIC_ACCESS_ADDR=APIC_PAGE, TPR_THRESHOLD=4)
    assert_no_exit(m.decide(apic("read", 0x080)))              # virtualized read
    assert_no_exit(m.decide(apic("write", 0x080, 0x50)))       # VTPR 0x50: 5 >= 4
    d = m.decide(apic("write", 0x080, 0x30))                   # VTPR[7:4]=3 < 4
    assert_exit(d, 43, "TPR_BELOW_THRESHOLD", 0, None)
    assert d.timing is Timing.TRAP
    assert_exit(m.decide(apic("read", 0x300)), 44, "APIC_ACCESS", 0x0300, None)


def test_apic_register_virtualization_is_refused():
    v = DictVmcs(CPU_BASED_VM_EXEC_CONTROL=P_SECONDARY,
                 SECONDARY_VM_EXEC_CONTROL=S_VIRT_APIC | S_APIC_REG_VIRT, APIC_ACCESS_ADDR=APIC_PAGE)
    with pytest.raises(RuleInputError):
        rules.decide(apic("read", 0x300), v, None)


# ===========================================================================
# Boundary exits: MTF, preemption timer, NMI window, interrupt window
# ===========================================================================
def test_interrupt_window(m):
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_INTR_WINDOW)
    d = rules.boundary_exit(m.vmcs, rflags=0x202, interruptibility=0)
    assert_exit(d, 7, "INTERRUPT_WINDOW")
    assert_no_exit(rules.boundary_exit(m.vmcs, rflags=0x002, interruptibility=0))   # IF=0
    assert_no_exit(rules.boundary_exit(m.vmcs, rflags=0x202, interruptibility=1))   # STI
    assert_no_exit(rules.boundary_exit(m.vmcs, rflags=0x202, interruptibility=2))   # MOV SS
    m.set(CPU_BASED_VM_EXEC_CONTROL=0)
    assert_no_exit(rules.boundary_exit(m.vmcs, rflags=0x202, interruptibility=0))


def test_nmi_window(m):
    m.set(PIN_BASED_VM_EXEC_CONTROL=0x16 | PIN_NMI | PIN_VIRTUAL_NMIS,
          CPU_BASED_VM_EXEC_CONTROL=P_NMI_WINDOW | P_INTR_WINDOW)
    # NMI window has priority over the interrupt window
    assert_exit(rules.boundary_exit(m.vmcs, rflags=0x202, interruptibility=0), 8, "NMI_WINDOW")
    # virtual-NMI blocking (bit 3): the interrupt window comes next
    assert_exit(rules.boundary_exit(m.vmcs, rflags=0x202, interruptibility=8), 7,
                "INTERRUPT_WINDOW")
    assert_no_exit(rules.boundary_exit(m.vmcs, rflags=0x202, interruptibility=2))


def test_mtf_and_preemption_timer_priority(m):
    m.set(PIN_BASED_VM_EXEC_CONTROL=0x16 | PIN_PREEMPTION_TIMER | PIN_NMI | PIN_VIRTUAL_NMIS,
          CPU_BASED_VM_EXEC_CONTROL=P_NMI_WINDOW)
    kw = dict(rflags=0x202, interruptibility=0)
    d = rules.boundary_exit(m.vmcs, mtf_pending=True, preemption_timer_expired=True, **kw)
    assert_exit(d, 37, "MONITOR_TRAP_FLAG")
    assert d.timing is Timing.TRAP
    d = rules.boundary_exit(m.vmcs, preemption_timer_expired=True, **kw)
    assert_exit(d, 52, "PREEMPTION_TIMER")
    assert_exit(rules.boundary_exit(m.vmcs, **kw), 8, "NMI_WINDOW")
    # wait-for-SIPI: no boundary exits at all
    assert_no_exit(rules.boundary_exit(m.vmcs, activity_state=3, mtf_pending=True, **kw))


# ===========================================================================
# Instructions that never exit, AMD instructions, bad input
# ===========================================================================
@pytest.mark.parametrize("kind", [Kind.IRET, Kind.STI, Kind.CLI, Kind.PUSHF, Kind.POPF,
                                  Kind.MOV_SS, Kind.POP_SS, Kind.SMSW, Kind.INT,
                                  Kind.MARKER_BEGIN, Kind.MARKER_END, Kind.ENCLU])
def test_never_exits_even_with_every_control_on(m, kind):
    m.set(CPU_BASED_VM_EXEC_CONTROL=0xFFF9FFFE, PIN_BASED_VM_EXEC_CONTROL=0x7F,
          EXCEPTION_BITMAP=0xFFFFFFFF)
    assert_no_exit(m.decide(ievent(kind, 2)))


@pytest.mark.parametrize("kind", [Kind.VMRUN, Kind.VMMCALL, Kind.VMLOAD, Kind.VMSAVE, Kind.STGI,
                                  Kind.CLGI, Kind.SKINIT, Kind.INVLPGA, Kind.RDPRU, Kind.MONITORX,
                                  Kind.MWAITX, Kind.INVLPGB, Kind.TLBSYNC, Kind.MCOMMIT,
                                  Kind.UD2, Kind.RSM])
def test_invalid_opcodes(m, kind):
    assert_fault(m.decide(ievent(kind, 3)), 6)


def test_missing_guest_state_is_a_clear_error(m):
    ev = Event(Kind.HLT, 0, 0, Insn(Kind.HLT, 1, "hlt"), regs={})
    with pytest.raises(RuleInputError, match="cpl"):
        m.decide(ev)
    m.set(CPU_BASED_VM_EXEC_CONTROL=P_INVLPG)
    with pytest.raises(RuleInputError, match="linear"):
        m.decide(ievent(Kind.INVLPG, 3, mem=mem(base=RAX)))


def test_exit_decision_for_ept_violation():
    d = rules.exit_decision("EPT_VIOLATION", ("EPT entry not present",), qualification=0x181,
                            guest_physical_address=0x5000, guest_linear_address=0x7000)
    assert (d.exit, d.reason, d.name, d.qualification) == (True, 48, "EPT_VIOLATION", 0x181)
    assert d.timing is Timing.FAULT


def test_decisions_are_frozen(m):
    d = m.decide(ievent(Kind.CPUID, 2))
    with pytest.raises(Exception):
        d.exit = False
