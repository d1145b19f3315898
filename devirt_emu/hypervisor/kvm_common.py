"""What KVM does the same way on Intel and AMD: the part of the L0 model that
:class:`~devirt_emu.hypervisor.kvm.KvmL0` (VMX) and
:class:`~devirt_emu.hypervisor.kvm_svm.KvmSvmL0` (SVM) share.

* the host area at the top of RAM the L0 allocates its structures from;
* KVM's share of each vCPU's local APIC (the guest's APIC is the core's
  physical one, see kvm.py): a virtual IRR of interrupts the host took on the
  guest's behalf and a virtual ISR of the injected ones until the guest's EOI,
  and the x2APIC IRR/ISR/PPR reads that combine them with the physical APIC;
* the CPUID leaves KVM adds (the hypervisor bit, the KVM signature and
  feature leaves with KVM-devirt's feature) over a CPU model's leaves;
* KVM-devirt's paravirtual MSRs (the apic_maps page, the devirtualization
  request) and the apic_maps page itself;
* which vCPU wants to run, and the fatal end of a guest.

A subclass provides ``guest_tpr(vcpu)`` (where the guest's TPR is while the
L0 runs), ``tsc_offset(vcpu)`` and ``devirtualize(vcpu)``.
"""
from __future__ import annotations

import struct

from ..platform.core import State, _Fault
from .configs import KVM_FEATURE_DEVIRT, MSR_KVM_APIC_MAPS, MSR_KVM_DEVIRT

KVM_CPUID_SIGNATURE = 0x40000000
#: The L0's host area at the top of RAM.
HOST_AREA = 4 << 20
#: KVM-devirt's paravirtual MSRs (write-only).
PARAVIRT_MSRS = frozenset({MSR_KVM_APIC_MAPS, MSR_KVM_DEVIRT})


class L0Error(Exception):
    """The L0 met an exit it does not handle, or a VM entry failed, or its host area is full."""


def kvm_cpuid(leaf: int, subleaf: int, base, *, devirt: bool) -> tuple[int, int, int, int]:
    """CPUID as a KVM guest sees it: ``base(leaf, subleaf)`` (the CPU model's
    leaves) with the hypervisor-present bit (leaf 1 ECX[31]) and KVM's leaves
    0x40000000 ("KVMKVMKVM") and 0x40000001 (KVM-devirt's feature bit under
    the devirt configuration)."""
    if leaf == KVM_CPUID_SIGNATURE:
        return (0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D)       # "KVMKVMKVM\0\0\0"
    if leaf == KVM_CPUID_SIGNATURE + 1:
        return (KVM_FEATURE_DEVIRT if devirt else 0, 0, 0, 0)
    a, b, c, d = base(leaf, subleaf)
    if leaf == 1:
        c |= 1 << 31                      # hypervisor present
    return a, b, c, d


