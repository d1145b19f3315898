"""The direct SVM case API (devirt_emu.testing.svm_case) on a real core.

Expectations from AMD APM Vol. 2 chapter 15 and Appendix C: exit codes,
EXITINFO1/2, nRIP (the address after the intercepted instruction), the save
area's RIP (the intercepted instruction's), EXITINTINFO for an exit during
event delivery."""
import pytest

from devirt_emu.platform import longmode
from devirt_emu.testing.svm_case import CODE_BASE, CaseError, run_case


def test_cpuid_intercept():
    r = run_case("cpuid", intercepts=["INTERCEPT_CPUID"])
    e = r.exit
    assert (e.code, e.name) == (0x72, "CPUID")
    assert e.rip == CODE_BASE and e.next_rip == CODE_BASE + 2
    assert r.steps == 0


def test_without_the_intercept_cpuid_runs_and_the_guest_halts():
    r = run_case("cpuid")
    assert r.exit is None and r.no_exit.why == "halted" and r.steps == 2


def test_hlt_after_a_nop():
    r = run_case("nop\nhlt", intercepts=["HLT"])
    assert r.exit.code == 0x78 and r.exit.rip == CODE_BASE + 1 and r.steps == 1


def test_msr_intercept_with_the_msrpm():
    r = run_case("mov ecx, 0x10\nrdmsr", intercepts=["MSR_PROT"], msrpm={"read": [0x10]})
    assert r.exit.code == 0x7C and r.exit.exit_info_1 == 0
    r = run_case("mov ecx, 0x10\nrdmsr\nmov ecx, 0x1b\nwrmsr", intercepts=["MSR_PROT"],
                 msrpm={"read": [0x1B], "write": [0x1B]})
    assert r.exit.code == 0x7C and r.exit.exit_info_1 == 1 and r.exit.regs["rcx"] == 0x1B


def test_ioio_exit_info():
    r = run_case("mov dx, 0x3f8\nout dx, al", intercepts=["IOIO_PROT"], iopm=[0x3F8])
    e = r.exit
    # port 0x3F8 in 31:16, SZ8 (bit 4), A64 (bit 9), OUT; EXITINFO2 = the next RIP
    assert e.exit_info_1 == 0x3F8 << 16 | 1 << 4 | 1 << 9
    assert e.exit_info_2 == e.next_rip == e.rip + 1


def test_cr_write_intercept_and_trap():
    r = run_case("mov rax, cr4\nor rax, 0x80\nmov cr4, rax", intercepts=["INTERCEPT_CR4_WRITE"])
    assert r.exit.code == 0x14 and r.exit.exit_info_1 == (1 << 63) | 0
    assert r.exit.regs["cr4"] == 0x20                       # the write did not happen
    r = run_case("mov rax, cr4\nor rax, 0x80\nmov cr4, rax\nafter: nop",
                 intercepts=["TRAP_CR4_WRITE"])
    e = r.exit
    assert e.code == 0x94 and e.exit_info_1 == 0xA0
    assert e.regs["cr4"] == 0xA0 and e.rip == r.symbols["after"]      # after the write


def test_exception_intercept_and_pf_address():
    r = run_case("mov rax, [0x7fffffff000]", intercepts=["INTERCEPT_EXCEPTION_14"])
    e = r.exit
    assert e.code == 0x4E and e.exit_info_2 == 0x7FFFFFFF000 and e.exit_info_1 == 0
    assert e.regs["cr2"] == 0                                # CR2 is not written


def test_exit_during_event_delivery_reports_exit_int_info():
    # INT 0x30 through an all-zero gate (invalid type): #GP(0x30*8+2) during its delivery
    r = run_case("int 0x30", intercepts=["INTERCEPT_EXCEPTION_13"])
    e = r.exit
    assert e.code == 0x4D and e.exit_info_1 == 0x30 * 8 + 2
    assert e.exit_int_info == 1 << 31 | 4 << 8 | 0x30        # V, TYPE 4 (INTn), vector


