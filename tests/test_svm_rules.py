"""SVM intercept rules, stated from AMD APM Vol. 2 chapter 15 and Appendix C.

Each test writes the expected exit code, EXITINFO1/2 and nRIP from the APM's
text (the tables in the test are written from the APM, not from the code)."""
import pytest

from devirt_emu.events import Event, Insn, Kind, MemOperand
from devirt_emu.svm import rules as R
from devirt_emu.svm.intercepts import TABLE as BITS, words_from_names
from devirt_emu.svm.vmcb import INTERCEPT_WORDS

RIP = 0x100000
MSRPM, IOPM = 0x10000, 0x20000
ALL = [n for n in BITS]


class Vmcb(dict):
    def get(self, name):
        return dict.get(self, name, 0)


def vmcb(*names, **fields):
    v = Vmcb(msrpm_base_pa=MSRPM, iopm_base_pa=IOPM)
    for w, val in zip(INTERCEPT_WORDS, words_from_names(names)):
        v[w] = val
    v.update(fields)
    return v


class Mem:
    def __init__(self):
        self.b = bytearray(0x30000)

    def __call__(self, pa, n):
        return bytes(self.b[pa:pa + n])

    def set_bit(self, base, bit):
        self.b[base + bit // 8] |= 1 << (bit % 8)


def regs(**kw):
    r = {n: 0 for n in ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9",
                        "r10", "r11", "r12", "r13", "r14", "r15")}
    r.update(rflags=0x202, cr0=0x80010033, cr4=0x40620, efer=0x1D00, cpl=0, mode=64)
    r.update(kw)
    return r


def ev(kind, length=2, regs_=None, **insn_kw):
    ev_keys = ("linear", "port", "error_code", "cr2", "extra") + (() if kind is Kind.INT
                                                                  else ("vector",))
    ev_kw = {k: insn_kw.pop(k) for k in ev_keys if k in insn_kw}
    if kind in (Kind.EXCEPTION, Kind.INTERRUPT, Kind.NMI, Kind.INIT, Kind.TRIPLE_FAULT,
                Kind.TASK_SWITCH):
        insn = None
    else:
        insn = Insn(kind, length, kind.value.lower(), **insn_kw)
    return Event(kind, 0, RIP, insn, regs=regs_ or regs(), **ev_kw)


def decide(e, v, mem=None, **kw):
    return R.decide(e, v, mem or Mem(), **kw)


# (kind, intercept, exit code, length): the instruction intercepts with no EXITINFO
SIMPLE = [
    (Kind.CPUID, "INTERCEPT_CPUID", 0x72, 2), (Kind.HLT, "INTERCEPT_HLT", 0x78, 1),
    (Kind.RDTSC, "INTERCEPT_RDTSC", 0x6E, 2), (Kind.RDTSCP, "INTERCEPT_RDTSCP", 0x87, 3),
    (Kind.RDPMC, "INTERCEPT_RDPMC", 0x6F, 2), (Kind.PUSHF, "INTERCEPT_PUSHF", 0x70, 1),
    (Kind.POPF, "INTERCEPT_POPF", 0x71, 1), (Kind.IRET, "INTERCEPT_IRET", 0x74, 2),
    (Kind.INVD, "INTERCEPT_INVD", 0x76, 2), (Kind.WBINVD, "INTERCEPT_WBINVD", 0x89, 2),
    (Kind.MONITOR, "INTERCEPT_MONITOR", 0x8A, 3), (Kind.MWAIT, "INTERCEPT_MWAIT", 0x8B, 3),
    (Kind.XSETBV, "INTERCEPT_XSETBV", 0x8D, 3), (Kind.RDPRU, "INTERCEPT_RDPRU", 0x8E, 3),
    (Kind.VMRUN, "INTERCEPT_VMRUN", 0x80, 3), (Kind.VMMCALL, "INTERCEPT_VMMCALL", 0x81, 3),
    (Kind.VMLOAD, "INTERCEPT_VMLOAD", 0x82, 3), (Kind.VMSAVE, "INTERCEPT_VMSAVE", 0x83, 3),
    (Kind.STGI, "INTERCEPT_STGI", 0x84, 3), (Kind.CLGI, "INTERCEPT_CLGI", 0x85, 3),
    (Kind.SKINIT, "INTERCEPT_SKINIT", 0x86, 3), (Kind.INVLPGA, "INTERCEPT_INVLPGA", 0x7A, 3),
    (Kind.INT1, "INTERCEPT_ICEBP", 0x88, 1), (Kind.INVLPGB, "INTERCEPT_INVLPGB", 0xA0, 3),
    (Kind.TLBSYNC, "INTERCEPT_TLBSYNC", 0xA4, 3), (Kind.INVPCID, "INTERCEPT_INVPCID", 0xA2, 5),
    (Kind.MCOMMIT, "INTERCEPT_MCOMMIT", 0xA3, 4),
    (Kind.SIDT, "INTERCEPT_STORE_IDTR", 0x66, 3), (Kind.SGDT, "INTERCEPT_STORE_GDTR", 0x67, 3),
    (Kind.SLDT, "INTERCEPT_STORE_LDTR", 0x68, 3), (Kind.STR, "INTERCEPT_STORE_TR", 0x69, 3),
    (Kind.LIDT, "INTERCEPT_LOAD_IDTR", 0x6A, 3), (Kind.LGDT, "INTERCEPT_LOAD_GDTR", 0x6B, 3),
    (Kind.LLDT, "INTERCEPT_LOAD_LDTR", 0x6C, 3), (Kind.LTR, "INTERCEPT_LOAD_TR", 0x6D, 3),
]


