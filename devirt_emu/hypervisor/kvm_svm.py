"""The L0 on AMD: a model of what KVM's svm.c does on each #VMEXIT, then VMRUN.

:class:`KvmSvmL0` is :class:`~devirt_emu.hypervisor.kvm.KvmL0`'s twin for SVM
vCPUs (:class:`~devirt_emu.svm.vcpu.SvmVcpu`), in the configurations of
``configs.py`` (``SVM_CONFIGS``: ``stock``, ``devirt``).  What KVM does the
same on both (the virtual IRR/ISR of the guest's local APIC, KVM's CPUID
leaves, KVM-devirt's paravirtual MSRs and apic_maps page) is
:class:`~devirt_emu.hypervisor.kvm_common.KvmCommon`, shared with the VMX L0.

As on VMX, guest-physical addresses are host-physical ones, the L0's
structures (VMCBs, MSRPMs, the IOPM, the nested page tables) live in the host
area at the top of RAM, and the guest's local APIC is the core's physical
one.  The handlers read the exit from the VMCB (EXITCODE, EXITINFO1/2, nRIP),
never from the rule's decision, and follow ``svm_exit_handlers``:

* INTR: the host takes the interrupt (acknowledges it on the physical APIC)
  for the guest's virtual IRR; VINTR: the interrupt window is open.  Before
  each VMRUN (``prepare_entry``, KVM's inject_pending_event and
  svm_set_irq_window) the highest deliverable vector is injected through
  EVENTINJ when the guest's RFLAGS.IF is set and no interrupt shadow holds,
  else a virtual interrupt (V_IRQ with V_IGN_TPR) and the VINTR intercept
  open a window.
* With V_INTR_MASKING (``stock``) the guest's TPR is V_TPR while it runs and
  the physical TPR while the L0 runs (copied at every #VMEXIT and VMRUN, as
  KVM's sync_cr8_to_lapic / sync_lapic_to_cr8 do), the host keeping the
  physical TPR at 0 meanwhile; without it (``devirt``) the guest owns the
  physical TPR.
* CPUID: the machine's CPU model's leaves (``epyc-rome``; SVM hidden by
  :func:`~devirt_emu.svm.amd_cpu.guest_cpuid`: no nested virtualization) with KVM's; HLT: the vCPU blocks until an
  interrupt is pending; IOIO and MSRs: the platform executes the instruction
  (x2APIC on the physical APIC), KVM's paravirtual MSRs here; CR accesses
  (KVM's cr_interception): CR0/CR3/CR4 in the save area, CR8 the TPR; DR
  accesses: the save area's DR6/DR7, the engine's DR0-DR3; exceptions are
  reflected into the guest; NPF maps the page identity (4 KiB, on demand, as
  KVM's TDP fault does); SHUTDOWN is the guest's triple fault.
* INIT (intercepted here, see configs.py): the vCPU is reset and blocks in
  the host until a SIPI, which starts it in real mode at vector:0000.

Not modelled: task switches (a guest task switch is a fatal error), nested
SVM (VMRUN and the SVM instructions are #UD), AVIC.
"""
from __future__ import annotations

from unicorn import x86_const as UX

from ..events import Kind
from ..platform.core import GuestError, State, _Fault
from ..svm import amd_cpu
from ..svm import exit_codes as X
from ..svm import intercepts as I
from ..svm import vmcb as V
from ..svm.npt import NptBuilder
from ..svm.rules import msrpm_bit
from ..svm.vcpu import SvmVcpu
from ..virt import MachineHypervisor
from .configs import SVM_BOOT_CONFIG, SVM_CONFIGS, SvmConfig
from .kvm_common import PARAVIRT_MSRS, KvmCommon, kvm_cpuid

KVM_ENOSYS = 1000
HOST_TPR = 0
_EXCEPTION = V.SVM_EVTINJ_TYPE_EXEPT
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
CR0_TS = 1 << 3
MSR_IA32_TSC = 0x10
MSR_IA32_APICBASE = 0x1B
#: The reset state (APM Vol. 2, Table 14-1 "Initial Processor State") an INIT gives a vCPU.
INIT_CR0 = 0x60000010


