"""The Python debugging API (devirt_emu.debugger.Session): stops by symbol,
state reads, time travel by determinism, and why / why-not against the
architecture for every exit reason the guest tests produce."""
from __future__ import annotations

import struct
from pathlib import Path

import pytest

from devirt_emu.asm import build_image
from devirt_emu.debugger import DebugError, Session
from devirt_emu.stepping import StopKind

GUESTS = Path(__file__).resolve().parent.parent / "guest_tests"


def vmx(name="lapic_timer.S", cores=2, config="stock"):
    return Session(GUESTS / name, cores=cores, arch="vmx", config=config)


def test_break_at_a_guest_symbol_stops_before_it():
    s = vmx()
    sym = build_image(GUESTS / "lapic_timer.S").symbols["timer_handler"]
    s.break_at("timer_handler")
    st = s.cont()
    assert st.kind is StopKind.BREAKPOINT and st.rip == sym
    assert s.regs()["rip"] == sym
    assert s.where(sym) == f"{sym:#x} <timer_handler>"
    assert s.breakpoints[st.ident].hits == 1


def test_firmware_labels_are_symbols_too():
    s = Session(GUESTS / "hello.S")
    image = build_image(GUESTS / "hello.S")
    assert s.resolve("_start32") == image.entry32
    assert s.resolve("guest_main+4") == image.symbols["guest_main"] + 4


def test_state_reads_follow_the_architecture():
    s = vmx()
    s.break_at("timer_handler")
    s.cont()
    r = s.regs()
    # the guest runs in 64-bit long mode with paging: CR0.PE|PG, EFER.LME|LMA, CR4.PAE
    assert r["cr0"] & 1 and r["cr0"] >> 31 & 1
    assert r["efer"] >> 8 & 1 and r["efer"] >> 10 & 1
    assert r["cr4"] >> 5 & 1
    cs = next(seg for seg in s_state_segments(s) if seg.name == "cs")
    assert cs.ar >> 13 & 1                        # CS.L: 64-bit code
    walk = s.page(r["rip"])
    assert walk["mode"] == "4-level paging" and walk["gpa"] is not None
    assert [lv.name for lv in walk["levels"]][:2] == ["PML4E", "PDPTE"]
    # every level is present (bit 0) and the last maps the code
    assert all(lv.value & 1 for lv in walk["levels"])
    # the code bytes read virtually and physically agree
    assert s.read_virtual(r["rip"], 16) == s.read_physical(walk["gpa"], 16)
    first = s.disas(count=1)[0]
    assert first[0] == r["rip"]


def s_state_segments(s):
    from devirt_emu.debugger.state import segments
    return segments(s.cur())


def test_bad_addresses_are_one_line_errors():
    s = vmx()
    for bad in ("no_such_symbol", "", "0x1+", "$nosuchreg"):
        with pytest.raises(DebugError):
            s.resolve(bad)
    with pytest.raises(DebugError):
        s.read_physical(1 << 40, 4)


def test_reverse_stepi_then_stepi_returns_to_the_same_state():
    s = vmx()
    s.break_at("timer_handler")
    s.cont()
    s.stepi(5)
    here, regs = s.position(), s.regs()
    s.reverse_stepi(3)
    assert s.cur().icount == here.icounts[s.core] - 3
    s.stepi(3)
    assert s.position().icounts == here.icounts
    assert s.regs() == regs


def test_snapshot_restore_and_reverse_continue():
    s = vmx()
    bp = s.break_at("timer_handler")
    s.cont()
    first = s.snapshot("first")
    regs = s.regs()
    s.cont()
    second = s.position()
    assert second.total > first.total
    s.restore("first")
    assert s.position().icounts == first.icounts and s.regs() == regs
    # continuing from a restored breakpoint executes it and reaches the second hit
    st = s.cont()
    assert st.kind is StopKind.BREAKPOINT and st.ident == bp
    assert s.position().icounts == second.icounts
    # reverse-continue goes back to the previous hit
    st = s.reverse_cont()
    assert st.kind is StopKind.BREAKPOINT
    assert s.position().icounts == first.icounts
    with pytest.raises(DebugError):
        s.restore("nope")


