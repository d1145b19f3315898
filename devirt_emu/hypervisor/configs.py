"""The named VMX configurations, control by control.

``stock`` is KVM's default VMCS on a modern Intel host with EPT and
unrestricted guest on, an in-kernel local APIC, APICv off (no
virtual-interrupt delivery, posted interrupts or APIC-register
virtualization) and PAUSE-loop exiting on; ``apicv`` is the same with
APICv on (see "APICv" below) (``vmx.c``: ``setup_vmcs_config``,
``vmx_exec_control``, ``vmx_compute_secondary_exec_control``,
``update_exception_bitmap``).

``devirt`` is KVM-devirt's set for a devirtualized core (see DESIGN.md, "What
KVM-devirt is"): no external-interrupt exiting, no HLT/MWAIT/MONITOR/PAUSE
exiting, no EPT/VPID/unrestricted guest, the timer/IPI/EOI x2APIC MSRs and
IA32_TSC_DEADLINE passed through.  A devirt guest boots under ``stock`` (its
boot-time controls: real mode and INIT-SIPI need unrestricted guest) and each
core asks for devirtualization at the end of boot by writing
:data:`MSR_KVM_DEVIRT`; the L0 then loads the ``devirt`` set on that core.

The local APIC: TPR shadow and flexpriority
-------------------------------------------
What KVM (Linux 5.4, the base of KVM-devirt; later kernels agree) does with
an in-kernel LAPIC and ``enable_apicv=0`` on a CPU that has "use TPR shadow"
and "virtualize APIC accesses" (the modelled CPU has both, and no
"virtualize x2APIC mode"):

* ``setup_vmcs_config`` asks for CR8-load/store exiting as required controls
  and for "use TPR shadow" as an optional one; when the CPU has the TPR
  shadow it drops both CR8 exiting bits again.  ``vmx_exec_control`` keeps
  the TPR shadow because ``cpu_need_tpr_shadow`` (= ``lapic_in_kernel``) is
  true (without it, it would put CR8 exiting back).  So MOV to/from CR8 do
  not exit: they read and write VTPR.
* ``flexpriority_enabled`` (module parameter ``flexpriority``, default 1)
  stays on when the CPU has both controls (``cpu_has_vmx_flexpriority``);
  ``cpu_need_virtualize_apic_accesses`` (= flexpriority and an in-kernel
  LAPIC) keeps "virtualize APIC accesses" in
  ``vmx_compute_secondary_exec_control``, which also clears "virtualize
  x2APIC mode", APIC-register virtualization and virtual-interrupt delivery
  (APICv off).
* ``vmx_set_virtual_apic_mode``, called whenever the guest's APIC mode
  changes (``kvm_lapic_set_base``): "virtualize APIC accesses" is set only
  while the guest's APIC is in xAPIC mode; in x2APIC mode or disabled it is
  cleared (and "virtualize x2APIC mode", which the modelled CPU lacks, would
  be set instead).  With it cleared, ``vmx_update_msr_bitmap`` keeps every
  x2APIC MSR, TPR (0x808) included, intercepted: x2APIC TPR accesses exit.
* The virtual-APIC page is the software APIC's own register page
  (``vmx_vcpu_reset``: ``VIRTUAL_APIC_PAGE_ADDR = __pa(apic->regs)``, and
  TPR_THRESHOLD 0), so VTPR *is* the guest's TPR.  The APIC-access page is a
  page KVM allocates behind a private memslot at guest-physical 0xFEE00000
  (``alloc_apic_access_page``, later ``kvm_alloc_apic_access_page``);
  ``vmx_set_apic_access_page_addr`` writes its host-physical address to
  APIC_ACCESS_ADDR.
* Before each VM entry ``update_cr8_intercept`` (x86.c) and
  ``vmx_update_cr8_intercept`` set TPR_THRESHOLD from the highest vector in
  the APIC's IRR and the TPR: 0 when nothing is pending or TPR[7:4] is below
  the pending vector's priority class (the interrupt is injectable, or
  ISR-blocked), else that class: the guest lowering its TPR under it exits
  (:func:`~devirt_emu.hypervisor.kvm.tpr_threshold`).
* ``handle_tpr_below_threshold``: ``kvm_apic_update_ppr`` only (a pending
  interrupt is then injected at the next entry); RIP is not touched, the
  exit is trap-like.
* ``handle_apic_access``: with ``fasteoi`` (default 1) a linear write of the
  EOI register (offset 0B0H) is an EOI and the instruction is skipped;
  anything else goes to ``kvm_emulate_instruction``, which runs the
  instruction against the software APIC's MMIO handlers (an instruction it
  cannot emulate is an emulation failure reported to user space).

This model's guest APIC is the core's physical local APIC (the L0 performs
the guest's exiting APIC accesses on it, see ``kvm.py``).  So that VTPR and
that APIC's TPR behave as one register, as KVM's do, the L0 syncs them at
two points: at every VM exit it copies VTPR into the physical TPR (so the
L0's emulation of TPR/PPR reads, MMIO and MSR accesses and its interrupt
arbitration see the guest's value), and before every VM entry it copies the
physical TPR back into VTPR (an emulated TPR write lands there), computes
TPR_THRESHOLD, then gives the physical TPR back to the host, which keeps it
at 0 while the vCPU runs (as a Linux host does).

Deviations from KVM, all on purpose and the same in both sets:

* The guest's local APIC is the core's physical one: the L0 performs the
  guest's exiting APIC accesses on it and re-injects the interrupts it
  receives (KVM emulates a software APIC instead; the exits the guest sees
  are the same kinds).  An APIC-access exit is emulated by running the
  instruction once against the physical APIC's registers, not by an
  instruction emulator.
* The APIC-access page is the xAPIC page itself: APIC_ACCESS_ADDR is
  0xFEE00000, mapped identity in the EPT (guest-physical is host-physical
  here), instead of a dummy page behind it.
* MOV-DR exiting stays on (KVM drops it lazily after the first DR access).
* KVM-devirt's host holds the physical TPR at 0xB0 while a devirtualized core
  runs, masking its own vectors (0x20-0xBF); this model's host has no
  vectors of its own and keeps 0 there too, so a guest may still use low
  vectors (``guest_tests/msr_passthrough.S`` sends itself 0x1F) as natively.
  For the guest's own range (0xC1-0xFF) the two agree.

APICv (the ``apicv`` set)
-------------------------
KVM (Linux 5.4) with ``enable_apicv=1`` on a CPU with APIC-register
virtualization, virtual-interrupt delivery and posted interrupts
(``cpu_has_vmx_apicv``, ``cpu_has_vmx_posted_intr``):

* ``vmx_pin_based_exec_ctrl`` keeps "process posted interrupts";
  ``vmx_compute_secondary_exec_control`` keeps APIC-register virtualization
  and virtual-interrupt delivery; ``vmx_set_virtual_apic_mode`` sets
  "virtualize APIC accesses" in xAPIC mode and "virtualize x2APIC mode" in
  x2APIC mode (never both).
* ``vmx_update_msr_bitmap_x2apic`` in x2APIC mode with APICv: every x2APIC
  MSR (800H-8FFH) is read without an exit except the timer's current count
  (839H); TPR (808H) read and written, EOI (80BH) and SELF IPI (83FH)
  written without an exit; every other write (the ICR included) exits.
* POSTED_INTR_NV is ``POSTED_INTR_VECTOR`` (F2H) and POSTED_INTR_DESC_ADDR
  the vCPU's ``pi_desc``; the EOI-exit bitmap has the level-triggered IOAPIC
  vectors (none here: 0); TPR_THRESHOLD stays 0 (``update_cr8_intercept``
  returns early with APICv).
* An interrupt for the guest (``__apic_accept_irq``) is posted
  (``vmx_deliver_posted_interrupt``): PIR, ON, and the notification IPI to
  the vCPU's processor if it is in guest mode, else a kick (a blocked vCPU is
  woken: here with ``POSTED_INTR_WAKEUP_VECTOR`` to its core).  Before each
  VM entry ``vmx_sync_pir_to_irr`` moves PIR into the virtual IRR and sets
  RVI (``vmx_hwapic_irr_update``): the processor then delivers it, with no
  interrupt-window exit.
* An x2APIC ICR write exits (MSR write) and KVM posts the fixed IPI to its
  destination vCPU; EOIs are virtualized (no exit).

The deviations of the other two sets hold here too (the guest's APIC is the
core's physical one: the L0 keeps the virtual-APIC page's copies of the
registers the guest reads without an exit (ID, version, LDR, SVR, LVTs,
initial count, divide configuration, ICR) equal to the physical APIC's).

Devirt and the TPR shadow: KVM-devirt's changes (DESIGN.md) do not mention
the TPR shadow, CR8 exiting or APIC-access virtualization, so its set keeps
KVM's: "use TPR shadow" on, CR8 exiting off, "virtualize APIC accesses" on
while the guest's APIC is in xAPIC mode (the firmware switches to x2APIC
mode early, so in practice off in steady state).  What that means on a
devirtualized core: a guest MOV to CR8 (and an exiting x2APIC TPR write,
which KVM applies to its software APIC) changes VTPR only, while the
physical TPR is the host's, 0xB0 on KVM-devirt (0 in this model, see the
deviations).  The guest's TPR then masks only the interrupts the L0 injects;
the physical interrupts passed through to the guest (its vectors 0xC1-0xFF,
all above class 0xB) are gated by the physical PPR, whose TPR part is the
host's, so raising CR8 does not hold them back as it would natively.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..x86 import X86_CR0_TS, X86_CR0_WP
from ..vmx import controls as C

#: Paravirtual MSRs of our model of KVM-devirt, in KVM's range.
MSR_KVM_APIC_MAPS = 0x4B564DBC     #: announce the apic_maps page (from KVM-devirt's source)
MSR_KVM_DEVIRT = 0x4B564DBD        #: ask the L0 to devirtualize this core (our model's number)
#: CPUID 0x40000001 EAX bit by which the L0 offers devirtualization (our model's bit).
KVM_FEATURE_DEVIRT = 1 << 24
#: Guest-physical address of KVM's APIC-access page (APIC_DEFAULT_PHYS_BASE, the xAPIC base).
APIC_ACCESS_PAGE_GPA = 0xFEE00000

# KVM's possibly guest-owned CR4 bits (KVM_POSSIBLE_CR4_GUEST_BITS) with EPT (+PGE).
KVM_CR4_GUEST_BITS = ((1 << 1) | (1 << 3) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 7)
                      | (1 << 2) | (1 << 16))
_U64 = (1 << 64) - 1

# x2APIC registers and IA32_TSC_DEADLINE passed through by KVM-devirt (DESIGN.md).
DEVIRT_PASSTHROUGH = (0x6E0, 0x80B, 0x820, 0x83E, 0x839, 0x832, 0x838, 0x830)
# Passed through by KVM in every configuration (vmx_possible_passthrough_msrs, the
# ones the modelled CPU has): FS/GS bases, KERNEL_GS_BASE, SYSENTER_*; IA32_TSC read.
KVM_PASSTHROUGH = (0xC0000100, 0xC0000101, 0xC0000102, 0x174, 0x175, 0x176)
KVM_PASSTHROUGH_READ = (0x10,)


@dataclass(frozen=True)
class VmxConfig:
    name: str
    description: str
    pin: int
    primary: int
    secondary: int
    exit: int
    entry: int
    exception_bitmap: int
    cr0_guest_owned: int       # bits the guest owns (not in CR0_GUEST_HOST_MASK)
    cr4_guest_owned: int
    msr_passthrough: tuple = ()        # read and write
    msr_passthrough_read: tuple = ()   # read only
    ple_gap: int = 0
    ple_window: int = 0
    notes: tuple = field(default_factory=tuple)
    #: APICv (KVM's ``kvm_vcpu_apicv_active``): virtual-interrupt delivery and posted
    #: interrupts, injection through RVI, IPIs posted (see "APICv" above)
    apicv: bool = False
    #: x2APIC MSRs passed through while the guest's APIC is in x2APIC mode (APICv:
    #: ``vmx_update_msr_bitmap_x2apic``), read only and read-write
    x2apic_passthrough_read: tuple = ()
    x2apic_passthrough_write: tuple = ()

    @property
    def cr0_mask(self) -> int:
        return _U64 & ~self.cr0_guest_owned

    @property
    def cr4_mask(self) -> int:
        return _U64 & ~self.cr4_guest_owned


_COMMON_EXIT = (C.VM_EXIT_HOST_ADDR_SPACE_SIZE | C.VM_EXIT_ACK_INTR_ON_EXIT | C.VM_EXIT_SAVE_IA32_PAT
                | C.VM_EXIT_LOAD_IA32_PAT | C.VM_EXIT_SAVE_IA32_EFER | C.VM_EXIT_LOAD_IA32_EFER)
_COMMON_ENTRY = C.VM_ENTRY_LOAD_IA32_PAT | C.VM_ENTRY_LOAD_IA32_EFER
# update_exception_bitmap: #UD, #MC, #DB, #AC (#PF only without EPT; KVM-devirt drops it).
_EXCEPTIONS = (1 << 6) | (1 << 18) | (1 << 1) | (1 << 17)

STOCK = VmxConfig(
    name="stock",
    description="KVM defaults, modern Intel host: EPT + unrestricted guest, TPR shadow and "
                "flexpriority, APICv off, PLE on",
    pin=C.PIN_BASED_EXT_INTR_MASK | C.PIN_BASED_NMI_EXITING | C.PIN_BASED_VIRTUAL_NMIS,
    primary=(C.CPU_BASED_HLT_EXITING | C.CPU_BASED_MWAIT_EXITING | C.CPU_BASED_MONITOR_EXITING
             | C.CPU_BASED_RDPMC_EXITING | C.CPU_BASED_USE_TSC_OFFSETTING
             | C.CPU_BASED_TPR_SHADOW
             | C.CPU_BASED_MOV_DR_EXITING | C.CPU_BASED_UNCOND_IO_EXITING
             | C.CPU_BASED_USE_MSR_BITMAPS | C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS),
    # "virtualize APIC accesses" while the guest's APIC is in xAPIC mode (KvmL0.set_virtual_apic_mode)
    secondary=(C.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES
               | C.SECONDARY_EXEC_ENABLE_EPT | C.SECONDARY_EXEC_ENABLE_VPID
               | C.SECONDARY_EXEC_UNRESTRICTED_GUEST | C.SECONDARY_EXEC_PAUSE_LOOP_EXITING
               | C.SECONDARY_EXEC_ENABLE_RDTSCP),
    exit=_COMMON_EXIT,
    entry=_COMMON_ENTRY,
    exception_bitmap=_EXCEPTIONS,
    cr0_guest_owned=X86_CR0_TS | X86_CR0_WP,
    cr4_guest_owned=KVM_CR4_GUEST_BITS,
    msr_passthrough=KVM_PASSTHROUGH,
    msr_passthrough_read=KVM_PASSTHROUGH_READ,
    ple_gap=128, ple_window=4096,
)

DEVIRT = VmxConfig(
    name="devirt",
    description="KVM-devirt, devirtualized core: interrupt/timer/IPI passthrough, no EPT",
    pin=C.PIN_BASED_NMI_EXITING | C.PIN_BASED_VIRTUAL_NMIS,
    primary=(C.CPU_BASED_RDPMC_EXITING | C.CPU_BASED_USE_TSC_OFFSETTING
             | C.CPU_BASED_TPR_SHADOW
             | C.CPU_BASED_MOV_DR_EXITING | C.CPU_BASED_UNCOND_IO_EXITING
             | C.CPU_BASED_USE_MSR_BITMAPS | C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS),
    secondary=C.SECONDARY_EXEC_VIRTUALIZE_APIC_ACCESSES | C.SECONDARY_EXEC_ENABLE_RDTSCP,
    exit=_COMMON_EXIT,
    entry=_COMMON_ENTRY,
    exception_bitmap=_EXCEPTIONS,
    cr0_guest_owned=X86_CR0_TS,
    cr4_guest_owned=KVM_CR4_GUEST_BITS,
    msr_passthrough=KVM_PASSTHROUGH + DEVIRT_PASSTHROUGH,
    msr_passthrough_read=KVM_PASSTHROUGH_READ,
)

#: KVM-devirt's interrupt vectors (DESIGN's "Interrupts and IPIs"): name -> (first, last).
DEVIRT_VECTOR_RANGES = {
    "host devices": (0x20, 0x6A), "host system": (0x6B, 0x7F),
    "guest devices": (0xC1, 0xEB), "guest system": (0xEC, 0xFF),
}
#: KVM-devirt's named guest system vectors.
DEVIRT_GUEST_VECTORS = {"timer": 0xEC, "reschedule": 0xFD, "spurious": 0xFF}

#: KVM's POSTED_INTR_VECTOR and POSTED_INTR_WAKEUP_VECTOR (arch/x86/include/asm/irq_vectors.h).
POSTED_INTR_VECTOR = 0xF2
POSTED_INTR_WAKEUP_VECTOR = 0xF1
X2APIC_TMCCT, X2APIC_TPR, X2APIC_EOI, X2APIC_SELF_IPI = 0x839, 0x808, 0x80B, 0x83F

APICV = VmxConfig(
    name="apicv",
    description="KVM defaults with enable_apicv=1 on a host with posted interrupts: stock plus "
                "APIC-register virtualization, virtual-interrupt delivery, x2APIC virtualization "
                "and posted interrupts",
    pin=STOCK.pin | C.PIN_BASED_POSTED_INTR,
    primary=STOCK.primary,
    # "virtualize APIC accesses" in xAPIC mode, "virtualize x2APIC mode" in x2APIC mode
    # (KvmL0.set_virtual_apic_mode), as vmx_set_virtual_apic_mode
    secondary=(STOCK.secondary | C.SECONDARY_EXEC_APIC_REGISTER_VIRT
               | C.SECONDARY_EXEC_VIRTUAL_INTR_DELIVERY | C.SECONDARY_EXEC_VIRTUALIZE_X2APIC_MODE),
    exit=_COMMON_EXIT,
    entry=_COMMON_ENTRY,
    exception_bitmap=_EXCEPTIONS,
    cr0_guest_owned=STOCK.cr0_guest_owned,
    cr4_guest_owned=KVM_CR4_GUEST_BITS,
    msr_passthrough=KVM_PASSTHROUGH,
    msr_passthrough_read=KVM_PASSTHROUGH_READ,
    ple_gap=128, ple_window=4096,
    apicv=True,
    x2apic_passthrough_read=tuple(m for m in range(0x800, 0x900) if m != X2APIC_TMCCT),
    x2apic_passthrough_write=(X2APIC_TPR, X2APIC_EOI, X2APIC_SELF_IPI),
)

VMX_CONFIGS = {c.name: c for c in (STOCK, APICV, DEVIRT)}
#: The set a configuration boots under before its cores ask for devirtualization.
BOOT_CONFIG = {"stock": STOCK, "apicv": APICV, "devirt": STOCK}