@pytest.mark.parametrize("kind, bit, code, length", SIMPLE, ids=[s[0].value for s in SIMPLE])
def test_instruction_intercept_exits_with_nrip(kind, bit, code, length):
    d = decide(ev(kind, length), vmcb(bit))
    assert d.exit and d.code == code and d.next_rip == RIP + length
    assert (d.exit_info_1, d.exit_info_2) == (0, 0)
    assert f"{bit}=1" in d.cause


@pytest.mark.parametrize("kind, bit, code, length", SIMPLE, ids=[s[0].value for s in SIMPLE])
def test_every_other_intercept_does_not_make_it_exit(kind, bit, code, length):
    others = [n for n in ALL if n != bit and not n.startswith("TRAP")]
    out = decide(ev(kind, length), vmcb(*others))
    if kind is Kind.VMMCALL:
        assert out.fault and out.vector == 6          # APM: VMMCALL not intercepted is #UD
    else:
        assert not out.exit and not out.fault


@pytest.mark.parametrize("kind", [Kind.HLT, Kind.INVD, Kind.WBINVD, Kind.LGDT, Kind.INVLPG,
                                  Kind.RDMSR, Kind.VMRUN, Kind.INVLPGA])
def test_cpl_gp_comes_before_the_intercept(kind):
    out = R.decide(ev(kind, 2, regs(cpl=3), linear=0), vmcb(*ALL), Mem())
    assert out.fault and (out.vector, out.error_code) == (13, 0)


def test_svm_instructions_are_ud_with_svme_clear():
    out = R.decide(ev(Kind.VMRUN, 3, regs(efer=0xD00)), vmcb("INTERCEPT_VMRUN"), Mem())
    assert out.fault and out.vector == 6


def test_rdtsc_tsd_gp_first_at_cpl3():
    out = R.decide(ev(Kind.RDTSC, 2, regs(cpl=3, cr4=0x24)), vmcb("INTERCEPT_RDTSC"), Mem())
    assert out.fault and out.vector == 13
    out = R.decide(ev(Kind.RDTSC, 2, regs(cpl=3, cr4=0x20)), vmcb("INTERCEPT_RDTSC"), Mem())
    assert out.exit and out.code == 0x6E


@pytest.mark.parametrize("cr", [0, 2, 3, 4, 8, 15])
def test_cr_read_intercept_by_number_with_decode_assist(cr):
    d = decide(ev(Kind.MOV_FROM_CR, 3, cr=cr, gpr=5), vmcb(f"INTERCEPT_CR{cr}_READ"))
    # Appendix C: READ_CRn = n; decode assists: EXITINFO1[63] = 1 (MOV), [3:0] = GPR
    assert d.exit and d.code == cr and d.exit_info_1 == (1 << 63) | 5
    other = (cr + 1) % 16
    assert not decide(ev(Kind.MOV_FROM_CR, 3, cr=cr, gpr=5),
                      vmcb(f"INTERCEPT_CR{other}_READ", f"INTERCEPT_CR{cr}_WRITE")).exit


@pytest.mark.parametrize("cr", [0, 3, 4, 8])
def test_cr_write_intercept_by_number(cr):
    d = decide(ev(Kind.MOV_TO_CR, 3, regs(rbx=0x80010033), cr=cr, gpr=3),
               vmcb(f"INTERCEPT_CR{cr}_WRITE"))
    assert d.exit and d.code == 0x10 + cr and d.exit_info_1 == (1 << 63) | 3 and not d.trap


