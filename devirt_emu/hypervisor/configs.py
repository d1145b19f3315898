"""The named VMX configurations, control by control.

``stock`` is KVM's default VMCS on a modern Intel host with EPT and
unrestricted guest on, APICv off (no virtual-interrupt delivery, posted
interrupts or APIC-register virtualization) and PAUSE-loop exiting on
(``vmx.c``: ``setup_vmcs_config``, ``vmx_exec_control``,
``vmx_secondary_exec_control``, ``update_exception_bitmap``).

``devirt`` is KVM-devirt's set for a devirtualized core (see DESIGN.md, "What
KVM-devirt is"): no external-interrupt exiting, no HLT/MWAIT/MONITOR/PAUSE
exiting, no EPT/VPID/unrestricted guest, the timer/IPI/EOI x2APIC MSRs and
IA32_TSC_DEADLINE passed through.  A devirt guest boots under ``stock`` (its
boot-time controls: real mode and INIT-SIPI need unrestricted guest) and each
core asks for devirtualization at the end of boot by writing
:data:`MSR_KVM_DEVIRT`; the L0 then loads the ``devirt`` set on that core.

Deviations from KVM, all on purpose and the same in both sets:

* TPR shadow is off (KVM turns it on when its local APIC is in-kernel): CR8
  loads and stores exit instead.  It comes with the APICv configuration.
* The guest's local APIC is the core's physical one: the L0 performs the
  guest's exiting APIC accesses on it and re-injects the interrupts it
  receives (KVM emulates a software APIC instead; the exits the guest sees
  are the same kinds).
* MOV-DR exiting stays on (KVM drops it lazily after the first DR access).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..vmx import controls as C

#: Paravirtual MSRs of our model of KVM-devirt, in KVM's range.
MSR_KVM_APIC_MAPS = 0x4B564DBC     #: announce the apic_maps page (from KVM-devirt's source)
MSR_KVM_DEVIRT = 0x4B564DBD        #: ask the L0 to devirtualize this core (our model's number)
#: CPUID 0x40000001 EAX bit by which the L0 offers devirtualization (our model's bit).
KVM_FEATURE_DEVIRT = 1 << 24

X86_CR0_TS, X86_CR0_WP = 1 << 3, 1 << 16
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
    description="KVM defaults, modern Intel host: EPT + unrestricted guest, APICv off, PLE on",
    pin=C.PIN_BASED_EXT_INTR_MASK | C.PIN_BASED_NMI_EXITING | C.PIN_BASED_VIRTUAL_NMIS,
    primary=(C.CPU_BASED_HLT_EXITING | C.CPU_BASED_MWAIT_EXITING | C.CPU_BASED_MONITOR_EXITING
             | C.CPU_BASED_RDPMC_EXITING | C.CPU_BASED_USE_TSC_OFFSETTING
             | C.CPU_BASED_CR8_LOAD_EXITING | C.CPU_BASED_CR8_STORE_EXITING
             | C.CPU_BASED_MOV_DR_EXITING | C.CPU_BASED_UNCOND_IO_EXITING
             | C.CPU_BASED_USE_MSR_BITMAPS | C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS),
    secondary=(C.SECONDARY_EXEC_ENABLE_EPT | C.SECONDARY_EXEC_ENABLE_VPID
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
             | C.CPU_BASED_CR8_LOAD_EXITING | C.CPU_BASED_CR8_STORE_EXITING
             | C.CPU_BASED_MOV_DR_EXITING | C.CPU_BASED_UNCOND_IO_EXITING
             | C.CPU_BASED_USE_MSR_BITMAPS | C.CPU_BASED_ACTIVATE_SECONDARY_CONTROLS),
    secondary=C.SECONDARY_EXEC_ENABLE_RDTSCP,
    exit=_COMMON_EXIT,
    entry=_COMMON_ENTRY,
    exception_bitmap=_EXCEPTIONS,
    cr0_guest_owned=X86_CR0_TS,
    cr4_guest_owned=KVM_CR4_GUEST_BITS,
    msr_passthrough=KVM_PASSTHROUGH + DEVIRT_PASSTHROUGH,
    msr_passthrough_read=KVM_PASSTHROUGH_READ,
)

VMX_CONFIGS = {c.name: c for c in (STOCK, DEVIRT)}
#: The set a configuration boots under before its cores ask for devirtualization.
BOOT_CONFIG = {"stock": STOCK, "devirt": STOCK}