def test_event_injection():
    handler = CODE_BASE + 0x100
    gate = longmode.idt_gate(handler)
    code = "hlt\n" + "nop\n" * 0xFF + "mov rbx, [rsp]\ncpuid"
    r = run_case(code, intercepts=["CPUID"], vmcb={"event_inj": 1 << 31 | 0x40},
                 memory={longmode.IDT + 0x40 * 16: gate})
    assert r.exit.code == 0x72 and r.exit.rip == handler + 4
    assert r.exit.regs["rbx"] == CODE_BASE           # the frame returns to the guest's RIP
    assert not r.vmcb["event_inj"] & 1 << 31


def test_vmrun_failure_is_vmexit_invalid():
    r = run_case("cpuid", vmcb={"asid": 0})
    assert r.exit.code == -1 and r.exit.name == "INVALID" and r.vmrun_failure.field == "asid"
    assert r.vmcb["exit_code"] == 0xFFFFFFFF and r.vmcb["exit_code_hi"] == 0xFFFFFFFF
    r = run_case("cpuid", vmcb={"efer": 0xD00})
    assert r.vmrun_failure.field == "efer"


def test_tsc_offset():
    r = run_case("rdtsc\nshl rdx, 32\nor rax, rdx\nmov rbx, rax\ncpuid", intercepts=["CPUID"],
                 vmcb={"tsc_offset": 1 << 50})
    assert r.exit.regs["rbx"] >= 1 << 50


def test_virtual_interrupt_vintr_and_delivery():
    r = run_case("sti\nnop\ncpuid", intercepts=["VINTR", "CPUID"],
                 vmcb={"int_ctl": 1 << 8 | 2 << 16, "int_vector": 0x50})
    assert r.exit.code == 0x64
    handler = CODE_BASE + 0x80
    code = "sti\nnop\n" + "nop\n" * 0x7E + "cpuid"
    r = run_case(code, intercepts=["CPUID"], vmcb={"int_ctl": 1 << 8 | 2 << 16, "int_vector": 0x50},
                 memory={longmode.IDT + 0x50 * 16: longmode.idt_gate(handler)})
    assert r.exit.code == 0x72 and r.exit.rip == handler
    assert not r.vmcb["int_ctl"] & 1 << 8                    # V_IRQ taken


def test_stgi_clgi_without_intercepts_and_vmmcall_ud():
    r = run_case("clgi\nstgi\nvmmcall", intercepts=["INTERCEPT_EXCEPTION_6"])
    assert r.exit.code == 0x46 and r.exit.rip == CODE_BASE + 6


@pytest.mark.parametrize("kw, words", [
    ({"intercepts": ["NOPE"]}, "no SVM intercept"),
    ({"vmcb": {"nope": 1}}, "no VMCB field"),
    ({"vmcb": {"asid": 1 << 40}}, "does not fit"),
    ({"msrpm": {"read": [0x40000000]}}, "outside the MSRPM"),
    ({"iopm": b"12"}, "12288 bytes"),
    ({"regs": {"xyz": 1}}, "unknown register"),
    ({"memory": {0xF00000: b"x"}}, "overlaps the VMCB"),
    ({"intercepts": ["CPUID"], "vmcb": {"intercept_word3": 0}}, "not both"),
])
def test_bad_input_is_a_case_error(kw, words):
    with pytest.raises(CaseError, match=words):
        run_case("cpuid", **kw)


def test_the_examples_in_the_docs_run():
    import doctest
    import re
    from pathlib import Path

    import devirt_emu.testing.svm_case as svm_case
    text = (Path(__file__).parent.parent / "docs" / "svm-cases.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "docs/svm-cases.md", "exec"), {})
    res = doctest.testmod(svm_case)
    assert res.attempted > 0 and res.failed == 0