def test_selective_cr0_write():
    sel = vmcb("INTERCEPT_SELECTIVE_CR0")
    # changing CD (bit 30): a bit other than TS/MP -> CR0_SEL_WRITE (0x65)
    d = decide(ev(Kind.MOV_TO_CR, 3, regs(rax=0xC0010033), cr=0, gpr=0), sel)
    assert d.exit and d.code == 0x65 and d.exit_info_1 == 1 << 63
    # changing TS and MP only: no exit
    assert not decide(ev(Kind.MOV_TO_CR, 3, regs(rax=0x80010039), cr=0, gpr=0), sel).exit
    # the plain CR0 write intercept has priority
    both = vmcb("INTERCEPT_SELECTIVE_CR0", "INTERCEPT_CR0_WRITE")
    d = decide(ev(Kind.MOV_TO_CR, 3, regs(rax=0xC0010033), cr=0, gpr=0), both)
    assert d.code == 0x10


def test_lmsw_and_clts():
    sel = vmcb("INTERCEPT_SELECTIVE_CR0")
    # LMSW setting EM (bit 2): selective write; bit 63 of EXITINFO1 clear (not a MOV)
    d = decide(ev(Kind.LMSW, 3, regs(rax=0x37), gpr=0), sel)
    assert d.exit and d.code == 0x65 and d.exit_info_1 == 0
    assert not decide(ev(Kind.LMSW, 3, regs(rax=0x3B), gpr=0), sel).exit     # TS only
    assert not decide(ev(Kind.CLTS, 2), sel).exit
    d = decide(ev(Kind.CLTS, 2), vmcb("INTERCEPT_CR0_WRITE"))
    assert d.code == 0x10 and d.exit_info_1 == 0
    assert decide(ev(Kind.SMSW, 3, gpr=0), vmcb("INTERCEPT_CR0_READ")).code == 0


def test_cr_write_trap_reports_the_new_value_after_the_write():
    d = decide(ev(Kind.MOV_TO_CR, 3, regs(rcx=0x40620 | 0x80), cr=4, gpr=1),
               vmcb("TRAP_CR4_WRITE"))
    assert d.exit and d.code == 0x94 and d.trap and d.exit_info_1 == 0x406A0
    # the write intercept comes first
    d = decide(ev(Kind.MOV_TO_CR, 3, regs(rcx=0), cr=4, gpr=1),
               vmcb("TRAP_CR4_WRITE", "INTERCEPT_CR4_WRITE"))
    assert d.code == 0x14 and not d.trap


@pytest.mark.parametrize("dr", [0, 3, 6, 7])
@pytest.mark.parametrize("write", [False, True])
def test_dr_intercepts_by_number(dr, write):
    kind = Kind.MOV_TO_DR if write else Kind.MOV_FROM_DR
    name = f"INTERCEPT_DR{dr}_{'WRITE' if write else 'READ'}"
    d = decide(ev(kind, 3, dr=dr, gpr=9), vmcb(name))
    assert d.exit and d.code == (0x30 if write else 0x20) + dr and d.exit_info_1 == 9
    assert not decide(ev(kind, 3, dr=dr, gpr=9), vmcb(*(n for n in ALL if n != name))).exit


@pytest.mark.parametrize("vector", range(32))
def test_exception_intercepts(vector):
    ec = 0x1234 if vector in (8, 10, 11, 12, 13, 14, 17, 21, 29, 30) else None
    e = ev(Kind.EXCEPTION, vector=vector, error_code=ec, cr2=0xDEAD000 if vector == 14 else None)
    d = decide(e, vmcb(f"INTERCEPT_EXCEPTION_{vector}"))
    assert d.exit and d.code == 0x40 + vector and d.next_rip == 0
    assert d.exit_info_1 == (ec or 0)
    assert d.exit_info_2 == (0xDEAD000 if vector == 14 else 0)
    assert not decide(e, vmcb(f"INTERCEPT_EXCEPTION_{(vector + 1) % 32}")).exit


@pytest.mark.parametrize("kind, bit, code", [
    (Kind.INTERRUPT, "INTERCEPT_INTR", 0x60), (Kind.NMI, "INTERCEPT_NMI", 0x61),
    (Kind.INIT, "INTERCEPT_INIT", 0x63), (Kind.TRIPLE_FAULT, "INTERCEPT_SHUTDOWN", 0x7F)])