def test_a_run_with_the_debugger_is_the_free_run():
    from devirt_emu.machine import run_program
    ref = run_program(GUESTS / "lapic_timer.S", cores=2, arch="vmx", config="stock")
    s = vmx()
    s.break_at("timer_handler")
    s.break_exit(["MSR_WRITE"])
    while s.machine.verdict is None:
        s.cont()
    res = s.machine.result()
    assert (res.verdict, res.instructions, res.exit_counts) == \
        (ref.verdict, ref.instructions, ref.exit_counts)


# --------------------------------------------------------------------------
# why / why-not against the SDM, for every exit reason the guest tests produce
# --------------------------------------------------------------------------
PROC, PIN = 0x4002, 0x4012               # CPU_BASED_VM_EXEC_CONTROL, PIN_BASED_VM_EXEC_CONTROL
MSR_BITMAP, IO_A, IO_B = 0x2004, 0x2000, 0x2002
EXC_BITMAP, CR0_MASK, CR4_MASK, CR0_SHADOW, CR4_SHADOW = 0x4004, 0x6000, 0x6002, 0x6004, 0x6006
EXIT_QUAL, EXIT_INTR_INFO, GUEST_RFLAGS = 0x6400, 0x4404, 0x6820


def _vm(s, enc):
    return s.cur().virt.vmcs.get(enc)


