"""The L0: a model of what KVM does on each VM exit, then VM entry.

One :class:`KvmL0` per machine runs one guest whose vCPU ``i`` is pinned to
core ``i`` (KVM-devirt's partitioning: a bare-metal machine owns its cores).
Guest-physical addresses are host-physical ones (identity); the L0's own
structures (VMCSs, MSR bitmaps, EPT tables) live in a host-reserved area at
the top of RAM that the guest is told is not its own (boot info RAM size).

The EPT starts empty and is built on demand, as KVM's EPT-violation handler
does (``h_ept_violation``): the first access to a guest-physical page exits
and the L0 maps it.

Exit handling follows KVM's ``kvm_vmx_exit_handlers``; what each handler does
is documented on it.  The platform executes whatever the L0 emulates on the
hardware (port I/O, MSRs the machine implements, x2APIC accesses on the
core's physical local APIC), through the same code as native mode.

The guest's local APIC is the core's physical one, with KVM's share of it
(interrupts the host took for the guest, :attr:`KvmL0.virr`/``visr``) kept
here.  With the TPR shadow (both configurations) each vCPU has a
virtual-APIC page in the host area, and the guest's TPR lives in its VTPR
while the vCPU runs and in the physical TPR while the L0 runs: the L0 copies
it across at every VM exit and before every VM entry, where it also sets
TPR_THRESHOLD as KVM does and hands the physical TPR to the host (see
``configs.py``, "The local APIC").  The APIC-access page is the xAPIC page
at guest-physical 0xFEE00000, watched while the guest's APIC is in xAPIC
mode; APIC-access exits are emulated on the physical APIC.

With the ``apicv`` set the guest's interrupts are posted (:meth:`KvmL0.post`) and
reach the guest through RVI and virtual-interrupt delivery instead.  On a
devirtualized core (``devirt``) an interrupt the L0 wants to inject is a
self-IPI on the physical APIC at the next entry (:meth:`KvmL0.inject_as_self_ipis`),
and the host takes a core back with an NMI and a forced failed VM entry
(:meth:`KvmL0.take_back`, :meth:`KvmL0.give_back`), as KVM-devirt does.
"""
from __future__ import annotations

import struct

from unicorn import x86_const as X

from ..x86 import X86_CR4_VMXE
from ..events import Event, Kind
from ..platform import cpuid as cpuid_model
from ..platform.core import GPR_IDS, GuestError, State, _Fault, descriptor_cache
from ..platform.descriptors import desc_type
from ..platform.lapic import (APIC_DEST_SELF, APIC_DM_NMI, APIC_DM_SHIFT, APIC_INT_ASSERT,
                              APIC_SHORT_SHIFT, MSR_IA32_APICBASE, GeneralProtection)
from ..platform.paging import (PageFault, UnsupportedPaging, pdpt_address, pdpte_reserved,
                               pdptes_reload)
from ..platform.tasks import MIN_TSS_LIMIT, TSS32_AVAILABLE, tss_layout
from ..platform.ucinternals import ENV_GDT
from ..virt import MachineHypervisor
from ..vmx import capabilities as caps
from ..vmx import controls as C
from ..vmx import exit_info as XI
from ..vmx import exit_reasons as ER
from ..vmx.ept import EptBuilder, EptBuildError
from ..vmx.fields import VmcsField as F
from ..vmx.vcpu import VmxVcpu
from ..vmx.vmcs import Vmcs
from ..vmx import apicv as A
from .configs import (APIC_ACCESS_PAGE_GPA, BOOT_CONFIG, POSTED_INTR_VECTOR,
                      POSTED_INTR_WAKEUP_VECTOR, VMX_CONFIGS, VmxConfig)
from .kvm_common import PARAVIRT_MSRS, KvmCommon, kvm_cpuid

KVM_ENOSYS = 1000
INIT_CR0 = 0x60000010          # CR0 after INIT (CD, NW, ET)
_PROC = int(F.CPU_BASED_VM_EXEC_CONTROL)
# The exit-information fields the handlers read (VMREAD), bound once.
_EXIT_REASON = int(F.VM_EXIT_REASON)
_QUALIFICATION = int(F.EXIT_QUALIFICATION)
_EXIT_INTR_INFO = int(F.VM_EXIT_INTR_INFO)
_EXIT_INTR_ERROR_CODE = int(F.VM_EXIT_INTR_ERROR_CODE)
_EXIT_INSTRUCTION_LEN = int(F.VM_EXIT_INSTRUCTION_LEN)
_GUEST_PHYSICAL_ADDRESS = int(F.GUEST_PHYSICAL_ADDRESS)
_APIC_ACCESS_ADDR = int(F.APIC_ACCESS_ADDR)
#: String I/O mnemonics (the L0's emulator does not take them on the APIC page).
_STRING_IO = frozenset({"insb", "insw", "insd", "outsb", "outsw", "outsd"})

#: Host state that VM exits would load (a 64-bit Linux host, as KVM's vmx_set_constant_host_state).
HOST_STATE = {
    F.HOST_CR0: 0x80050033, F.HOST_CR4: 0x3726E0 | X86_CR4_VMXE, F.HOST_CS_SELECTOR: 0x10,
    F.HOST_SS_SELECTOR: 0x18, F.HOST_DS_SELECTOR: 0, F.HOST_ES_SELECTOR: 0,
    F.HOST_FS_SELECTOR: 0, F.HOST_GS_SELECTOR: 0, F.HOST_TR_SELECTOR: 0x40,
    F.HOST_IA32_PAT: 0x0407050600070106, F.HOST_IA32_EFER: 0xD01,
    F.HOST_RIP: 0xFFFFFFFF81000000, F.HOST_RSP: 0xFFFFC90000008000,
    F.HOST_TR_BASE: 0xFFFFFE0000003000, F.HOST_GDTR_BASE: 0xFFFFFE0000001000,
    F.HOST_IDTR_BASE: 0xFFFFFE0000000000,
}


def prepare_vmcs(vcpu: VmxVcpu, host_cr3: int) -> None:
    """Fill a fresh VMCS as KVM's vcpu set-up does, controls aside (write them
    first): the host state, no VMCS link, the core's current state as the guest
    state, and CR0/CR4 read shadows showing the guest its own values.  The
    host's CR4 keeps only the bits the CPU model allows in VMX operation
    (a Linux host enables no feature its processor lacks)."""
    v = vcpu.vmcs
    for f, val in HOST_STATE.items():
        v.set(f, val)
    cr4_fixed1 = vcpu.model.vmx_msrs[caps.MSR_IA32_VMX_CR4_FIXED1]
    v.set(F.HOST_CR4, HOST_STATE[F.HOST_CR4] & cr4_fixed1)
    v.set(F.HOST_CR3, host_cr3)
    v.set(F.VMCS_LINK_POINTER, (1 << 64) - 1)
    vcpu.save_guest_state()
    v.set(F.CR0_READ_SHADOW, v.get(F.GUEST_CR0))
    v.set(F.CR4_READ_SHADOW, v.get(F.GUEST_CR4) & ~X86_CR4_VMXE)


#: Bytes of a 32-bit TSS a task switch reads and writes (its last byte is the minimum limit).
TSS32_SIZE = MIN_TSS_LIMIT[TSS32_AVAILABLE] + 1

#: Local APIC register offsets (xAPIC page; the virtual-APIC page has the same layout).
APIC_TASKPRI, APIC_EOI = 0x80, 0xB0
#: The physical TPR while a guest runs with the TPR shadow: the host's (a Linux host keeps 0;
#: KVM-devirt's 0xB0 is not modelled, see configs.py).
HOST_TPR = 0
_APIC_ACCESS_TYPE_NAMES = {
    XI.APIC_ACCESS_LINEAR_FETCH: "linear instruction fetch",
    XI.APIC_ACCESS_LINEAR_EVENT_DELIVERY: "linear access during event delivery",
    XI.APIC_ACCESS_GUEST_PHYS_EVENT_DELIVERY: "guest-physical access during event delivery",
    XI.APIC_ACCESS_GUEST_PHYS_INSN: "guest-physical instruction fetch or execution",
}


def tpr_threshold(tpr: int, max_irr: int | None) -> int:
    """TPR_THRESHOLD as KVM sets it before a VM entry (``update_cr8_intercept``
    in x86.c, ``vmx_update_cr8_intercept``): with ``max_irr`` the highest
    vector in the guest's IRR (None: nothing pending) and ``tpr`` its 8-bit
    TPR, the pending vector's priority class when the TPR's class masks it
    (TPR[7:4] >= class), so that the guest lowering its TPR below that class
    exits; 0 (never exits) otherwise."""
    if max_irr is None:
        return 0
    irr_class = max_irr >> 4
    return irr_class if tpr >> 4 >= irr_class else 0