def test_event_intercepts(kind, bit, code):
    e = ev(kind, vector=0x30 if kind is Kind.INTERRUPT else None)
    d = decide(e, vmcb(bit))
    assert d.exit and d.code == code and d.next_rip == 0
    assert not decide(e, vmcb(*(n for n in ALL if n != bit))).exit


def test_vintr():
    base = dict(int_ctl=1 << 8 | 5 << 16)             # V_IRQ, V_INTR_PRIO 5, V_TPR 0
    v = vmcb("INTERCEPT_VINTR", **base)
    d = R.virtual_interrupt_exit(v, rflags=0x202, interrupt_shadow=False, gif=True)
    assert d.exit and d.code == 0x64
    assert not R.virtual_interrupt_exit(v, rflags=0x2, interrupt_shadow=False, gif=True).exit
    assert not R.virtual_interrupt_exit(v, rflags=0x202, interrupt_shadow=True, gif=True).exit
    assert not R.virtual_interrupt_exit(v, rflags=0x202, interrupt_shadow=False, gif=False).exit
    masked = vmcb("INTERCEPT_VINTR", int_ctl=1 << 8 | 5 << 16 | 6)   # V_TPR 6 >= prio 5
    assert not R.virtual_interrupt_exit(masked, rflags=0x202, interrupt_shadow=False, gif=True).exit
    ign = vmcb("INTERCEPT_VINTR", int_ctl=1 << 8 | 5 << 16 | 6 | 1 << 20)   # V_IGN_TPR
    assert R.virtual_interrupt_exit(ign, rflags=0x202, interrupt_shadow=False, gif=True).exit
    assert not R.virtual_interrupt_exit(vmcb(**base), rflags=0x202, interrupt_shadow=False,
                                        gif=True).exit


def test_intn_decode_assist_and_int3():
    d = decide(ev(Kind.INT, 2, vector=0x80), vmcb("INTERCEPT_INTn"))
    assert d.code == 0x75 and d.exit_info_1 == 0x80 and d.next_rip == RIP + 2
    assert not decide(ev(Kind.INT3, 1), vmcb(*ALL)).exit    # #BP goes to exception intercept 3


def test_invlpg_decode_assist():
    d = decide(ev(Kind.INVLPG, 3, linear=0x7FFF_1234), vmcb("INTERCEPT_INVLPG"))
    assert d.code == 0x79 and d.exit_info_1 == 0x7FFF_1234


def test_msr_intercept_ranges():
    mem = Mem()
    # APM MSRPM: 0-1FFF at byte 0, C000_0000 at 0x800, C001_0000 at 0x1000; 2 bits each
    mem.set_bit(MSRPM, 2 * 0x10)                          # RDMSR 0x10
    mem.set_bit(MSRPM, 0x800 * 8 + 2 * 0x80 + 1)          # WRMSR 0xC0000080
    mem.set_bit(MSRPM, 0x1000 * 8 + 2 * 0x117)            # RDMSR 0xC0010117
    v = vmcb("INTERCEPT_MSR_PROT")
    rd = lambda msr: decide(ev(Kind.RDMSR, 2, regs(rcx=msr)), v, mem)   # noqa: E731
    wr = lambda msr: decide(ev(Kind.WRMSR, 2, regs(rcx=msr)), v, mem)   # noqa: E731
    assert rd(0x10).exit and rd(0x10).exit_info_1 == 0 and not wr(0x10).exit
    assert wr(0xC0000080).exit and wr(0xC0000080).exit_info_1 == 1 and not rd(0xC0000080).exit
    assert rd(0xC0010117).exit and not wr(0xC0010117).exit
    assert rd(0x40000000).exit and wr(0xC0002000).exit     # outside the ranges: always
    assert not decide(ev(Kind.RDMSR, 2, regs(rcx=0x10)), vmcb(), mem).exit   # MSR_PROT off


def test_efer_write_trap():
    d = decide(ev(Kind.WRMSR, 2, regs(rcx=0xC0000080, rax=0x1D01, rdx=0)), vmcb("TRAP_EFER_WRITE"))
    assert d.exit and d.code == 0x8F and d.trap and d.exit_info_1 == 0x1D01