def _bit(s, pa, n):
    return s.machine.mem.read(pa + n // 8, 1)[0] >> (n % 8) & 1


def check_why(s, name, why):
    text = "\n".join(why.lines())
    assert name in why.headline
    assert why.cause, text
    proc = _vm(s, PROC)
    if name == "HLT":
        assert proc >> 7 & 1                                       # HLT exiting
        assert "CPU_BASED_HLT_EXITING is bit 7" in text
    elif name in ("MSR_READ", "MSR_WRITE"):
        msr = s.regs()["rcx"] & 0xFFFFFFFF
        assert proc >> 28 & 1                                      # use MSR bitmaps
        low = msr <= 0x1FFF
        assert low or 0xC0000000 <= msr <= 0xC0001FFF
        off = (0x800 if name == "MSR_WRITE" else 0) + (0 if low else 0x400)
        base = _vm(s, MSR_BITMAP)
        assert _bit(s, base + off, msr & 0x1FFF) == 1               # SDM: the bit is set
        assert f"byte {base + off + ((msr & 0x1FFF) >> 3):#x}" in text
        assert f"bit {msr & 7}" in text
    elif name == "IO_INSTRUCTION":
        port = _vm(s, EXIT_QUAL) >> 16 & 0xFFFF
        if proc >> 25 & 1:
            base = _vm(s, IO_A if port < 0x8000 else IO_B)
            assert _bit(s, base, port & 0x7FFF) == 1
            assert f"port {port:#x}" in text
        else:
            assert proc >> 24 & 1                                   # unconditional I/O exiting
            assert "CPU_BASED_UNCOND_IO_EXITING=1" in text
    elif name == "CR_ACCESS":
        qual = _vm(s, EXIT_QUAL)
        cr, kind, gpr = qual & 0xF, qual >> 4 & 3, qual >> 8 & 0xF
        if kind == 0 and cr in (0, 4):                              # MOV to CR0/CR4
            from devirt_emu.events import GPR_NAMES
            new = s.regs()[GPR_NAMES[gpr]]
            mask = _vm(s, CR0_MASK if cr == 0 else CR4_MASK)
            shadow = _vm(s, CR0_SHADOW if cr == 0 else CR4_SHADOW)
            diff = (new ^ shadow) & mask
            assert diff
            for b in range(64):
                if diff >> b & 1:
                    assert f"(bit {b}) is host-owned" in text
    elif name == "EXCEPTION_NMI":
        vector = _vm(s, EXIT_INTR_INFO) & 0xFF
        if vector != 2:
            assert _vm(s, EXC_BITMAP) >> vector & 1
            assert f"EXCEPTION_BITMAP bit {vector}=1" in text
    elif name == "EXTERNAL_INTERRUPT":
        assert _vm(s, PIN) & 1
        assert "PIN_BASED_EXT_INTR_MASK is bit 0" in text
    elif name == "INTERRUPT_WINDOW":
        assert proc >> 2 & 1 and _vm(s, GUEST_RFLAGS) >> 9 & 1
        assert "CPU_BASED_INTR_WINDOW_EXITING is bit 2" in text
    elif name == "EPT_VIOLATION":
        assert "ept" in why.rule
    # CPUID, INIT_SIGNAL, SIPI_SIGNAL exit unconditionally: the cause says so
    assert s.last_stop.kind is StopKind.VM_EXIT


@pytest.mark.parametrize("guest", ["exceptions.S", "ipi_pingpong.S", "msr_passthrough.S"])
def test_why_names_the_cause_of_every_exit(guest):
    s = vmx(guest)
    s.break_exit()
    seen: dict[str, int] = {}
    while s.machine.verdict is None:
        st = s.cont()
        if st.kind is not StopKind.VM_EXIT:
            continue
        if seen.get(st.name, 0) >= 20:
            continue
        seen[st.name] = seen.get(st.name, 0) + 1
        check_why(s, st.name, s.why())
    assert s.machine.verdict == "pass"
    assert {"CPUID", "CR_ACCESS", "HLT", "IO_INSTRUCTION", "MSR_WRITE"} <= set(seen)


def test_why_not_explains_a_sensitive_instruction_that_did_not_exit():
    s = vmx("lapic_timer.S")
    s.break_at("timer_handler")
    s.cont()
    for _ in range(200):                      # the handler reads the TSC
        s.stepi(1)
        w = s.why_not()
        if "RDTSC" in w.headline:
            break
    assert w.headline.startswith("no VM exit for RDTSC"), w.headline
    # SDM: RDTSC exits iff "RDTSC exiting" (primary bit 12) is 1
    assert not _vm(s, PROC) >> 12 & 1
    text = "\n".join(w.lines())
    assert "CPU_BASED_RDTSC_EXITING=0" in text and "bit 12 of CPU_BASED_VM_EXEC_CONTROL" in text


def test_set_field_and_control_bits_and_explain():
    s = vmx()
    s.break_exit(["CPUID"])
    s.cont()
    v = s.view()
    assert v.set("CPU_BASED_HLT_EXITING", 0).endswith("(CPU_BASED_HLT_EXITING=0)")
    assert not _vm(s, PROC) >> 7 & 1
    v.set("CPU_BASED_HLT_EXITING", 1)
    assert _vm(s, PROC) >> 7 & 1
    from devirt_emu.debugger.views import ViewError
    with pytest.raises(ViewError):
        v.set("VIRTUAL_PROCESSOR_ID", 1 << 16)                     # a 16-bit field
    with pytest.raises(ViewError):
        v.set("NO_SUCH_FIELD", 1)
    with pytest.raises(ViewError):
        v.set("VM_EXIT_REASON", 1)                                  # read-only
    assert "bit 7 of CPU_BASED_VM_EXEC_CONTROL" in v.explain("CPU_BASED_HLT_EXITING")
    assert "0x4002" in v.explain("CPU_BASED_VM_EXEC_CONTROL")


def test_a_broken_guest_state_stops_at_the_entry_failure():
    s = vmx()
    s.break_exit(["CPUID"])
    s.cont()
    s.view().set("GUEST_RFLAGS", 0)      # bit 1 must be 1 (SDM "Checks on Guest RFLAGS")
    s.break_exit("off")
    s.cont()
    core, failure = s.entry_failure()
    assert core == s.core and "RFLAGS" in str(failure).upper()
    assert s.machine.verdict == "error"


def test_exits_log_filters():
    s = vmx()
    s.break_at("timer_handler")
    s.cont()
    recs = s.exits(reason="MSR_WRITE", last=0)
    assert recs and all(r.name == "MSR_WRITE" for r in recs)
    assert all(r.core == 1 for r in s.exits(core=1, last=0))
    with pytest.raises(DebugError):
        s.exits(reason="NOPE")


def test_native_machine_has_no_vmcs():
    s = Session(GUESTS / "hello.S")
    with pytest.raises(DebugError):
        s.why()
    st = s.stepi(10)
    assert st.kind is StopKind.STEP and s.cur().icount == 10


def test_watchpoint_stops_after_the_store_retired():
    image = build_image(GUESTS / "lapic_timer.S")
    syms = image.symbols
    s = vmx()
    off = syms["ticks"] - image.base
    before = struct.unpack("<Q", image.data[off:off + 8])[0]      # as loaded
    wp = s.watch("ticks", 8, "w")
    st = s.cont()
    assert st.kind is StopKind.WATCHPOINT and st.ident == wp and st.access == "write"
    assert syms["ticks"] <= st.address < syms["ticks"] + 8
    # the store has happened: the guest's tick count of core 0 changed
    assert struct.unpack("<Q", s.read_virtual(syms["ticks"], 8))[0] != before
    assert s.watchpoints[wp].hits == 1


@pytest.mark.parametrize("arch", ["none", "vmx"])
def test_physical_watchpoint_stops_after_the_store_retired(arch):
    # a guest-physical watchpoint on the tick counter: under VMX the session translates
    # it through the EPT (identity here) once the guest has touched the page
    image = build_image(GUESTS / "lapic_timer.S")
    syms = image.symbols
    s = Session(GUESTS / "lapic_timer.S", cores=2, arch=arch,
                config="stock" if arch == "vmx" else None)
    s.break_at("timer_handler")
    assert s.cont().kind is StopKind.BREAKPOINT
    before = struct.unpack("<Q", s.read_physical(syms["ticks"], 8))[0]
    s.delete()
    wp = s.watch("ticks", 8, "w", physical=True)
    st = s.cont()
    assert st.kind is StopKind.WATCHPOINT and st.ident is not None and st.access == "write"
    assert syms["ticks"] <= st.address < syms["ticks"] + 8
    assert struct.unpack("<Q", s.read_physical(syms["ticks"], 8))[0] != before
    assert s.watchpoints[wp].hits == 1 and s.watchpoints[wp].hpa == syms["ticks"]


def test_physical_watchpoint_errors_are_one_line():
    s = Session(GUESTS / "lapic_timer.S", cores=1, arch="none")
    with pytest.raises(DebugError, match="outside RAM"):
        s.watch(str(1 << 40), 4, "w", physical=True)
    s = vmx()                                   # the EPT is built on demand: empty at first
    with pytest.raises(DebugError, match="not mapped by the EPT"):
        s.watch(str(1 << 40), 4, "w", physical=True)


def test_break_interrupt_stops_at_the_gate_target():
    s = vmx()
    s.break_interrupt([0xEC])                 # the guest's LAPIC-timer vector
    st = s.cont()
    assert st.kind is StopKind.VECTOR and st.vector == 0xEC
    # SDM "Gate Descriptors in IA-32e Mode": 16-byte gates, offset 15:0, 31:16, 63:32
    from unicorn import x86_const as X
    _, base, _, _ = s.cur().uc.reg_read(X.UC_X86_REG_IDTR)
    lo, hi = struct.unpack("<QQ", s.read_virtual(base + 0xEC * 16, 16))
    target = (lo & 0xFFFF) | ((lo >> 48) & 0xFFFF) << 16 | (hi & 0xFFFFFFFF) << 32
    assert st.rip == target == s.cur().rip()


def test_breakpoint_on_one_core_only():
    s = vmx()
    s.break_at("timer_handler", core=0)
    st = s.cont()
    assert st.kind is StopKind.BREAKPOINT and st.core == 0


@pytest.mark.parametrize("config", ["devirt", "apicv"])
def test_why_under_the_other_configurations(config):
    s = vmx("tsc_deadline.S", config=config)
    s.break_exit()
    seen = set()
    while s.machine.verdict is None:
        st = s.cont()
        if st.kind is StopKind.VM_EXIT and st.name not in seen:
            seen.add(st.name)
            check_why(s, st.name, s.why())
    assert s.machine.verdict == "pass" and seen


def test_an_elf_guest_breaks_at_its_own_symbols(tmp_path):
    import shutil
    import subprocess
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc to build an ELF guest")
    from test_guests import ELF_GUEST
    src = tmp_path / "guest.c"
    src.write_text(ELF_GUEST)
    elf = tmp_path / "guest.elf"
    subprocess.run([gcc, "-O2", "-ffreestanding", "-fno-pic", "-no-pie", "-nostdlib", "-static",
                    "-mgeneral-regs-only", "-fno-stack-protector", "-Wl,-Ttext-segment=0x400000",
                    "-Wl,-e,entry", "-o", str(elf), str(src)], check=True, capture_output=True)
    from elftools.elf.elffile import ELFFile
    with open(elf, "rb") as f:
        entry = ELFFile(f)["e_entry"]               # -e entry: the symbol "entry"
    s = Session(elf, cores=2)
    assert s.resolve("entry") == entry
    assert "_start32" in s.symbols                  # the firmware's labels are there too
    s.break_at("entry")
    st = s.cont()
    assert st.kind is StopKind.BREAKPOINT and st.rip == entry
    assert s.where(entry) == f"{entry:#x} <entry>"
    out = tmp_path / "syms.elf"
    s.write_symbol_file(out)
    with open(out, "rb") as f:
        names = {sym.name: sym["st_value"] for sym in ELFFile(f).get_section_by_name(".symtab")
                 .iter_symbols()}
    assert names["entry"] == entry


def test_completion_offers_commands_symbols_and_fields():
    from devirt_emu.debugger.repl import completion_words
    words = set(completion_words(vmx()))
    assert {"stepi", "why-not", "timer_handler", "GUEST_RIP", "CPU_BASED_HLT_EXITING"} <= words


def test_reverse_continue_without_an_earlier_stop_goes_to_the_start():
    s = vmx()
    s.stepi(100)
    s.reverse_cont()
    assert s.at_history_begin and s.position().total == 0


EXIT_INFO = (0x4402, 0x6400, 0x440C, 0x4404)   # reason, qualification, length, interruption


@pytest.mark.parametrize("stop", ["exit", "vector"])
def test_restore_inside_an_exit_or_a_delivery_and_run_on(stop):
    from devirt_emu.machine import run_program
    ref = run_program(GUESTS / "lapic_timer.S", cores=2, arch="vmx", config="stock")
    s = vmx()
    if stop == "exit":
        s.break_exit(["MSR_WRITE"])
    else:
        s.break_interrupt([0xEC])
    s.cont()
    s.cont()
    here = s.snapshot("here")
    regs = s.regs()
    info = [_vm(s, f) for f in EXIT_INFO]
    s.stepi(7)
    s.restore("here")
    assert s.position() == here
    assert s.regs() == regs and [_vm(s, f) for f in EXIT_INFO] == info
    s.break_exit("off")
    s.break_interrupt("off")
    while s.machine.verdict is None:
        s.cont()
    res = s.machine.result()
    assert (res.verdict, res.instructions, res.exit_counts) == \
        (ref.verdict, ref.instructions, ref.exit_counts)


def test_stepi_from_a_restored_breakpoint_is_one_instruction():
    s = vmx()
    s.break_at("timer_handler")
    s.cont()
    here = s.snapshot("bp")
    s.stepi(1)
    one = s.position().icounts
    s.restore("bp")
    s.stepi(1)
    assert s.position().icounts == one
    # and with the breakpoint gone (as gdb removes its breakpoints to step)
    s.restore("bp")
    s.delete()
    s.stepi(1)
    assert s.position().icounts == one
    assert here.icounts[s.core] + 1 == one[s.core]


def test_every_control_bit_has_an_explanation():
    from devirt_emu.debugger.explain import CONTROL_DOCS
    from devirt_emu.debugger.views import CONTROL_BITS
    assert set(CONTROL_BITS) == set(CONTROL_DOCS)


# --------------------------------------------------------------------------
# the VMCB view (SVM), on the SVM case runner's vCPU
# --------------------------------------------------------------------------
def _vmcb_views(monkeypatch, *cases):
    from devirt_emu.debugger.views import VmcbView, view_for
    from devirt_emu.testing import svm_case as SC
    seen = []
    orig = SC._RecordingL0.handle_exit

    def capture(self, vcpu):
        view = view_for(vcpu.core)
        assert isinstance(view, VmcbView)
        base = vcpu.vmcb.get("msrpm_base_pa")
        seen.append((view.why(), view.rows("intercept_word3"), view, vcpu,
                     vcpu.mem.read(base, 8)))
        return orig(self, vcpu)

    monkeypatch.setattr(SC._RecordingL0, "handle_exit", capture)
    runner = SC.CaseRunner()
    for code, kw in cases:
        runner.run(code, **kw)
    return seen, runner


def test_the_vmcb_view_explains_svm_intercepts(monkeypatch):
    seen, runner = _vmcb_views(
        monkeypatch,
        ("mov ecx, 0x10\nrdmsr", dict(intercepts=["MSR_PROT"], msrpm={"read": [0x10]})),
        ("hlt", dict(intercepts=["HLT"])))
    (msr_why, msr_rows, view, vcpu, msrpm), (hlt_why, _, _, _, _) = seen
    # APM Table B-1: MSR_PROT is bit 28 and HLT bit 24 of the vector at 00Ch (intercepts[3])
    assert msr_why.headline.startswith("#VMEXIT MSR (exit code 0x7c)")
    text = "\n".join(msr_why.lines())
    assert "bit 28 of intercept_word3" in text and "offset 0x00c" in text
    # APM "MSR Intercepts": two bits per MSR, the read bit of MSR 0x10 is bit 0x20 of the map
    base = vcpu.vmcb.get("msrpm_base_pa")
    assert msrpm[4] & 1
    assert f"byte {base + 4:#x}" in text and "bit 0" in text
    assert msr_rows[0].decoded == "INTERCEPT_MSR_PROT"
    assert "bit 24 of intercept_word3" in "\n".join(hlt_why.lines())
    # set one intercept bit by name, a too-wide value, an unknown name
    assert view.set("INTERCEPT_CPUID", 1).endswith("(INTERCEPT_CPUID=1)")
    assert vcpu.vmcb.get("intercept_word3") >> 18 & 1          # CPUID: bit 18 of word 3
    from devirt_emu.debugger.views import ViewError
    with pytest.raises(ViewError):
        view.set("asid", 1 << 32)
    with pytest.raises(ViewError):
        view.set("no_such_field", 1)
    assert "offset 0x058" in view.explain("asid")
    assert view.rows("save")[0].group == "save"


def test_the_vmcs_view_lists_the_fields_of_the_cpu_model():
    # SDM Appendix B: the EPTP-index field exists only with "EPT-violation #VE"; Westmere
    # (2010) has no #VE, Skylake-SP has it
    from devirt_emu.cpumodels import get_model
    names = {r.name for r in Session(GUESTS / "hello.S", arch="vmx",
                                     cpu=get_model("westmere")).view().rows()}
    assert "EPT_POINTER" in names and "EPTP_INDEX" not in names


def test_finish_and_next_return_after_the_call():
    syms = build_image(GUESTS / "lapic_timer.S").symbols
    handler = syms["timer_handler"]
    s = vmx()
    s.break_at("timer_handler")
    s.cont()
    s.delete()
    s.stepi(1)                               # push rbx (1 byte): at the call (5 bytes, e8 rel32)
    assert s.read_virtual(handler + 1, 1) == b"\xe8"
    at_call = s.cur().icount
    s.break_at("this_cpu", core=s.core)
    st = s.cont()
    assert st.kind is StopKind.BREAKPOINT and st.rip == syms["this_cpu"]
    s.delete()
    st = s.finish()                          # at the function's entry: the return address
    assert s.cur().rip() == handler + 6
    # from inside the function (one instruction before its RET): stepping until the RET
    s.reverse_stepi(1)
    assert s.read_virtual(s.cur().rip(), 1) == b"\xc3"          # this_cpu's RET
    s.finish()
    assert s.cur().rip() == handler + 6
    # next over the call, from the call itself
    s.reverse_stepi(s.cur().icount - at_call)
    assert s.cur().rip() == handler + 1
    st = s.next()
    assert st.kind is StopKind.STEP and s.cur().rip() == handler + 6


def test_a_replay_runs_the_program_without_the_users_writes():
    s = vmx()
    s.break_at("timer_handler")
    s.cont()
    s.snapshot("bp")
    rbx = s.regs()["rbx"]
    s.write_register("rbx", rbx ^ 0xFF)
    assert s.modified
    s.restore("bp")
    assert s.dropped_writes and not s.modified
    assert s.regs()["rbx"] == rbx                    # the replayed run, not the written one


def test_svm_session_stops_at_a_vmexit_and_explains_it_from_the_vmcb():
    # APM Vol. 2 "MSR Intercepts": the MSRPM's second 2 KiB cover MSRs C000_0000h-C000_1FFFh,
    # two bits per MSR (read, then write): RDMSR of EFER (C000_0080h) reads bit
    # 2 * 0x80 = 0x100 of that range, i.e. byte 0x800 + 0x20, bit 0, of the MSRPM
    s = Session(GUESTS / "lapic_timer.S", cores=1, arch="svm", config="stock")
    s.break_exit(["MSR"])
    st = s.cont()
    assert st.kind is StopKind.VM_EXIT and (st.reason, st.name) == (0x7C, "MSR")
    view = s.view()
    assert view.kind == "vmcb" and view.get("exit_code") == 0x7C and view.get("exit_info_1") == 0
    base = view.get("msrpm_base_pa")
    text = "\n".join(s.why().lines())
    assert "INTERCEPT_MSR_PROT=1" in text
    assert f"is byte {base + 0x820:#x}" in text and "bit 0" in text
    # the firmware's earlier MOV to CR3 did not exit: stock SVM does not intercept CR3 writes
    not_text = "\n".join(s.why_not().lines())
    assert not_text.startswith("no #VMEXIT for") and "INTERCEPT_CR3_WRITE=0" in not_text
    assert s.exits(reason="MSR")[-1].code == 0x7C
    with pytest.raises(DebugError, match="no #VMEXIT code"):
        s.break_exit(["NOSUCH"])


def test_svm_page_walk_goes_through_the_nested_tables():
    # APM "Nested Paging": a guest-physical address is translated through 4-level tables at
    # nested_cr3; the L0 maps guest RAM 1:1 on demand (NPF), so a page the guest ran from is
    # present with host-physical = guest-physical, and an untouched one is not present (an NPF
    # of the final translation: EXITINFO1 bit 32 set, bit 0 clear)
    s = Session(GUESTS / "lapic_timer.S", cores=1, arch="svm", config="stock")
    s.break_exit(["MSR"])
    assert s.cont().kind is StopKind.VM_EXIT
    rip = s.cur().rip()
    w = s.page(rip)
    n = w["npt"]
    assert [lv.name for lv in n["levels"]][:3] == ["nPML4E", "nPDPTE", "nPDE"]
    assert n["hpa"] == w["gpa"] and n["rights"].startswith("r") and n["fault"] is None
    far = s.page(0x3000000)["npt"]
    assert far["hpa"] is None and "not present" in far["fault"]
    info1 = int(far["fault"].rsplit("EXITINFO1 ", 1)[1].rstrip(")"), 16)
    assert info1 >> 32 & 1 and not info1 & 1


# APM Vol. 2 Appendix C (#VMEXIT codes) and B (the intercept vectors), written out again
SVM_CODES = {"READ_CR0": 0x00, "READ_CR4": 0x04, "WRITE_CR0": 0x10, "WRITE_CR4": 0x14,
             "EXCP_6": 0x46, "INTR": 0x60, "VINTR": 0x64, "CPUID": 0x72, "HLT": 0x78,
             "IOIO": 0x7B, "MSR": 0x7C, "NPF": 0x400}
#: exit -> (intercept word, bit): CR reads 0-15 and writes 16-31 of word 0, exceptions in
#: word 2, INTR 0, VINTR 4, CPUID 18, HLT 24, IOIO_PROT 27, MSR_PROT 28 of word 3
SVM_INTERCEPTS = {"READ_CR0": ("intercept_cr", 0), "READ_CR4": ("intercept_cr", 4),
                  "WRITE_CR0": ("intercept_cr", 16), "WRITE_CR4": ("intercept_cr", 20),
                  "EXCP_6": ("intercept_exceptions", 6), "INTR": ("intercept_word3", 0),
                  "VINTR": ("intercept_word3", 4), "CPUID": ("intercept_word3", 18),
                  "HLT": ("intercept_word3", 24), "IOIO": ("intercept_word3", 27),
                  "MSR": ("intercept_word3", 28)}


def check_why_svm(s, name, why):
    v = s.view()
    text = "\n".join(why.lines())
    code = SVM_CODES[name]
    assert v.get("exit_code") == code and f"exit code {code:#x}" in why.headline
    assert why.cause == tuple(s.cur().virt.last_exit.cause)     # the rule's own cause
    if name in SVM_INTERCEPTS:
        word, bit = SVM_INTERCEPTS[name]
        assert v.get(word) >> bit & 1, (name, word, bit)
    if name == "MSR":
        msr, write = s.regs()["rcx"] & 0xFFFFFFFF, v.get("exit_info_1") & 1
        base = {0: 0, 0xC0000000: 0x800, 0xC0010000: 0x1000}[msr & ~0x1FFF]
        n = 8 * base + 2 * (msr & 0x1FFF) + write                   # two bits per MSR
        pm = v.get("msrpm_base_pa")
        assert _bit(s, pm, n) == 1
        assert f"is byte {pm + (n >> 3):#x}" in text
    elif name == "IOIO":
        port = v.get("exit_info_1") >> 16
        assert _bit(s, v.get("iopm_base_pa"), port) == 1              # one bit per port
    elif name == "NPF":
        # EXITINFO2 is the faulting guest-physical address; at the stop the L0 has not mapped
        # it yet, so the nested walk misses there; EXITINFO1 bit 32 (final translation) or 33
        # (a guest page-table access) says which
        from devirt_emu.debugger import state as S
        walk = S.npt_translate(s.machine.mem, v.get("nested_cr3"), v.get("exit_info_2"))
        assert walk["fault"] is not None and "not present" in walk["fault"]
        assert v.get("exit_info_1") >> 32 & 3


@pytest.mark.parametrize("guest", ["exceptions.S", "ipi_pingpong.S", "msr_passthrough.S"])
def test_why_names_the_cause_of_every_svm_exit(guest):
    s = Session(GUESTS / guest, cores=2, arch="svm", config="stock")
    s.break_exit()
    seen: dict[str, int] = {}
    while s.machine.verdict is None:
        st = s.cont()
        if st.kind is not StopKind.VM_EXIT or seen.get(st.name, 0) >= 10:
            continue
        seen[st.name] = seen.get(st.name, 0) + 1
        check_why_svm(s, st.name, s.why())
    assert s.machine.verdict == "pass"
    assert {"CPUID", "HLT", "IOIO", "MSR", "WRITE_CR0", "NPF"} <= set(seen)