class KvmL0(KvmCommon, MachineHypervisor):
    """KVM's side of one guest on a machine, configuration ``stock`` or ``devirt``
    (the hypervisor of :mod:`devirt_emu.virt` for its VMX vCPUs)."""

    def __init__(self, machine, config: str):
        if config not in VMX_CONFIGS:
            raise ValueError(f"unknown VMX configuration {config!r} (have: {', '.join(VMX_CONFIGS)})")
        self.config_name = config
        self.target = VMX_CONFIGS[config]
        # The firmware starts each vCPU in real mode; without unrestricted guest KVM
        # would emulate it (vm86 and its real-mode emulator), which is not modelled.
        if caps.is_allowed("PROCBASED2", C.SECONDARY_EXEC_UNRESTRICTED_GUEST, model=machine.cpu):
            raise ValueError(f"CPU model {machine.cpu.name} has no unrestricted guest, which the "
                             "KVM model needs to run the firmware's real-mode start "
                             "(KVM's real-mode emulation is not modelled)")
        mem = machine.mem
        if mem.size < 32 << 20:
            raise ValueError("a VMX guest needs at least 32 MiB of RAM (4 MiB are the L0's)")
        self._init_common(machine)
        #: KVM-devirt taking cores back: vCPUs an NMI has been sent to, and those whose
        #: forced failed VM entry returned the core to the host (see take_back)
        self.taking_back: set[int] = set()
        self.taken_back: set[int] = set()
        self._held_rflags: dict[int, int] = {}     # the real GUEST_RFLAGS of a taken-back vCPU
        # per vCPU: its virtual-APIC page, the control set loaded, where its VTPR
        # is while that set has the TPR shadow (None: no TPR shadow), and the
        # TPR_THRESHOLD the L0 last wrote (only the L0 writes it)
        self.vapic_pa: dict[int, int] = {}
        self._loaded: dict[int, VmxConfig] = {}
        self._vtpr_at: dict[int, int | None] = {}
        self._threshold: dict[int, int] = {}
        self._bitmaps: dict[tuple, int] = {}
        #: per vCPU: its posted-interrupt descriptor (the apicv set)
        self.pi_desc: dict[int, int] = {}
        self.ept = EptBuilder(mem, self._alloc(64), 64 * 4096)     # empty: see h_ept_violation
        #: basic exit reason -> handler(vcpu) (KVM's kvm_vmx_exit_handlers; replaceable)
        self.handlers = self._make_handlers()

    # ------------------------------------------------------------------ set-up
    def _msr_bitmap(self, cfg: VmxConfig, x2apic: bool = False) -> int:
        """A 4 KiB MSR bitmap: every MSR exits but the configuration's passthrough ones
        (with ``x2apic``, also its x2APIC-mode ones)."""
        pa = self._bitmaps.get((cfg.name, x2apic))
        if pa is not None:
            return pa
        bm = bytearray(b"\xff" * 4096)

        def clear(msr, write):
            if msr <= 0x1FFF:
                base, bit = (0x800 if write else 0), msr
            else:
                base, bit = (0xC00 if write else 0x400), msr - 0xC0000000
            bm[base + bit // 8] &= ~(1 << (bit % 8))
        for msr in cfg.msr_passthrough:
            clear(msr, False)
            clear(msr, True)
        for msr in cfg.msr_passthrough_read:
            clear(msr, False)
        if x2apic:
            for msr in cfg.x2apic_passthrough_read:
                clear(msr, False)
            for msr in cfg.x2apic_passthrough_write:
                clear(msr, True)
        pa = self._alloc()
        self.machine.write_phys(pa, bytes(bm))
        self._bitmaps[(cfg.name, x2apic)] = pa
        return pa

    def load_controls(self, vcpu: VmxVcpu, cfg: VmxConfig) -> None:
        """Write a configuration's control set into a vCPU's VMCS (legal per the capability MSRs)."""
        v = vcpu.vmcs
        s = v.set
        cpu = vcpu.model
        s(F.PIN_BASED_VM_EXEC_CONTROL, caps.make_legal("PINBASED", cfg.pin, model=cpu))
        s(F.CPU_BASED_VM_EXEC_CONTROL, caps.make_legal("PROCBASED", cfg.primary, model=cpu))
        s(F.SECONDARY_VM_EXEC_CONTROL, caps.make_legal("PROCBASED2", cfg.secondary, model=cpu))
        s(F.VM_EXIT_CONTROLS, caps.make_legal("EXIT", cfg.exit, model=cpu))
        ia32e = v.get(F.VM_ENTRY_CONTROLS) & C.VM_ENTRY_IA32E_MODE
        s(F.VM_ENTRY_CONTROLS, caps.make_legal("ENTRY", cfg.entry, model=cpu) | ia32e)
        s(F.EXCEPTION_BITMAP, cfg.exception_bitmap)
        s(F.PAGE_FAULT_ERROR_CODE_MASK, 0)
        s(F.PAGE_FAULT_ERROR_CODE_MATCH, 0)
        s(F.CR3_TARGET_COUNT, 0)
        s(F.MSR_BITMAP, self._msr_bitmap(cfg))
        s(F.CR0_GUEST_HOST_MASK, cfg.cr0_mask)
        s(F.CR4_GUEST_HOST_MASK, cfg.cr4_mask)
        if cfg.secondary & C.SECONDARY_EXEC_ENABLE_EPT:
            s(F.EPT_POINTER, self.ept.eptp)
        if cfg.secondary & C.SECONDARY_EXEC_ENABLE_VPID:
            s(F.VIRTUAL_PROCESSOR_ID, vcpu.core.index + 1)
        if caps.is_field_supported(F.PLE_GAP, cpu):        # (cpu_has_vmx_ple)
            s(F.PLE_GAP, cfg.ple_gap)
            s(F.PLE_WINDOW, cfg.ple_window)
        i = vcpu.core.index
        self._loaded[i] = cfg
        self._vtpr_at[i] = None
        if cfg.primary & C.CPU_BASED_TPR_SHADOW:
            s(F.VIRTUAL_APIC_PAGE_ADDR, self.vapic_pa[i])
            self._vtpr_at[i] = self.vapic_pa[i] + APIC_TASKPRI
        if cfg.secondary & C.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES:
            s(F.APIC_ACCESS_ADDR, APIC_ACCESS_PAGE_GPA)
        if cfg.apicv:
            # vmx_vcpu_setup / vmx_vcpu_reset with APICv: the EOI-exit bitmap (no
            # level-triggered IOAPIC vectors here), the guest-interrupt status, the
            # notification vector and the vCPU's descriptor
            for n in range(4):
                s(F[f"EOI_EXIT_BITMAP{n}"], 0)
            s(F.GUEST_INTR_STATUS, 0)
            s(F.POSTED_INTR_NV, POSTED_INTR_VECTOR)
            s(F.POSTED_INTR_DESC_ADDR, self.pi_desc[i])
            self.mirror_apic(vcpu)
        self.set_virtual_apic_mode(vcpu)

    def set_virtual_apic_mode(self, vcpu: VmxVcpu) -> None:
        """KVM's ``vmx_set_virtual_apic_mode`` (on every change of the guest's APIC
        mode): "virtualize APIC accesses", when the loaded set has it, only while
        the guest's APIC is in xAPIC mode; cleared in x2APIC mode and while the
        APIC is disabled (the modelled CPU has no "virtualize x2APIC mode")."""
        v = vcpu.vmcs
        cfg = self._loaded[vcpu.core.index]
        lapic = vcpu.core.lapic
        sec = v.get(F.SECONDARY_VM_EXEC_CONTROL)
        want = sec & ~(C.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES
                       | C.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE)
        if cfg.secondary & C.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES and lapic.xapic_enabled:
            want |= C.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES
        if cfg.secondary & C.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE and lapic.x2apic_enabled:
            want |= C.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE
        if want != sec:
            v.set(F.SECONDARY_VM_EXEC_CONTROL, want)
        bitmap = self._msr_bitmap(cfg, x2apic=bool(cfg.x2apic_passthrough_read
                                                   or cfg.x2apic_passthrough_write)
                                  and lapic.x2apic_enabled)
        if v.get(F.MSR_BITMAP) != bitmap:
            v.set(F.MSR_BITMAP, bitmap)
        if cfg.apicv:
            self.mirror_apic(vcpu)

    def attach(self) -> None:
        """Create a vCPU per core with a fresh VMCS, the boot-time controls, the
        host state and the core's current state as the guest state."""
        m = self.machine
        boot = BOOT_CONFIG[self.config_name]
        for core in m.cores:
            vmcs_pa = self._alloc()
            Vmcs.format(m.mem, vmcs_pa, model=m.cpu)
            vcpu = VmxVcpu(core, vmcs_pa, self, record=m.record_exit)
            self.vapic_pa[core.index] = self._alloc()      # KVM: the software APIC's register page
            self.pi_desc[core.index] = self._alloc()       # KVM: vmx->pi_desc (64 bytes used)
            self._threshold[core.index] = 0                # (the formatted VMCS holds 0)
            v = vcpu.vmcs
            v.set(F.TSC_OFFSET, 0)
            self.load_controls(vcpu, boot)
            prepare_vmcs(vcpu, self.host_base)
            v.set(F.GUEST_CR0, v.get(F.GUEST_CR0) | (1 << 5))  # CR0.NE is fixed to 1 in VMX operation
            self.adopt_vcpu(vcpu)

    def launch(self) -> None:
        """VMLAUNCH on every core (the APs sit in wait-for-SIPI)."""
        for vcpu in self.vcpus:
            if not vcpu.vm_entry(launch=True):
                return

    # ------------------------------------------------------------------ vCPU interface
    def take_for_guest(self, vcpu: VmxVcpu, vector: int) -> None:
        """The host took a guest interrupt (acknowledged on exit or while the vCPU
        was blocked): end it on the physical APIC; with APICv post it
        (__apic_accept_irq), else keep it in the virtual IRR."""
        if self._loaded[vcpu.core.index].apicv:
            vcpu.core.lapic.eoi()
            self.post(vcpu, vector)
            return
        super().take_for_guest(vcpu, vector)

    def prepare_entry(self, vcpu: VmxVcpu) -> None:
        """KVM's inject_pending_event: inject the highest deliverable virtual-IRR
        vector if the guest can take it, else ask for an interrupt-window exit."""
        v = vcpu.vmcs
        primary = v.peek(_PROC)
        if self._loaded[vcpu.core.index].apicv:
            self.sync_pir_to_irr(vcpu)
        if vcpu.core.index in self.devirtualized and self.virr[vcpu.core.index]:
            self.inject_as_self_ipis(vcpu)
        vec = self.deliverable(vcpu)
        if vec is not None and not v.get(F.VM_ENTRY_INTR_INFO_FIELD) & C.INTR_INFO_VALID_MASK:
            rflags = v.get(F.GUEST_RFLAGS)
            blocked = v.get(F.GUEST_INTERRUPTIBILITY_INFO) & (C.GUEST_INTR_STATE_STI
                                                              | C.GUEST_INTR_STATE_MOV_SS)
            if rflags & (1 << 9) and not blocked:
                i = vcpu.core.index
                self.virr[i].discard(vec)
                self.visr[i].append(vec)
                vcpu.inject(vec, C.INTR_TYPE_EXT_INTR)
                if v.get(F.GUEST_ACTIVITY_STATE) == C.GUEST_ACTIVITY_HLT:
                    v.set(F.GUEST_ACTIVITY_STATE, C.GUEST_ACTIVITY_ACTIVE)
                vec = self.deliverable(vcpu)
        want_window = vec is not None
        if want_window != bool(primary & C.CPU_BASED_INTR_WINDOW_EXITING):
            v.set(F.CPU_BASED_VM_EXEC_CONTROL, primary ^ C.CPU_BASED_INTR_WINDOW_EXITING)
        self._tpr_to_guest(vcpu)

    # ----- the TPR: VTPR while the guest runs, the physical TPR while the L0 does
    def guest_tpr(self, vcpu: VmxVcpu) -> int:
        """The guest's TPR: VTPR while the vCPU runs with the TPR shadow, else
        the physical local APIC's (where the L0 keeps it between exit and entry)."""
        at = self._vtpr_at[vcpu.core.index]
        if at is not None and vcpu.active:
            return self.machine.mem.view[at]
        return vcpu.core.lapic.tpr

    def _tpr_from_guest(self, vcpu: VmxVcpu) -> None:
        """At a VM exit: the guest's TPR from VTPR into the physical TPR, so that
        the L0's emulation on the physical APIC sees it (KVM's VTPR is its APIC's
        TPR register itself)."""
        at = self._vtpr_at[vcpu.core.index]
        if at is not None:
            vcpu.core.lapic.exchange_tpr(self.machine.mem.view[at])

    def _tpr_to_guest(self, vcpu: VmxVcpu) -> None:
        """Before a VM entry: the guest's TPR back into VTPR (bytes 3:1 zero, as
        the APIC's TPR register reads), TPR_THRESHOLD from the highest vector in
        the virtual IRR (:func:`tpr_threshold`), then the physical TPR is the
        host's (:data:`HOST_TPR`) while the guest runs."""
        i = vcpu.core.index
        at = self._vtpr_at[i]
        if at is None:
            return
        lapic = vcpu.core.lapic
        tpr = lapic.exchange_tpr(HOST_TPR)      # the host's TPR while the guest runs
        mem = self.machine.mem
        if mem.view[at] != tpr:
            mem.write(at, bytes((tpr, 0, 0, 0)))
        virr = self.virr[i]
        threshold = tpr_threshold(tpr, max(virr)) if virr else 0
        if threshold != self._threshold[i]:
            vcpu.vmcs.set(F.TPR_THRESHOLD, threshold)
            self._threshold[i] = threshold

    def inject_as_self_ipis(self, vcpu: VmxVcpu) -> None:
        """KVM-devirt: on a devirtualized core an interrupt KVM wants to inject is
        not event injection but a self-IPI on the physical local APIC at the next
        VM entry: the guest takes it through its IDT (no external-interrupt
        exiting) and ends it with its own EOI, which reaches the physical APIC (the
        EOI MSR is passed through), so no virtual ISR is kept for it."""
        lapic = vcpu.core.lapic
        virr = self.virr[vcpu.core.index]
        for vector in sorted(virr):
            self.machine.bus.send(lapic, APIC_DEST_SELF << APIC_SHORT_SHIFT | vector)
        virr.clear()

    # ----- KVM-devirt: taking a core back -----------------------------------
    def take_back(self, vcpu: VmxVcpu) -> None:
        """The host takes a devirtualized core back (KVM-devirt): it sends the core
        an NMI; NMI exiting (on in every set) makes it a VM exit, and the L0 then
        forces the next VM entry to fail, which returns the core to the host: the
        vCPU stops until :meth:`give_back`."""
        self.taking_back.add(vcpu.core.index)
        src = self.machine.current or vcpu.core
        dest = vcpu.core.apic_id << (32 if src.lapic.x2apic_enabled else 56)
        self.machine.bus.send(src.lapic, dest | APIC_INT_ASSERT | APIC_DM_NMI << APIC_DM_SHIFT)

    def _force_failed_entry(self, vcpu: VmxVcpu) -> None:
        """Make the next VM entry fail its guest-state checks: RFLAGS bit 1, which
        must be 1 (SDM "Checks on Guest RIP, RFLAGS, and SSP"), is cleared; the
        real value is kept and restored when the core is given back."""
        v = vcpu.vmcs
        self._held_rflags[vcpu.core.index] = v.get(F.GUEST_RFLAGS)
        v.set(F.GUEST_RFLAGS, v.get(F.GUEST_RFLAGS) & ~2)

    def give_back(self, vcpu: VmxVcpu) -> bool:
        """Return a taken-back core to its guest: the guest state as it was, VM entry."""
        i = vcpu.core.index
        if i not in self.taken_back:
            return False
        self.taken_back.discard(i)
        vcpu.vmcs.set(F.GUEST_RFLAGS, self._held_rflags.pop(i))
        vcpu.parked = vcpu.blocked = False
        vcpu.core.state = State.RUNNING
        return vcpu.vm_entry()

    def has_pending(self, vcpu: VmxVcpu) -> bool:
        if self._loaded[vcpu.core.index].apicv:
            return self.apicv_pending(vcpu)
        return super().has_pending(vcpu)

    # ----- APICv: posted interrupts and the virtual-APIC page --------------
    def _page(self, vcpu: VmxVcpu) -> A.BytesPage:
        """The vCPU's virtual-APIC page, read (write it back with :meth:`_put_page`)."""
        return A.BytesPage(bytearray(self.machine.mem.read(self.vapic_pa[vcpu.core.index], 4096)))

    def _put_page(self, vcpu: VmxVcpu, page: A.BytesPage) -> None:
        self.machine.mem.write(self.vapic_pa[vcpu.core.index], bytes(page.data))

    def post(self, target: VmxVcpu, vector: int) -> None:
        """KVM's ``vmx_deliver_posted_interrupt``: PIR[vector] and ON in the target's
        descriptor; if ON was clear, the notification: POSTED_INTR_VECTOR to its core
        if the target is in guest mode, else a kick (a blocked vCPU is woken with
        POSTED_INTR_WAKEUP_VECTOR, as KVM's wake-up does through the scheduler)."""
        mem = self.machine.mem
        pa = self.pi_desc[target.core.index]
        raw, notify = A.post_interrupt(mem.read(pa, A.PID_SIZE), vector)
        mem.write(pa, raw)
        if not notify:
            return
        if target.active:
            self._host_ipi(target, POSTED_INTR_VECTOR)
        elif target.blocked:
            self._host_ipi(target, POSTED_INTR_WAKEUP_VECTOR)

    def _host_ipi(self, target: VmxVcpu, vector: int) -> None:
        """A fixed IPI from the host on the current core to ``target``'s core."""
        src = self.machine.current or target.core
        lapic = src.lapic
        dest = target.core.apic_id << (32 if lapic.x2apic_enabled else 56)
        self.machine.bus.send(lapic, dest | vector)

    def sync_pir_to_irr(self, vcpu: VmxVcpu) -> None:
        """KVM's ``vmx_sync_pir_to_irr`` before a VM entry: ON cleared, PIR moved
        into the virtual IRR, RVI = the highest vector in it (``vmx_hwapic_irr_update``)."""
        mem = self.machine.mem
        pa = self.pi_desc[vcpu.core.index]
        d = A.PostedDescriptor.decode(mem.read(pa, A.PID_SIZE))
        v = vcpu.vmcs
        status = v.get(F.GUEST_INTR_STATUS)
        page = None
        if d.on or d.pir:
            mem.write(pa, d._replace(pir=0, on=False).encode(mem.read(pa, A.PID_SIZE)))
            page = self._page(vcpu)
            for n in range(8):
                word = d.pir >> (32 * n) & 0xFFFFFFFF
                if word:
                    page.set32(A.APIC_IRR + 0x10 * n, page.get32(A.APIC_IRR + 0x10 * n) | word)
            self._put_page(vcpu, page)
        if page is None and not A.rvi(status):
            return
        page = page or self._page(vcpu)
        max_irr = A.highest(page, A.APIC_IRR)
        if max_irr != A.rvi(status):
            v.set(F.GUEST_INTR_STATUS, A.make_status(max_irr, A.svi(status)))

    def apicv_pending(self, vcpu: VmxVcpu) -> bool:
        """``kvm_cpu_has_interrupt`` with APICv: the highest vector of the virtual IRR
        and PIR has a priority class above the virtual PPR's (VTPR, SVI)."""
        mem = self.machine.mem
        i = vcpu.core.index
        pir = int.from_bytes(mem.read(self.pi_desc[i], 32), "little")     # PIR: bits 255:0
        virr_at = self.vapic_pa[i] + A.APIC_IRR
        virr = 0
        for n in range(8):
            virr |= mem.read_u32(virr_at + 0x10 * n) << (32 * n)
        top = (pir | virr).bit_length() - 1
        if top <= 0:
            return False
        status = vcpu.vmcs.get(F.GUEST_INTR_STATUS)
        ppr = max(self.guest_tpr(vcpu) & 0xF0, A.svi(status) & 0xF0)
        return top & 0xF0 > ppr

    #: x2APIC registers the guest reads from the virtual-APIC page without an exit
    #: (APIC-register virtualization) that the L0 keeps equal to the physical APIC's
    MIRRORED = (0x802, 0x803, 0x80D, 0x80F, 0x828, 0x832, 0x833, 0x834, 0x835, 0x836, 0x837,
                0x838, 0x83E) + tuple(range(0x818, 0x820))

    def mirror_apic(self, vcpu: VmxVcpu, indexes=None) -> None:
        """Copy the physical APIC's registers the guest reads through the
        virtual-APIC page there (KVM's page *is* its APIC's registers)."""
        lapic = vcpu.core.lapic
        page = self._page(vcpu)
        for index in indexes or self.MIRRORED:
            off = A.x2apic_offset(index)
            try:
                if lapic.x2apic_enabled:
                    value = lapic.rdmsr(index)
                elif lapic.xapic_enabled:
                    value = lapic.mmio_read(off, 4)
                else:
                    continue
            except GeneralProtection:
                continue
            page.set32(off, value & 0xFFFFFFFF)
            if index == 0x830:
                page.set32(A.APIC_ICR2, value >> 32)
        self._put_page(vcpu, page)

    def apicv_ipi(self, vcpu: VmxVcpu, icr: int) -> bool:
        """An ICR write with APICv (``kvm_apic_send_ipi``): a fixed IPI is posted to
        each destination vCPU (physical destination or shorthand); False for what
        the platform sends itself (INIT, SIPI, NMI, logical destinations)."""
        vector, mode = icr & 0xFF, icr >> 8 & 7
        shorthand, logical = icr >> 18 & 3, icr >> 11 & 1
        if mode != 0 or vector < 16 or (logical and shorthand == 0):
            return False
        by_id = {v.core.apic_id: v for v in self.vcpus}
        if shorthand == 1:
            targets = [vcpu]
        elif shorthand == 2:
            targets = list(self.vcpus)
        elif shorthand == 3:
            targets = [v for v in self.vcpus if v is not vcpu]
        else:
            dest = icr >> 32 if vcpu.core.lapic.x2apic_enabled else icr >> 56
            targets = [by_id[dest]] if dest in by_id else []
        for t in targets:
            self.post(t, vector)
        return True

    def unblock(self, vcpu: VmxVcpu) -> bool:
        """A vCPU blocked in HLT (host context) got an interrupt: the host takes
        it for the guest, then KVM re-enters the guest, which takes it."""
        lapic = vcpu.core.lapic
        vec = lapic.pending_vector()
        if self._loaded[vcpu.core.index].apicv:
            if vec is not None:
                lapic.acknowledge()
                if vec in (POSTED_INTR_VECTOR, POSTED_INTR_WAKEUP_VECTOR):
                    lapic.eoi()             # the host's: the notification arrived in root mode
                else:
                    self.take_for_guest(vcpu, vec)
            if not self.apicv_pending(vcpu) and not lapic.nmi_pending:
                return False
        elif vec is None and self.deliverable(vcpu) is None and not lapic.nmi_pending:
            return False
        elif vec is not None:
            lapic.acknowledge()
            self.take_for_guest(vcpu, vec)
        vcpu.blocked = False
        vcpu.core.state = State.RUNNING
        vcpu.vmcs.set(F.GUEST_ACTIVITY_STATE, C.GUEST_ACTIVITY_ACTIVE)
        vcpu.vm_entry()
        return True

    def entry_failed(self, vcpu: VmxVcpu, failure) -> None:
        i = vcpu.core.index
        if i in self.taking_back:
            # the forced failure of take_back: the core is the host's now
            self.taking_back.discard(i)
            self.taken_back.add(i)
            vcpu.parked = True
            self.block(vcpu, State.HALTED)
            return
        self.machine.guest_error(f"core {vcpu.core.index}: VM entry failed: {failure}")
        vcpu.core.request_stop("exit") if vcpu.core.in_run else None

    def handle_exit(self, vcpu: VmxVcpu) -> None:
        """A VM exit: the handler of its basic reason, read from the VMCS with
        VMREAD as KVM's vmx_handle_exit does (the handlers read the rest of the
        exit information the same way, never the rule's Decision)."""
        self._tpr_from_guest(vcpu)
        reason = vcpu.vmcs.vmread(_EXIT_REASON) & ER.BASIC_REASON_MASK
        handler = self.handlers.get(reason)
        if handler is None:
            self._fatal(vcpu, f"the L0 has no handler for exit {ER.name_of(reason)} at RIP "
                              f"{vcpu.vmcs.get(F.GUEST_RIP):#x}")
            return
        try:
            handler(vcpu)
        except _Fault as f:
            vcpu.inject(f.vector, C.INTR_TYPE_HARD_EXCEPTION, f.error_code)

    # ------------------------------------------------------------------ exit handlers
    def _make_handlers(self):
        R = ER
        h = {
            R.EXCEPTION_NMI: self.h_exception_nmi,
            R.EXTERNAL_INTERRUPT: self.h_external_interrupt,
            R.TRIPLE_FAULT: self.h_triple_fault,
            R.INIT_SIGNAL: self.h_init,
            R.SIPI_SIGNAL: self.h_sipi,
            R.INTERRUPT_WINDOW: self.h_interrupt_window,
            R.CPUID: self.h_cpuid, R.TASK_SWITCH: self.h_task_switch,
            R.HLT: self.h_hlt,
            R.INVD: self.h_skip, R.WBINVD: self.h_skip,
            R.MWAIT_INSTRUCTION: self.h_skip, R.MONITOR_INSTRUCTION: self.h_skip,
            R.PAUSE_INSTRUCTION: self.h_skip,
            R.RDPMC: self.h_gp,
            R.VMCALL: self.h_vmcall,
            R.CR_ACCESS: self.h_cr_access,
            R.DR_ACCESS: self.h_native,
            R.IO_INSTRUCTION: self.h_native,
            R.MSR_READ: self.h_msr,
            R.MSR_WRITE: self.h_msr,
            R.XSETBV: self.h_gp,
            R.EPT_VIOLATION: self.h_ept_violation,
            R.EPT_MISCONFIG: self.h_ept_misconfig,
            R.APIC_ACCESS: self.h_apic_access,
            R.TPR_BELOW_THRESHOLD: self.h_tpr_below_threshold,
            R.APIC_WRITE: self.h_apic_write,
            R.EOI_INDUCED: self.h_eoi_induced,
        }
        for name in ("VMCLEAR", "VMLAUNCH", "VMPTRLD", "VMPTRST", "VMREAD", "VMRESUME", "VMWRITE",
                     "VMOFF", "VMON", "INVEPT", "INVVPID", "VMFUNC"):
            h[getattr(R, name)] = self.h_ud
        return h

    def h_skip(self, vcpu):
        """INVD, WBINVD, MWAIT, MONITOR, PAUSE (PLE): nothing to do but skip it."""
        vcpu.skip_instruction()

    def h_gp(self, vcpu):
        """RDPMC (no PMU is exposed), XSETBV: #GP(0) into the guest."""
        vcpu.inject(13, C.INTR_TYPE_HARD_EXCEPTION, 0)

    def h_ud(self, vcpu):
        """VMX instructions: no nested VMX, #UD (KVM without nested=1)."""
        vcpu.inject(6, C.INTR_TYPE_HARD_EXCEPTION)

    def h_vmcall(self, vcpu):
        """Hypercalls: none is implemented, RAX = -KVM_ENOSYS."""
        vcpu.core.uc.reg_write(X.UC_X86_REG_RAX, (-KVM_ENOSYS) & ((1 << 64) - 1))
        vcpu.skip_instruction()

    def h_exception_nmi(self, vcpu):
        """An NMI is the host's (KVM-devirt takes a core back with one): nothing for
        the guest.  An exception in the bitmap is reflected back into the guest."""
        v = vcpu.vmcs
        info = v.vmread(_EXIT_INTR_INFO)
        itype = info & C.INTR_INFO_INTR_TYPE_MASK
        if itype == C.INTR_TYPE_NMI_INTR:
            if vcpu.core.index in self.taking_back:
                self._force_failed_entry(vcpu)
            return
        vec = info & C.INTR_INFO_VECTOR_MASK
        ec = v.vmread(_EXIT_INTR_ERROR_CODE) if info & C.INTR_INFO_DELIVER_CODE_MASK else None
        if vec == 14:
            # a #PF exit leaves CR2 alone; its address is the qualification, and KVM
            # sets CR2 to it to re-inject the fault
            vcpu.core.set_cr2(v.vmread(_QUALIFICATION))
        vcpu.inject(vec, itype, ec, v.vmread(_EXIT_INSTRUCTION_LEN))

    def h_external_interrupt(self, vcpu):
        """The interrupt was acknowledged on exit; it is the guest's: queue it for injection."""
        self.take_for_guest(vcpu, vcpu.vmcs.vmread(_EXIT_INTR_INFO) & C.INTR_INFO_VECTOR_MASK)

    def h_interrupt_window(self, vcpu):
        """The guest can take interrupts again: prepare_entry injects the queued one."""

    def h_triple_fault(self, vcpu):
        self.shut_down(vcpu, "triple fault (VM exit)")

    def h_init(self, vcpu):
        """INIT: the vCPU is reset and waits for SIPI (kvm_vcpu_reset)."""
        v = vcpu.vmcs
        s = v.set
        s(F.GUEST_CR0, INIT_CR0 | (1 << 5))
        s(F.CR0_READ_SHADOW, INIT_CR0)
        s(F.GUEST_CR4, X86_CR4_VMXE)
        s(F.CR4_READ_SHADOW, 0)
        s(F.GUEST_CR3, 0)
        s(F.GUEST_IA32_EFER, 0)
        s(F.GUEST_RFLAGS, 2)
        s(F.GUEST_RIP, 0xFFF0)
        for seg in ("ES", "SS", "DS", "FS", "GS"):
            s(F[f"GUEST_{seg}_SELECTOR"], 0)
            s(F[f"GUEST_{seg}_BASE"], 0)
            s(F[f"GUEST_{seg}_LIMIT"], 0xFFFF)
            s(F[f"GUEST_{seg}_AR_BYTES"], 0x93)
        s(F.GUEST_CS_SELECTOR, 0xF000)
        s(F.GUEST_CS_BASE, 0xFFFF0000)
        s(F.GUEST_CS_LIMIT, 0xFFFF)
        s(F.GUEST_CS_AR_BYTES, 0x9B)
        s(F.GUEST_GDTR_BASE, 0)
        s(F.GUEST_GDTR_LIMIT, 0xFFFF)
        s(F.GUEST_IDTR_BASE, 0)
        s(F.GUEST_IDTR_LIMIT, 0xFFFF)
        s(F.GUEST_INTERRUPTIBILITY_INFO, 0)
        s(F.GUEST_ACTIVITY_STATE, C.GUEST_ACTIVITY_WAIT_SIPI)
        ent = v.get(F.VM_ENTRY_CONTROLS)
        s(F.VM_ENTRY_CONTROLS, ent & ~C.VM_ENTRY_IA32E_MODE)
        vcpu.core.lapic.init_reset()
        self.virr[vcpu.core.index].clear()
        self.visr[vcpu.core.index].clear()
        if vcpu.core.index in self.devirtualized:
            self.devirtualized.discard(vcpu.core.index)
            self.load_controls(vcpu, BOOT_CONFIG[self.config_name])

    def h_sipi(self, vcpu):
        """SIPI in wait-for-SIPI: real mode at vector:0000 (kvm_vcpu_deliver_sipi_vector)."""
        vec = vcpu.vmcs.vmread(_QUALIFICATION) & 0xFF
        s = vcpu.vmcs.set
        s(F.GUEST_CS_SELECTOR, vec << 8)
        s(F.GUEST_CS_BASE, vec << 12)
        s(F.GUEST_RIP, 0)
        s(F.GUEST_ACTIVITY_STATE, C.GUEST_ACTIVITY_ACTIVE)

    def h_cpuid(self, vcpu):
        """CPUID: the platform's model plus the hypervisor bit and KVM's leaves."""
        probe = vcpu.core.probe
        leaf = probe.gpr(0) & 0xFFFFFFFF
        sub = probe.gpr(1) & 0xFFFFFFFF
        core = vcpu.core
        regs = kvm_cpuid(leaf, sub, lambda lf, sl: cpuid_model.cpuid(lf, sl, core.apic_id,
                                                                       len(self.machine.cores),
                                                                       vcpu.model),
                         devirt=self.config_name == "devirt")
        for n, val in zip((0, 3, 1, 2), regs):            # RAX, RBX, RCX, RDX
            probe.set_gpr(n, val)
        vcpu.skip_instruction()

    def h_task_switch(self, vcpu):
        """TASK_SWITCH: KVM emulates the task switch (handle_task_switch, then
        kvm_task_switch), reading and writing the GDT and both TSSs through its
        own MMU.  Here the platform performs it: the switch of a far JMP/CALL or
        IRET by running the instruction as the guest, one through an IDT task gate
        (qualification source 3) with the core's own task switch.  For the latter,
        as KVM reads the IDT-vectoring information: the error code of a hardware
        exception is pushed onto the new task's stack, a software interrupt or
        exception (types 4-6) is skipped (the old task resumes after it), an NMI
        leaves NMIs blocked, and EXT is set in the error codes of faults in the
        switch unless the event was INT n, INT3 or INTO.

        First the L0 maps in the EPT what the switch touches (the GDT, the current
        and the new TSS, the new task's LDT and, when an error code is pushed, the
        page it goes to; with paging on, also the guest paging-structure entries
        that translate them, under the current CR3 and the new task's), as KVM's
        accesses never cause EPT violations.  (With PAE paging the core loads the
        new CR3's PDPTEs at its first walk after the switch.)  A fault in the
        switch is injected into the guest."""
        core = vcpu.core
        q = vcpu.vmcs.vmread(_QUALIFICATION)
        tss_selector = q & 0xFFFF
        event = None                    # the exiting instruction (far JMP/CALL, IRET)
        if q >> 30 & 3 == 3:
            v = vcpu.vmcs
            vinfo = v.get(F.IDT_VECTORING_INFO_FIELD)
            itype = vinfo & C.VECTORING_INFO_TYPE_MASK
            error_code, ext, resume = None, 1, core.rip()
            if vinfo & C.VECTORING_INFO_VALID_MASK:
                if itype == C.INTR_TYPE_HARD_EXCEPTION and vinfo & C.VECTORING_INFO_DELIVER_CODE_MASK:
                    error_code = v.get(F.IDT_VECTORING_ERROR_CODE)
                if itype in (C.INTR_TYPE_SOFT_INTR, C.INTR_TYPE_SOFT_EXCEPTION,
                             C.INTR_TYPE_PRIV_SW_EXCEPTION):
                    resume += v.get(F.VM_EXIT_INSTRUCTION_LEN)
                if itype in (C.INTR_TYPE_SOFT_INTR, C.INTR_TYPE_SOFT_EXCEPTION):
                    ext = 0
                if itype == C.INTR_TYPE_NMI_INTR:
                    core.nmi_blocked = True
            event = Event(Kind.TASK_SWITCH, core.index, core.rip(), error_code=error_code,
                          extra={"tss_selector": tss_selector, "task_switch_source": "IDT",
                                 "return_rip": resume, "ext": ext})
        else:
            error_code = None
        if self.ept is not None:
            ranges, new_cr3 = self._task_switch_ranges(core, tss_selector, error_code is not None)
            cr3s = [None] if new_cr3 is None else [None, new_cr3]
            for start, size in ranges:
                for page in range(start & ~0xFFF, start + size, 4096):
                    for cr3 in cr3s:
                        for gpa in self._guest_pages(core, page, cr3):
                            if gpa < self.guest_ram:
                                self._ept_map(gpa)     # (new entries: nothing cached to invalidate)
        try:
            vcpu.emulate_on_platform(event)
        except GuestError as e:
            self._fatal(vcpu, str(e).split(": ", 1)[-1])

    def _task_switch_ranges(self, core, tss_selector: int, error_code: bool):
        """What a task switch to ``tss_selector`` reads and writes, as far as the
        GDT tells: ((linear address, size), ...), and the new task's CR3 when
        paging is on and the new TSS is a 32-bit one (else None).  Read as the
        guest sees memory (a peek: nothing is set, nothing faults)."""
        gdt_base, gdt_limit = core.probe.dtr(ENV_GDT)
        _, tr_base, tr_limit, _ = core.probe.segment(7)
        ranges = [(gdt_base, gdt_limit + 1), (tr_base, min(tr_limit + 1, TSS32_SIZE))]

        def read(linear, n):
            try:
                return core.read_linear(linear, n, peek=True)
            except (PageFault, GuestError):
                return None             # the switch itself will fault

        def gdt_entry(sel):
            if sel & 4 or (sel & ~7) + 8 > gdt_limit + 1:
                return None
            raw = read(gdt_base + (sel & ~7), 8)
            return None if raw is None else int.from_bytes(raw, "little")

        desc = gdt_entry(tss_selector)
        if desc is None:
            return ranges, None
        base, limit, _ = descriptor_cache(desc)
        ranges.append((base, min(limit + 1, TSS32_SIZE)))
        layout = tss_layout(desc_type(desc))
        image = read(base, layout.size)
        if image is None:
            return ranges, None
        new_cr3 = None
        if layout.cr3 is not None and core.probe.cr(0) >> 31:
            new_cr3 = int.from_bytes(image[layout.cr3:layout.cr3 + 4], "little")
        ldt = gdt_entry(int.from_bytes(image[layout.ldt:layout.ldt + 2], "little"))
        if ldt is not None:
            ldt_base, ldt_limit, _ = descriptor_cache(ldt)
            ranges.append((ldt_base, ldt_limit + 1))
        if error_code:
            at_sp, at_ss = layout.gprs + 4 * layout.width, layout.segs + 2 * layout.seg_stride
            sp = int.from_bytes(image[at_sp:at_sp + layout.width], "little")
            ss = gdt_entry(int.from_bytes(image[at_ss:at_ss + 2], "little"))
            if ss is not None:
                ranges.append(((descriptor_cache(ss)[0] + sp - layout.width) & 0xFFFFFFFF,
                               layout.width))
        return ranges, new_cr3

    def h_msr(self, vcpu):
        """RDMSR/WRMSR: KVM's paravirtual MSRs here; IA32_TSC with the TSC offset;
        everything else on the platform (x2APIC on the physical local APIC)."""
        probe = vcpu.core.probe               # (the guest's GPRs, straight from the engine)
        index = probe.gpr(1) & 0xFFFFFFFF
        write = vcpu.vmcs.vmread(_EXIT_REASON) & ER.BASIC_REASON_MASK == ER.MSR_WRITE
        if index in PARAVIRT_MSRS:
            if not write:
                vcpu.inject(13, C.INTR_TYPE_HARD_EXCEPTION, 0)
                return
            value = (probe.gpr(2) & 0xFFFFFFFF) << 32 | (probe.gpr(0) & 0xFFFFFFFF)
            self.paravirt_wrmsr(vcpu, index, value)
            vcpu.skip_instruction()
            return
        if not write:
            val = self.apic_register_read(vcpu, index) if vcpu.core.lapic.x2apic_enabled else None
            if val is not None:
                probe.set_gpr(0, val & 0xFFFFFFFF)
                probe.set_gpr(2, val >> 32)
                vcpu.skip_instruction()
                return
        elif index == 0x80B and self.guest_eoi(vcpu):
            vcpu.skip_instruction()
            return
        elif index == 0x830 and self._loaded[vcpu.core.index].apicv \
                and vcpu.core.lapic.x2apic_enabled:
            value = (probe.gpr(2) & 0xFFFFFFFF) << 32 | (probe.gpr(0) & 0xFFFFFFFF)
            if self.apicv_ipi(vcpu, value):
                # kvm_x2apic_icr_write: the ICR register keeps the value
                page = self._page(vcpu)
                page.set32(A.APIC_ICR, value & 0xFFFFFFFF)
                page.set32(A.APIC_ICR2, value >> 32)
                self._put_page(vcpu, page)
                vcpu.skip_instruction()
                return
        if index == 0x10 and not write:
            t = (vcpu.core.tsc() + vcpu.vmcs.get(F.TSC_OFFSET)) & ((1 << 64) - 1)
            probe.set_gpr(0, t & 0xFFFFFFFF)
            probe.set_gpr(2, t >> 32)
            vcpu.skip_instruction()
            return
        vcpu.emulate_on_platform()
        if write and index == MSR_IA32_APICBASE:
            self.set_virtual_apic_mode(vcpu)      # kvm_lapic_set_base on a mode change
        elif write and 0x800 <= index <= 0x8FF and self._loaded[vcpu.core.index].apicv:
            self.mirror_apic(vcpu, (index,))

    def h_cr_access(self, vcpu):
        """MOV to/from CR0/CR3/CR4/CR8, CLTS, LMSW (KVM's handle_cr)."""
        v = vcpu.vmcs
        core = vcpu.core
        uc = core.uc
        uc_reg = core.probe.reg
        q = v.vmread(_QUALIFICATION)
        cr, access, gpr = q & 0xF, (q >> 4) & 3, (q >> 8) & 0xF
        if access == 0:                                   # MOV to CR
            val = uc_reg(GPR_IDS[gpr])
            if core.code_size() != 64:
                val &= 0xFFFFFFFF
            if cr == 0:
                self.set_cr0(vcpu, val)
            elif cr == 4:
                self.load_pdptrs(vcpu, 4, v.get(F.GUEST_CR0), val | X86_CR4_VMXE, v.get(F.GUEST_CR3))
                v.set(F.CR4_READ_SHADOW, val)
                v.set(F.GUEST_CR4, val | X86_CR4_VMXE)
            elif cr == 3:
                self.load_pdptrs(vcpu, 3, v.get(F.GUEST_CR0), v.get(F.GUEST_CR4), val)
                v.set(F.GUEST_CR3, val)
            elif cr == 8:
                core.lapic.write_cr8(val)
        elif access == 1:                                 # MOV from CR
            if cr == 3:
                val = v.get(F.GUEST_CR3)
            elif cr == 8:
                val = core.lapic.read_cr8()
            else:
                raise _Fault(6)
            uc.reg_write(GPR_IDS[gpr], val)
        elif access == 2:                                 # CLTS
            v.set(F.CR0_READ_SHADOW, v.get(F.CR0_READ_SHADOW) & ~8)
            v.set(F.GUEST_CR0, v.get(F.GUEST_CR0) & ~8)
        else:                                             # LMSW
            src = (q >> 16) & 0xFFFF
            shadow = v.get(F.CR0_READ_SHADOW)
            self.set_cr0(vcpu, (shadow & ~0xE) | (src & 0xF) | (shadow & 1))
        vcpu.skip_instruction()

    def set_cr0(self, vcpu: VmxVcpu, val: int) -> None:
        """kvm_set_cr0 with unrestricted guest: the guest sees ``val``; the real CR0
        keeps NE (and PE/PG as the guest wants); EFER.LMA follows PG with LME."""
        v = vcpu.vmcs
        unrestricted = v.get(F.SECONDARY_VM_EXEC_CONTROL) & C.SECONDARY_EXEC_UNRESTRICTED_GUEST
        if not unrestricted and not (val & 1 and val >> 31):
            # without unrestricted guest the guest must stay in paged protected mode
            raise _Fault(13, 0)
        self.load_pdptrs(vcpu, 0, val | (1 << 5), v.get(F.GUEST_CR4), v.get(F.GUEST_CR3))
        v.set(F.CR0_READ_SHADOW, val)
        v.set(F.GUEST_CR0, val | (1 << 5))
        efer = v.get(F.GUEST_IA32_EFER)
        ent = v.get(F.VM_ENTRY_CONTROLS)
        if val >> 31 and efer & (1 << 8):
            v.set(F.GUEST_IA32_EFER, efer | (1 << 10))
            v.set(F.VM_ENTRY_CONTROLS, ent | C.VM_ENTRY_IA32E_MODE)
        elif not val >> 31:
            v.set(F.GUEST_IA32_EFER, efer & ~(1 << 10))
            v.set(F.VM_ENTRY_CONTROLS, ent & ~C.VM_ENTRY_IA32E_MODE)

    @staticmethod
    def _guest_pages(core, linear: int, cr3=None) -> list[int]:
        """The guest-physical pages the guest's translation of ``linear`` reads
        (its paging-structure entries, then the page itself) with the current
        CR3 or ``cr3``, as KVM's software walk would; none if it faults (the
        guest then gets the fault)."""
        vt = core.vtlb
        if vt is None or not vt.active or not core.probe.cr(0) >> 31:
            return [linear & 0xFFFF_F000]
        try:
            w = vt.guest_walk(linear, cr3)
        except (PageFault, UnsupportedPaging):
            return []
        return [a & ~0xFFF for a, _, _ in w.entries] + [w.pa & ~0xFFF]

    def load_pdptrs(self, vcpu: VmxVcpu, cr: int, cr0: int, cr4: int, cr3: int) -> None:
        """KVM's load_pdptrs for a write of CR``cr`` it emulates (the guest's CR0,
        CR4 and CR3 after it given): if the write loads the PDPTEs (PAE paging
        after it; see paging.pdptes_reload), read the four at CR3[31:5]
        (guest-physical = host-physical here; no memory reads as all ones); a
        present one with a reserved bit set raises #GP(0) into the guest before
        anything changed; with EPT they go to GUEST_PDPTR0-3, which VM entry
        loads (without EPT, VM entry reads the table itself)."""
        v = vcpu.vmcs
        if not pdptes_reload(cr, v.get(F.GUEST_CR0), v.get(F.GUEST_CR4), cr0, cr4,
                             v.get(F.GUEST_IA32_EFER)):
            return
        pa = pdpt_address(cr3)
        raw = vcpu.mem.read(pa, 32) if vcpu.mem.contains(pa, 32) else b"\xff" * 32
        pdptes = struct.unpack("<4Q", raw)
        if any(pdpte_reserved(e) for e in pdptes):
            raise _Fault(13, 0)
        if v.get(F.SECONDARY_VM_EXEC_CONTROL) & C.SECONDARY_EXEC_ENABLE_EPT:
            for n, e in enumerate(pdptes):
                v.set(F[f"GUEST_PDPTR{n}"], e)

    def _ept_map(self, gpa: int) -> None:
        """Map guest-physical ``gpa`` identity, RWX, write-back: its whole 2 MiB
        with one large page when all of it is guest RAM and nothing smaller is
        mapped there yet, else its 4 KiB page.  Nothing if it is mapped already."""
        if self.ept.leaf(gpa) is not None:
            return
        big = gpa & ~((2 << 20) - 1)
        try:
            if big + (2 << 20) > self.guest_ram:
                raise EptBuildError("not all guest RAM")
            self.ept.map(big, big, 2 << 20, rights=7, page_size=2 << 20, memory_type=C.MEMTYPE_WB)
        except EptBuildError:
            page = gpa & ~0xFFF
            self.ept.map(page, page, 4096, rights=7, memory_type=C.MEMTYPE_WB)

    def h_ept_violation(self, vcpu):
        """EPT violation (KVM's handle_ept_violation and its TDP page fault): map
        the guest-physical page, identity, read/write/execute, write-back: the
        whole aligned 2 MiB with one large page when all of it is guest RAM and
        no smaller page is mapped there yet (KVM maps huge pages when the
        memory behind them is huge-page backed), else the 4 KiB page.  Then, as
        KVM's vmx_complete_interrupts, re-inject the event whose delivery the
        violation interrupted (IDT-vectoring information); a software interrupt
        or exception is not re-injected: RIP is still at its instruction, which
        runs again.  An IRET that unblocked NMIs (qualification bit 12) gets NMI
        blocking back.  A violation outside guest RAM, or on a page that is
        mapped already, ends the run with a guest error; the APIC-access page
        (guest-physical 0xFEE00000) is mapped like RAM, as KVM maps its page
        behind that address (a private memslot)."""
        v = vcpu.vmcs
        gpa, q = v.vmread(_GUEST_PHYSICAL_ADDRESS), v.vmread(_QUALIFICATION)
        if gpa >= self.guest_ram and gpa & ~0xFFF != APIC_ACCESS_PAGE_GPA:
            self._fatal(vcpu, f"EPT violation at GPA {gpa:#x}, outside the guest's RAM "
                              f"(qualification {q:#x})")
            return
        if self.ept.leaf(gpa) is not None:
            self._fatal(vcpu, f"EPT violation at GPA {gpa:#x} on a page the L0 has mapped "
                              f"(qualification {q:#x})")
            return
        self._ept_map(gpa)
        vinfo = v.get(F.IDT_VECTORING_INFO_FIELD)
        if vinfo & C.VECTORING_INFO_VALID_MASK:
            itype = vinfo & C.VECTORING_INFO_TYPE_MASK
            if itype in (C.INTR_TYPE_EXT_INTR, C.INTR_TYPE_NMI_INTR, C.INTR_TYPE_HARD_EXCEPTION):
                ec = v.get(F.IDT_VECTORING_ERROR_CODE) \
                    if vinfo & C.VECTORING_INFO_DELIVER_CODE_MASK else None
                vcpu.inject(vinfo & C.VECTORING_INFO_VECTOR_MASK, itype, ec)
        elif q & C.INTR_INFO_UNBLOCK_NMI:
            v.set(F.GUEST_INTERRUPTIBILITY_INFO,
                  v.get(F.GUEST_INTERRUPTIBILITY_INFO) | C.GUEST_INTR_STATE_NMI)

    def h_ept_misconfig(self, vcpu):
        """EPT misconfiguration: KVM uses misconfigured entries to catch MMIO and
        emulates the access; this L0 builds none and emulates no MMIO, so one is
        a guest error that ends the run."""
        gpa = vcpu.vmcs.vmread(_GUEST_PHYSICAL_ADDRESS)
        why = vcpu.last_exit.cause if vcpu.last_exit is not None else ()   # (the explanation)
        self._fatal(vcpu, f"EPT misconfiguration at GPA {gpa:#x}: {'; '.join(map(str, why))}")

    def h_tpr_below_threshold(self, vcpu):
        """TPR below threshold (trap-like: RIP is already past the instruction).
        KVM's handler only updates the PPR from the new TPR; the interrupt then
        deliverable is injected at the next entry.  Here the exit has already
        copied the new TPR into the physical APIC and :meth:`prepare_entry`
        re-evaluates the virtual IRR against it: nothing else to do."""

    def h_apic_write(self, vcpu):
        """APIC write (trap-like: the write is in the virtual-APIC page at the
        qualification's offset).  KVM's ``handle_apic_write``:
        ``kvm_apic_write_nodecode`` applies the register's new value to its APIC
        (here the physical one; an ICR write posts a fixed IPI as
        :meth:`apicv_ipi`), then the page shows the APIC's value again."""
        offset = vcpu.vmcs.vmread(_QUALIFICATION) & 0xFFF
        lapic = vcpu.core.lapic
        page = self._page(vcpu)
        value = page.get32(offset & ~3)
        try:
            if lapic.x2apic_enabled:
                index = 0x800 + (offset >> 4)
                if index == 0x830:
                    value |= page.get32(A.APIC_ICR2) << 32
                if index != 0x830 or not self.apicv_ipi(vcpu, value):
                    lapic.wrmsr(index, value)
            elif offset & ~0xF == A.APIC_ICR:
                icr = page.get32(A.APIC_ICR2) << 32 | value
                if not self.apicv_ipi(vcpu, icr):
                    lapic.mmio_write(A.APIC_ICR2, 4, icr >> 32)
                    lapic.mmio_write(A.APIC_ICR, 4, value)
            else:
                lapic.mmio_write(offset & ~0xF, 4, value)
        except GeneralProtection:
            pass                        # KVM's register write ignores what the APIC refuses
        index = 0x800 + (offset >> 4)
        if index in self.MIRRORED:
            self.mirror_apic(vcpu, (index,))

    def h_eoi_induced(self, vcpu):
        """EOI-induced exit (trap-like; the virtual EOI is done): KVM's
        ``handle_apic_eoi_induced`` ends the vector at the IOAPIC for a
        level-triggered interrupt.  Nothing here has an IOAPIC: nothing to do."""

    def h_apic_access(self, vcpu):
        """APIC access (fault-like: the instruction has not run).  KVM emulates
        the instruction against its software APIC (``handle_apic_access``; an EOI
        write is its fast path).  Here the platform runs the instruction once
        with the accessed bytes of the APIC-access page backed by the physical
        APIC's registers (as the guest sees them: with the virtual IRR, ISR and
        PPR share), which also advances RIP; a write it makes is then performed
        on the physical APIC (an EOI ends the highest injected vector first,
        as an exiting x2APIC EOI does).  Accesses during event delivery and
        instruction fetches, which KVM's emulator cannot perform, end the run
        with a guest error (KVM reports an emulation failure)."""
        v = vcpu.vmcs
        q = v.vmread(_QUALIFICATION)
        offset, atype = q & 0xFFF, (q >> 12) & 0xF
        rip = v.get(F.GUEST_RIP)
        # (KVM's emulator decodes the instruction at RIP for its operand size)
        access = vcpu.core.memory_access_at_rip()
        size = access[0] if access is not None else None
        if atype not in (XI.APIC_ACCESS_LINEAR_READ, XI.APIC_ACCESS_LINEAR_WRITE) or size is None \
                or access[1] in _STRING_IO:
            kind = _APIC_ACCESS_TYPE_NAMES.get(atype, f"access type {atype}")
            if size is None or access[1] in _STRING_IO:
                kind += ", by an instruction the emulator does not take"
            self._fatal(vcpu, f"APIC-access exit ({kind}, APIC-page offset {offset:#x}) at RIP "
                              f"{rip:#x}: emulation failure, the L0 (as KVM) cannot emulate it")
            return
        page = v.vmread(_APIC_ACCESS_ADDR) & ~0xFFF
        try:
            # run it once: a read of the page sees the APIC's registers; a write (the
            # exit's access, or the write of a read-modify-write) stops it, and shows
            # what it writes
            window = (offset, self.apic_mmio_read(vcpu, offset, size)) \
                if atype == XI.APIC_ACCESS_LINEAR_READ else None
            step = vcpu.step_watched_on_platform(page, window)
            write = step.denied
            if write is not None:
                if write.access != "write":
                    raise ValueError(f"a {write.access} of the APIC-access page in the same "
                                     "instruction")
                window = _cover(window, write.pa & 0xFFF, write.size)
                step = vcpu.step_watched_on_platform(page, window, writable=True)
                if step.denied is not None:
                    raise ValueError(f"a {step.denied.access} of the APIC-access page in the "
                                     "same instruction")
                if step.retired:
                    self.apic_mmio_write(vcpu, write.pa & 0xFFF, write.size, write.value)
        except ValueError as e:      # an access the xAPIC's MMIO or the step cannot take
            self._fatal(vcpu, f"APIC-access exit at RIP {rip:#x} (offset {offset:#x}, {size} "
                              f"byte(s)): the L0 cannot emulate it: {e}")

    def apic_mmio_read(self, vcpu: VmxVcpu, offset: int, size: int) -> bytes:
        """``size`` bytes of the guest's xAPIC page at ``offset``: the physical
        APIC's MMIO read, with IRR, ISR and PPR as :meth:`apic_register_read`
        shows them to the guest."""
        lapic = vcpu.core.lapic
        data = bytearray(lapic.mmio_read(offset, size).to_bytes(size, "little"))
        if lapic.xapic_enabled:
            for slot in range(offset & ~0xF, offset + size, 16):
                index = 0x800 + (slot >> 4)
                if 0x820 <= index <= 0x827:
                    word = lapic.mmio_read(slot, 4) | self._virr_word(vcpu, index - 0x820)
                else:
                    word = self.apic_register_read(vcpu, index)      # ISR, PPR or None
                if word is None:
                    continue
                reg = (word & 0xFFFFFFFF).to_bytes(4, "little") + bytes(12)
                lo, hi = max(slot, offset), min(slot + 16, offset + size)
                data[lo - offset:hi - offset] = reg[lo - slot:hi - slot]
        return bytes(data)

    def apic_mmio_write(self, vcpu: VmxVcpu, offset: int, size: int, value: int) -> None:
        """A guest write of the xAPIC page, on the physical APIC; a 32-bit EOI
        write ends the highest injected vector if one is in service."""
        lapic = vcpu.core.lapic
        if offset == APIC_EOI and size == 4 and lapic.xapic_enabled and self.guest_eoi(vcpu):
            return
        lapic.mmio_write(offset, size, value)

    # ------------------------------------------------------------------ KVM-devirt
    def devirtualize(self, vcpu: VmxVcpu) -> None:
        """The guest asked to devirtualize this core: load the target control set."""
        if self.config_name != "devirt" or vcpu.core.index in self.devirtualized:
            return
        v = vcpu.vmcs
        if not (v.get(F.GUEST_CR0) & 1 and v.get(F.GUEST_CR0) >> 31):
            raise _Fault(13, 0)                   # only from paged protected mode
        self.load_controls(vcpu, self.target)
        self.devirtualized.add(vcpu.core.index)

    def tsc_offset(self, vcpu: VmxVcpu) -> int:
        return vcpu.vmcs.get(F.TSC_OFFSET)


def _cover(window, offset: int, size: int) -> tuple[int, bytes]:
    """The smallest window holding ``window``'s bytes (None: none) and the
    range ``[offset, offset + size)`` (zeros where ``window`` has nothing)."""
    if window is None:
        return offset, bytes(size)
    start, data = window
    lo, hi = min(start, offset), max(start + len(data), offset + size)
    buf = bytearray(hi - lo)
    buf[start - lo:start - lo + len(data)] = data
    return lo, bytes(buf)