def test_ioio_exit_info():
    mem = Mem()
    mem.set_bit(IOPM, 0x3F8)
    v = vmcb("INTERCEPT_IOIO_PROT")
    d = R.decide(Event(Kind.OUT, 0, RIP, Insn(Kind.OUT, 1, "out dx, al", io_size=1),
                       port=0x3F8, regs=regs()), v, mem)
    # APM: port in 31:16, SZ8 (bit 4), A64 (bit 9), TYPE 0 (OUT); EXITINFO2 = next RIP
    assert d.exit and d.code == 0x7B
    assert d.exit_info_1 == 0x3F8 << 16 | 1 << 4 | 1 << 9
    assert d.exit_info_2 == RIP + 1 == d.next_rip
    # REP INSW with 32-bit addressing: TYPE IN, STR, REP, SZ16, A32, segment ES (0)
    ins = Insn(Kind.INS, 3, "rep insw", io_size=2, rep=True, addr_size=4,
               mem=MemOperand(0, 7, None, 1, 0, 4, 2))
    mem.set_bit(IOPM, 0x3F9)
    d = R.decide(Event(Kind.INS, 0, RIP, ins, port=0x3F8, regs=regs()), v, mem)
    assert d.exit_info_1 == 0x3F8 << 16 | 1 | 1 << 2 | 1 << 3 | 1 << 5 | 1 << 8


def _io(port, size, mem, v):
    return R.decide(Event(Kind.IN, 0, RIP, Insn(Kind.IN, 1, "in", io_size=size), port=port,
                          regs=regs()), v, mem)


def test_iopm_multibyte_and_past_ffff():
    mem = Mem()
    v = vmcb("INTERCEPT_IOIO_PROT")
    mem.set_bit(IOPM, 0x61)
    assert _io(0x60, 2, mem, v).exit and _io(0x5E, 4, mem, v).exit and not _io(0x60, 1, mem, v).exit
    # a 4-byte access at 0xFFFE reads the bits of "ports" 0x10000 and 0x10001 (third page)
    assert not _io(0xFFFE, 4, mem, v).exit
    mem.set_bit(IOPM, 0x10001)
    assert _io(0xFFFE, 4, mem, v).exit
    # no wrap to port 0
    mem2 = Mem()
    mem2.set_bit(IOPM, 0)
    assert not _io(0xFFFE, 4, mem2, v).exit


def test_io_permission_gp_comes_first():
    v = vmcb("INTERCEPT_IOIO_PROT")
    e = Event(Kind.IN, 0, RIP, Insn(Kind.IN, 1, "in", io_size=1), port=0x80,
              regs=regs(cpl=3, rflags=0x202), extra={"io_permitted": False})
    out = R.decide(e, v, Mem())
    assert out.fault and out.vector == 13


def test_pause_filter_count_and_threshold():
    v = vmcb("INTERCEPT_PAUSE", pause_filter_count=3)
    state = R.PauseFilter.at_vmrun(v)
    outs = []
    for _ in range(3):
        d = decide(ev(Kind.PAUSE, 2), v, pause=state)
        outs.append(d.exit)
        state = d.pause
    assert outs == [False, False, True]         # the third PAUSE brings the counter to 0
    # with a threshold: PAUSEs far apart reload the counter, so they never exit
    v = vmcb("INTERCEPT_PAUSE", pause_filter_count=2, pause_filter_thresh=100)
    state = R.PauseFilter.at_vmrun(v)
    for t in range(0, 5000, 1000):
        d = decide(ev(Kind.PAUSE, 2, regs(tsc=t)), v, pause=state)
        assert not d.exit
        state = d.pause
    # close together: the second exits
    d = decide(ev(Kind.PAUSE, 2, regs(tsc=4050)), v, pause=state)
    assert d.exit and d.code == 0x77
    # count 0: every PAUSE exits
    assert decide(ev(Kind.PAUSE, 2), vmcb("INTERCEPT_PAUSE")).exit


def test_task_switch_exit_info():
    e = ev(Kind.TASK_SWITCH, extra={"tss_selector": 0x28, "task_switch_source": "IRET"})
    d = decide(e, vmcb("INTERCEPT_TASK_SWITCH"))
    assert d.code == 0x7D and d.exit_info_1 == 0x28 and d.exit_info_2 == 1 << 36
    e = ev(Kind.TASK_SWITCH, extra={"tss_selector": 0x30, "task_switch_source": "IDT",
                                    "task_switch_error_code": 0x10})
    d = decide(e, vmcb("INTERCEPT_TASK_SWITCH"))
    assert d.exit_info_2 == 1 << 44 | 0x10


def test_mwait_cond():
    v = vmcb("INTERCEPT_MWAIT_COND")
    assert not decide(ev(Kind.MWAIT, 3), v).exit
    d = decide(ev(Kind.MWAIT, 3, extra={"monitor_armed": True}), v)
    assert d.code == 0x8C


def test_vmx_instructions_are_ud():
    out = decide(ev(Kind.VMCALL, 3), vmcb(*ALL))
    assert out.fault and out.vector == 6