class KvmCommon:
    """The shared part of the L0 (see the module docstring).  Expects
    ``machine``, ``vcpus``, ``virr``, ``visr``, ``devirtualized``,
    ``apic_maps_gpa``, ``guest_ram`` and ``_next_page`` (set by
    :meth:`_init_common`)."""

    def _init_common(self, machine) -> None:
        mem = machine.mem
        self.machine = machine
        self.host_base = mem.size - HOST_AREA
        self.guest_ram = self.host_base
        self.vcpus = []
        # KVM's share of each vCPU's local APIC: interrupts the host took on the
        # guest's behalf wait in a virtual IRR, injected ones sit in a virtual ISR
        # until the guest's EOI (see configs.py: the rest of the APIC is physical).
        self.virr: dict[int, set[int]] = {}
        self.visr: dict[int, list[int]] = {}
        self.devirtualized: set[int] = set()
        self.apic_maps_gpa: int | None = None
        self._next_page = self.host_base

    def adopt_vcpu(self, vcpu) -> None:
        """``vcpu`` becomes its core's virtualization layer and one of this L0's, with an
        empty virtual IRR and ISR."""
        core = vcpu.core
        core.virt = vcpu
        self.vcpus.append(vcpu)
        self.virr[core.index] = set()
        self.visr[core.index] = []

    def _alloc(self, pages: int = 1) -> int:
        pa = self._next_page
        self._next_page += pages * 4096
        if self._next_page > self.machine.mem.size:
            raise L0Error("the L0's host area is full")
        self.machine.write_phys(pa, bytes(pages * 4096))
        return pa

    def wants_entry(self, vcpu) -> bool:
        return not vcpu.blocked and self.machine.verdict is None

    def take_for_guest(self, vcpu, vector: int) -> None:
        """The host took a guest interrupt (acknowledged on exit or while the vCPU
        was blocked): end it on the physical APIC, keep it in the virtual IRR."""
        vcpu.core.lapic.eoi()
        self.virr[vcpu.core.index].add(vector)

    def deliverable(self, vcpu) -> int | None:
        """The highest virtual-IRR vector whose priority class is above the virtual PPR."""
        i = vcpu.core.index
        if not self.virr[i]:
            return None
        vec = max(self.virr[i])
        isrv = max(self.visr[i], default=0)
        ppr = max(self.guest_tpr(vcpu) & 0xF0, isrv & 0xF0)
        return vec if vec & 0xF0 > ppr else None

    def guest_eoi(self, vcpu) -> bool:
        """An exiting EOI write: ends the highest injected vector, if one is in service."""
        visr = self.visr[vcpu.core.index]
        if not visr:
            return False
        visr.remove(max(visr))
        return True

    def apic_register_read(self, vcpu, index: int) -> int | None:
        """x2APIC IRR/ISR/PPR as the guest sees them (physical plus the virtual share)."""
        i = vcpu.core.index
        lapic = vcpu.core.lapic
        if 0x820 <= index <= 0x827:
            return lapic.rdmsr(index) | self._virr_word(vcpu, index - 0x820)
        if 0x810 <= index <= 0x817:
            word = index - 0x810
            return sum(1 << (v - 32 * word) for v in self.visr[i] if v // 32 == word)
        if index == 0x80A:
            isrv = max(self.visr[i], default=0)
            tpr = self.guest_tpr(vcpu)
            return tpr if tpr & 0xF0 >= isrv & 0xF0 else isrv & 0xF0
        return None

    def _virr_word(self, vcpu, word: int) -> int:
        """Bits 32 * ``word`` .. + 31 of the virtual IRR."""
        return sum(1 << (v - 32 * word) for v in self.virr[vcpu.core.index] if v // 32 == word)

    def has_pending(self, vcpu) -> bool:
        return self.deliverable(vcpu) is not None

    # ----- exit handlers both L0s share --------------------------------------
    def h_hlt(self, vcpu):
        """HLT: KVM blocks the vCPU until an interrupt is pending for it."""
        vcpu.skip_instruction()
        if self.has_pending(vcpu):
            return                                # something to inject: re-enter at once
        self.block(vcpu, State.HALTED)

    def h_native(self, vcpu):
        """I/O (and, under VMX, MOV DR): the platform executes the instruction."""
        vcpu.emulate_on_platform()

    def block(self, vcpu, state: State) -> None:
        """The vCPU leaves guest mode for the host's ``state`` (HALTED, WAIT_SIPI,
        SHUTDOWN) until the L0 unblocks it; a running engine stops."""
        vcpu.blocked = True
        core = vcpu.core
        core.state = state
        if core.in_run:
            core.request_stop("shutdown" if state is State.SHUTDOWN else "halt")

    def shut_down(self, vcpu, message: str) -> None:
        """A triple fault: the machine records it and the vCPU is shut down."""
        self.machine.shutdown(vcpu.core, message)
        self.block(vcpu, State.SHUTDOWN)

    def _fatal(self, vcpu, message: str) -> None:
        self.machine.guest_error(f"core {vcpu.core.index}: {message}")
        vcpu.blocked = True
        vcpu.core.request_stop("exit")      # also between engine runs (an EPT exit)

    # ----- KVM-devirt's paravirtual MSRs ---------------------------------------
    def paravirt_wrmsr(self, vcpu, index: int, value: int) -> None:
        """A write of one of :data:`PARAVIRT_MSRS` (a read is #GP, as the caller does)."""
        if index == MSR_KVM_APIC_MAPS:
            self.set_apic_maps(value)
        else:
            self.devirtualize(vcpu)

    def set_apic_maps(self, gpa: int) -> None:
        """Fill KVM-devirt's apic_maps page: per vCPU {u16 physical APIC ID, u16 physical
        CPU, i32 status, u64 TSC offset}."""
        if gpa & 0xFFF or gpa + 4096 > self.guest_ram:
            raise _Fault(13, 0)
        self.apic_maps_gpa = gpa
        data = b"".join(struct.pack("<HHiQ", v.core.apic_id, v.core.index, 1, self.tsc_offset(v))
                        for v in self.vcpus)
        self.machine.write_phys(gpa, data)