class KvmSvmL0(KvmCommon, MachineHypervisor):
    """KVM's side of one guest on an AMD machine, configuration ``stock`` or ``devirt``."""

    def __init__(self, machine, config: str):
        if config not in SVM_CONFIGS:
            raise ValueError(f"unknown SVM configuration {config!r} (have: {', '.join(SVM_CONFIGS)})")
        if machine.mem.size < 32 << 20:
            raise ValueError("an SVM guest needs at least 32 MiB of RAM (4 MiB are the L0's)")
        self.config_name = config
        self.target = SVM_CONFIGS[config]
        self._init_common(machine)
        self._loaded: dict[int, SvmConfig] = {}
        self._msrpms: dict[str, int] = {}
        self.iopm_pa = self._alloc(3)           # all ones: every port exits (KVM's iopm)
        machine.write_phys(self.iopm_pa, b"\xff" * (12 << 10))
        self.npt = NptBuilder(machine.mem, self._alloc(64), 64 * 4096)   # empty: see h_npf
        #: exit code -> handler(vcpu) (KVM's svm_exit_handlers; replaceable)
        self.handlers = self._make_handlers()

    # ------------------------------------------------------------------ set-up
    def _msrpm(self, cfg: SvmConfig) -> int:
        """An 8 KiB MSRPM: every MSR exits but the configuration's passthrough ones."""
        pa = self._msrpms.get(cfg.name)
        if pa is not None:
            return pa
        pm = bytearray(b"\xff" * (8 << 10))
        for msr, write in [(m, w) for m in cfg.msr_passthrough for w in (False, True)] + \
                [(m, False) for m in cfg.msr_passthrough_read]:
            b = msrpm_bit(msr, write)
            pm[b >> 3] &= ~(1 << (b & 7))
        pa = self._alloc(2)
        self.machine.write_phys(pa, bytes(pm))
        self._msrpms[cfg.name] = pa
        return pa

    def load_config(self, vcpu: SvmVcpu, cfg: SvmConfig) -> None:
        """Write a configuration's intercepts and controls into a vCPU's VMCB."""
        v = vcpu.vmcb
        for w, val in zip(V.INTERCEPT_WORDS, I.words_from_names(cfg.intercepts)):
            v.set(w, val)
        v.set("iopm_base_pa", self.iopm_pa)
        v.set("msrpm_base_pa", self._msrpm(cfg))
        v.set("pause_filter_count", cfg.pause_filter_count)
        v.set("pause_filter_thresh", cfg.pause_filter_thresh)
        int_ctl = v.get("int_ctl") & ~V.V_INTR_MASKING_MASK
        v.set("int_ctl", int_ctl | (V.V_INTR_MASKING_MASK if cfg.v_intr_masking else 0))
        v.set("nested_ctl", V.SVM_NESTED_CTL_NP_ENABLE if cfg.npt else 0)
        v.set("nested_cr3", self.npt.root if cfg.npt else 0)
        v.set("tlb_ctl", V.TLB_CONTROL_FLUSH_ASID)        # the next VMRUN flushes
        self._loaded[vcpu.core.index] = cfg

    def attach(self) -> None:
        """A vCPU per core with a VMCB, the boot-time configuration and the core's
        current state as the guest state."""
        m = self.machine
        boot = SVM_BOOT_CONFIG[self.config_name]
        for core in m.cores:
            pa = self._alloc()
            vcpu = SvmVcpu(core, pa, self, record=m.record_exit)
            v = vcpu.vmcb
            v.set("asid", core.index + 1)
            self.load_config(vcpu, boot)
            vcpu.save_guest_state()
            self.adopt_vcpu(vcpu)

    def launch(self) -> None:
        """VMRUN on every core; an AP waiting for SIPI waits in the host."""
        for vcpu in self.vcpus:
            if vcpu.core.state is State.WAIT_SIPI:
                vcpu.blocked = True
                continue
            if not vcpu.vmrun():
                return

    # ------------------------------------------------------------------ the TPR
    def _v_intr_masking(self, vcpu: SvmVcpu) -> bool:
        return self._loaded[vcpu.core.index].v_intr_masking

    def guest_tpr(self, vcpu: SvmVcpu) -> int:
        if vcpu.active and self._v_intr_masking(vcpu):
            return (vcpu.vmcb.get("int_ctl") & V.V_TPR_MASK) << 4
        return vcpu.core.lapic.tpr

    def tsc_offset(self, vcpu: SvmVcpu) -> int:
        return vcpu.vmcb.get("tsc_offset")

    # ------------------------------------------------------------------ vCPU interface
    def prepare_entry(self, vcpu: SvmVcpu) -> None:
        """Inject the highest deliverable virtual-IRR vector when the guest can
        take it, else open an interrupt window (V_IRQ + VINTR); then the TPR
        goes to V_TPR and the physical TPR to the host."""
        v = vcpu.vmcb
        vec = self.deliverable(vcpu)
        if vec is not None and not v.get("event_inj") & V.SVM_EVTINJ_VALID:
            if v.get("rflags") & (1 << 9) and not v.get("int_state") & V.SVM_INTERRUPT_SHADOW_MASK:
                i = vcpu.core.index
                self.virr[i].discard(vec)
                self.visr[i].append(vec)
                vcpu.inject(vec, V.SVM_EVTINJ_TYPE_INTR)
                vec = self.deliverable(vcpu)
        window = vec is not None
        int_ctl = v.get("int_ctl")
        w3 = v.get("intercept_word3")
        vintr = 1 << (I.INTERCEPT_VINTR & 31)
        if window:
            int_ctl |= V.V_IRQ_MASK | V.V_IGN_TPR_MASK | 0xF << V.V_INTR_PRIO_SHIFT
            w3 |= vintr
        else:
            int_ctl &= ~(V.V_IRQ_MASK | V.V_IGN_TPR_MASK | V.V_INTR_PRIO_MASK)
            w3 &= ~vintr
        if self._v_intr_masking(vcpu):
            tpr = vcpu.core.lapic.exchange_tpr(HOST_TPR)
            int_ctl = int_ctl & ~V.V_TPR_MASK | tpr >> 4
        v.put("int_ctl", int_ctl)
        v.put("intercept_word3", w3)

    def _tpr_from_guest(self, vcpu: SvmVcpu) -> None:
        if self._v_intr_masking(vcpu):
            vcpu.core.lapic.exchange_tpr((vcpu.vmcb.get("int_ctl") & V.V_TPR_MASK) << 4)

    def unblock(self, vcpu: SvmVcpu) -> bool:
        """A vCPU blocked in the host: a SIPI starts an AP waiting for one, an
        interrupt wakes one blocked in HLT (the host takes it for the guest)."""
        core = vcpu.core
        lapic = core.lapic
        if core.state is State.WAIT_SIPI:
            if lapic.take_init():
                return False                      # (already reset)
            vec = lapic.take_sipi()
            if vec is None:
                return False
            self._start_at_sipi(vcpu, vec)
        else:
            vec = lapic.pending_vector()
            if vec is None and self.deliverable(vcpu) is None and not lapic.nmi_pending:
                return False
            if vec is not None:
                lapic.acknowledge()
                self.take_for_guest(vcpu, vec)
        vcpu.blocked = False
        core.state = State.RUNNING
        vcpu.vmrun()
        return True

    def entry_failed(self, vcpu: SvmVcpu, failure) -> None:
        self.machine.guest_error(f"core {vcpu.core.index}: VMRUN failed: {failure}")
        if vcpu.core.in_run:
            vcpu.core.request_stop("exit")

    def handle_exit(self, vcpu: SvmVcpu) -> None:
        """A #VMEXIT: the handler of EXITCODE, read from the VMCB."""
        self._tpr_from_guest(vcpu)
        v = vcpu.vmcb
        code = v.exitcode
        v.put("tlb_ctl", V.TLB_CONTROL_DO_NOTHING)
        handler = self.handlers.get(code)
        if handler is None:
            self._fatal(vcpu, f"the L0 has no handler for #VMEXIT {X.name_of(code)} at RIP "
                              f"{v.get('rip'):#x}")
            return
        try:
            handler(vcpu)
        except _Fault as f:
            vcpu.inject(f.vector, _EXCEPTION, f.error_code)
        except GuestError as e:
            self._fatal(vcpu, str(e))

    # ------------------------------------------------------------------ handlers
    def _make_handlers(self):
        h = {
            X.INTR: self.h_intr, X.NMI: self.h_nothing, X.SMI: self.h_nothing,
            X.VINTR: self.h_nothing, X.INIT: self.h_init,
            X.CPUID: self.h_cpuid, X.HLT: self.h_hlt, X.IOIO: self.h_native,
            X.MSR: self.h_msr, X.NPF: self.h_npf, X.SHUTDOWN: self.h_shutdown,
            X.INVD: self.h_skip, X.WBINVD: self.h_skip, X.MONITOR: self.h_skip,
            X.MWAIT: self.h_skip, X.PAUSE: self.h_skip, X.INVLPG: self.h_skip,
            X.RDPMC: self.h_gp, X.XSETBV: self.h_gp, X.VMMCALL: self.h_vmmcall,
            X.CR0_SEL_WRITE: self.h_cr, X.TASK_SWITCH: self.h_task_switch,
        }
        for n in range(16):
            h[X.READ_CR0 + n] = h[X.WRITE_CR0 + n] = self.h_cr
            h[X.READ_DR0 + n] = h[X.WRITE_DR0 + n] = self.h_dr
        for v in range(32):
            h[X.EXCP_BASE + v] = self.h_exception
        for name in ("VMRUN", "VMLOAD", "VMSAVE", "STGI", "CLGI", "SKINIT", "INVLPGA", "RDPRU",
                     "RSM"):
            h[X.TABLE[name]] = self.h_ud
        return h

    def h_nothing(self, vcpu):
        """NMI, SMI (the host's), VINTR (prepare_entry injects now)."""

    def h_skip(self, vcpu):
        """INVD, WBINVD, MONITOR, MWAIT, PAUSE, INVLPG: skip it."""
        vcpu.skip_instruction()

    def h_gp(self, vcpu):
        vcpu.inject(13, _EXCEPTION, 0)

    def h_ud(self, vcpu):
        """The SVM instructions: no nested SVM, #UD."""
        vcpu.inject(6, _EXCEPTION)

    def h_vmmcall(self, vcpu):
        """Hypercalls: none is implemented, RAX = -KVM_ENOSYS."""
        vcpu.set_gpr(0, -KVM_ENOSYS)
        vcpu.skip_instruction()

    def h_intr(self, vcpu):
        """A physical interrupt: the host takes it; it is the guest's (its APIC is physical)."""
        lapic = vcpu.core.lapic
        vec = lapic.pending_vector()
        if vec is not None:
            lapic.acknowledge()
            self.take_for_guest(vcpu, vec)

    def h_shutdown(self, vcpu):
        self.shut_down(vcpu, "triple fault (#VMEXIT SHUTDOWN)")

    def h_exception(self, vcpu):
        """An intercepted exception is reflected into the guest (a #PF with its
        address in CR2, from EXITINFO2)."""
        v = vcpu.vmcb
        vec = v.exitcode - X.EXCP_BASE
        if vec == 14:
            v.put("cr2", v.get("exit_info_2"))
            vcpu.core.set_cr2(v.get("exit_info_2"))
        ec = v.get("exit_info_1") & 0xFFFFFFFF if vec in _ERROR_CODE_VECTORS else None
        vcpu.inject(vec, _EXCEPTION, ec)

    def h_cpuid(self, vcpu):
        """CPUID: the AMD model (SVM hidden) plus the hypervisor bit and KVM's leaves."""
        core = vcpu.core
        leaf = vcpu.gpr(0) & 0xFFFFFFFF
        sub = vcpu.gpr(1) & 0xFFFFFFFF
        n = len(self.machine.cores)
        cpu = self.machine.cpu
        regs = kvm_cpuid(leaf, sub, lambda lf, sl: amd_cpu.guest_cpuid(
            cpu.cpuid_for(lf, sl, core.apic_id, n), lf), devirt=self.config_name == "devirt")
        for r, val in zip((0, 3, 1, 2), regs):
            vcpu.set_gpr(r, val)
        vcpu.skip_instruction()

    def h_msr(self, vcpu):
        """RDMSR/WRMSR (EXITINFO1 1: a write): KVM-devirt's paravirtual MSRs here,
        IA32_TSC with the TSC offset, the x2APIC reads over the virtual IRR/ISR,
        the EOI of an injected vector; everything else on the platform."""
        v = vcpu.vmcb
        write = v.get("exit_info_1") == 1
        index = vcpu.gpr(1) & 0xFFFFFFFF
        value = (vcpu.gpr(2) & 0xFFFFFFFF) << 32 | vcpu.gpr(0) & 0xFFFFFFFF
        if index in PARAVIRT_MSRS:
            if not write:
                raise _Fault(13, 0)
            self.paravirt_wrmsr(vcpu, index, value)
            vcpu.skip_instruction()
            return
        if not write:
            val = self.apic_register_read(vcpu, index) if vcpu.core.lapic.x2apic_enabled else None
            if val is None and index == MSR_IA32_TSC:
                val = (vcpu.core.tsc() + v.get("tsc_offset")) & ((1 << 64) - 1)
            if val is not None:
                vcpu.set_gpr(0, val & 0xFFFFFFFF)
                vcpu.set_gpr(2, val >> 32)
                vcpu.skip_instruction()
                return
        elif index == 0x80B and self.guest_eoi(vcpu):
            vcpu.skip_instruction()
            return
        vcpu.emulate_on_platform()

    def h_cr(self, vcpu):
        """KVM's cr_interception: MOV CR (decode assists give the GPR in
        EXITINFO1[3:0] with bit 63 set), CLTS, LMSW, SMSW."""
        v = vcpu.vmcb
        code = v.exitcode
        info = v.get("exit_info_1")
        ev = vcpu.exit_event
        write = code != X.CR0_SEL_WRITE and code >= X.WRITE_CR0
        cr = 0 if code == X.CR0_SEL_WRITE else (code - X.WRITE_CR0 if write else code - X.READ_CR0)
        if code == X.CR0_SEL_WRITE:
            write = True
        if not info >> 63:
            insn = ev.insn if ev is not None else None
            if insn is None:
                raise GuestError("a CR exit without its instruction")
            if insn.kind is Kind.CLTS:
                v.put("cr0", v.get("cr0") & ~CR0_TS)
            elif insn.kind is Kind.LMSW:
                src = vcpu.gpr(insn.gpr) if insn.mem is None else \
                    int.from_bytes(vcpu.core.read_linear(ev.linear, 2), "little")
                cr0 = v.get("cr0")
                v.put("cr0", cr0 & ~0xE | src & 0xF | cr0 & 1)
            else:                                  # SMSW
                raise GuestError("SMSW under the CR0 read intercept is not modelled")
            vcpu.skip_instruction()
            return
        gpr = info & 0xF
        if write:
            value = vcpu.gpr(gpr)
            if cr in (0, 3, 4):
                v.put(f"cr{cr}", value)
            elif cr == 8:
                if value >> 4:
                    raise _Fault(13, 0)
                vcpu.core.lapic.exchange_tpr(value << 4)
            else:
                raise _Fault(6, None)
        else:
            if cr in (0, 3, 4):
                value = v.get(f"cr{cr}")
            elif cr == 8:
                value = vcpu.core.lapic.tpr >> 4
            elif cr == 2:
                value = v.get("cr2")
            else:
                raise _Fault(6, None)
            vcpu.set_gpr(gpr, value)
        vcpu.skip_instruction()

    def h_dr(self, vcpu):
        """MOV DR: DR6/DR7 in the save area, DR0-DR3 in the engine."""
        v = vcpu.vmcb
        code = v.exitcode
        write = code >= X.WRITE_DR0
        dr = code - (X.WRITE_DR0 if write else X.READ_DR0)
        gpr = v.get("exit_info_1") & 0xF
        regs = {0: UX.UC_X86_REG_DR0, 1: UX.UC_X86_REG_DR1, 2: UX.UC_X86_REG_DR2,
                3: UX.UC_X86_REG_DR3}
        dr = {4: 6, 5: 7}.get(dr, dr)
        if write:
            value = vcpu.gpr(gpr)
            if dr in (6, 7):
                v.put(f"dr{dr}", value & 0xFFFFFFFF)
            else:
                vcpu.core.uc.reg_write(regs[dr], value)
        else:
            value = v.get(f"dr{dr}") if dr in (6, 7) else vcpu.core.uc.reg_read(regs[dr])
            vcpu.set_gpr(gpr, value)
        vcpu.skip_instruction()

    def h_npf(self, vcpu):
        """NPF (KVM's npf_interception and its TDP fault): map the faulting page
        identity, read/write/execute, if it is guest RAM or the local APIC's page:
        its whole 2 MiB with one large page when all of it is guest RAM and
        nothing is mapped there yet (as the VMX L0's EPT does), else 4 KiB."""
        v = vcpu.vmcb
        gpa = v.get("exit_info_2")
        page = gpa & ~0xFFF
        if not (page < self.guest_ram or page == 0xFEE00000):
            self._fatal(vcpu, f"nested page fault at guest-physical {gpa:#x} outside guest RAM "
                              f"(EXITINFO1 {v.get('exit_info_1'):#x})")
            return
        big = gpa & ~0x1FFFFF
        if big + 0x200000 <= self.guest_ram and self.npt.leaf_level(big) is None:
            self.npt.map(big, big, 0x200000, page_size=0x200000)
        else:
            self.npt.map(page, page)
        v.put("tlb_ctl", V.TLB_CONTROL_FLUSH_ASID)

    def h_init(self, vcpu):
        """INIT: the vCPU is reset (APM Table 14-1) and waits for SIPI in the host."""
        v = vcpu.vmcb
        core = vcpu.core
        core.lapic.take_init()
        for name in ("es", "ss", "ds"):
            v.put(f"{name}_selector", 0)
            v.put(f"{name}_base", 0)
            v.put(f"{name}_limit", 0xFFFF)
            v.put(f"{name}_attrib", 0x93)
        v.put("cs_selector", 0xF000)
        v.put("cs_base", 0xFFFF0000)
        v.put("cs_limit", 0xFFFF)
        v.put("cs_attrib", 0x9B)
        v.put("gdtr_base", 0)
        v.put("gdtr_limit", 0xFFFF)
        v.put("idtr_base", 0)
        v.put("idtr_limit", 0xFFFF)
        v.put("cr0", INIT_CR0)
        v.put("cr3", 0)
        v.put("cr4", 0)
        v.put("efer", amd_cpu.EFER_SVME)
        v.put("rflags", 2)
        v.put("rip", 0xFFF0)
        v.put("int_state", 0)
        v.put("event_inj", 0)
        core.lapic.init_reset()
        i = core.index
        self.virr[i].clear()
        self.visr[i].clear()
        if i in self.devirtualized:
            self.devirtualized.discard(i)
            self.load_config(vcpu, SVM_BOOT_CONFIG[self.config_name])
        self.block(vcpu, State.WAIT_SIPI)

    def _start_at_sipi(self, vcpu: SvmVcpu, vector: int) -> None:
        v = vcpu.vmcb
        v.put("cs_selector", vector << 8)
        v.put("cs_base", vector << 12)
        v.put("rip", 0)

    def h_task_switch(self, vcpu):
        self._fatal(vcpu, "a task switch under SVM is not modelled")

    # ------------------------------------------------------------------ KVM-devirt
    def devirtualize(self, vcpu: SvmVcpu) -> None:
        """The guest asked to devirtualize this core: load the target configuration."""
        if self.config_name != "devirt" or vcpu.core.index in self.devirtualized:
            return
        cr0 = vcpu.vmcb.get("cr0")
        if not (cr0 & 1 and cr0 >> 31):
            raise _Fault(13, 0)                   # only from paged protected mode
        self.load_config(vcpu, self.target)
        self.devirtualized.add(vcpu.core.index)
