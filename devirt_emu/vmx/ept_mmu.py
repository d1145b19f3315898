"""EPT as the second stage of a core's virtual TLB, and the exits it causes.

:class:`EptStage2` is the ``second_stage`` of
:class:`~devirt_emu.platform.tlb.VirtualTlb` for a vCPU whose VMCS enables EPT:
every guest-physical address a guest access uses (the guest's paging-structure
entries, the final page, the accessed/dirty-flag updates, and with PAE paging
the loads of the PDPTEs by MOV to CR, which have no guest-linear address: a
violation there has bit 7 of its qualification clear, and they are reads even
when the EPTP enables accessed and dirty flags) is translated by
:func:`~devirt_emu.vmx.ept.ept_walk`; a violation or misconfiguration becomes
:class:`~devirt_emu.platform.tlb.Stage2Fault` carrying the walk's result, and
:func:`ept_exit_decision` turns that into the VM exit (SDM "EPT Violations",
"EPT Misconfigurations", table "Exit Qualification for EPT Violations").

Caching: successful translations are cached per 4-KiB guest-physical page
(the processor may cache EPT translations; the SDM asks software to execute
INVEPT after reducing rights, changing addresses or clearing A/D flags, and
:meth:`EptStage2.invalidate` is that INVEPT).  Failures are never cached: a
mapping the L0 adds after a violation is seen at once.  A cached page grants
the write right to the TLB only once its EPT dirty flag is set (when the EPTP
enables accessed and dirty flags), so the first write still walks and sets it.

In VMX root operation (the vCPU is not active: the L0 emulating an
instruction on the guest's behalf) the L0 reaches guest memory through its own
memory map, not through the EPT: guest-physical addresses are then
host-physical ones, the identity layout of :mod:`devirt_emu.hypervisor.kvm`.
"""
from __future__ import annotations

from typing import Callable, Optional

from ..platform.core import GuestError
from ..platform.memory import PhysicalAccessError
from ..platform.tlb import ACC_READ, ACC_WRITE, Stage2Fault
from . import controls as C
from .ept import (DEFAULT_EPT_CAPS, EptAccess, EptCaps, EptMisconfig, EptTranslation,
                  EptViolation, ept_walk)
from .rules import Decision, exit_decision

_RWX = 7
_NO_WRITE = 7 & ~ACC_WRITE


def _no_write(pa: int, data: bytes) -> None:
    """The write_mem of a peek: the walk changes nothing."""


class EptStage2:
    """Guest-physical -> host-physical through the EPT rooted at ``eptp``.

    ``active()`` says whether the vCPU is in VMX non-root operation (else the
    L0's identity map applies, see the module docstring).
    """

    def __init__(self, mem, eptp: int, active: Callable[[], bool], *,
                 caps: EptCaps = DEFAULT_EPT_CAPS, cached: Optional[dict] = None):
        self.mem = mem
        self.eptp = eptp
        self.caps = caps
        self.ad = bool(eptp & C.VMX_EPTP_AD_ENABLE_BIT)
        self._active = active
        # gpa page -> (hpa page, rights, dirty); ``cached``: the translations of an
        # earlier EptStage2 over the same tables (see translations())
        self._cache: dict[int, tuple[int, int, bool]] = dict(cached) if cached else {}

    def translations(self) -> dict:
        """The cached translations, for a later EptStage2 over tables with the
        same contents (a processor keeps EPT translations across VM entries
        with the same EPTP until INVEPT)."""
        return dict(self._cache)

    def invalidate(self) -> None:
        """INVEPT (single context): forget every cached translation."""
        self._cache.clear()

    def translate(self, gpa: int, access: int, gla: Optional[int], translation: bool,
                  peek: bool) -> tuple[int, int]:
        if not self._active():
            return gpa, _RWX
        need = access
        if self.ad and not translation and gla is not None:
            need = ACC_READ | ACC_WRITE          # guest paging-structure access with EPT A/D: a write
        page = gpa >> 12
        hit = self._cache.get(page)
        if hit is not None:
            hpa_page, rights, dirty = hit
            if need & rights == need and (dirty or not need & ACC_WRITE or not self.ad):
                return hpa_page | (gpa & 0xFFF), rights if dirty or not self.ad else rights & _NO_WRITE
        try:
            r = ept_walk(self.mem.read, _no_write if peek else self.mem.write, self.eptp, gpa,
                         EptAccess(access), gla=gla, gla_is_translation=translation, caps=self.caps)
        except PhysicalAccessError as e:
            raise GuestError(f"the EPT walk of guest-physical {gpa:#x} reads an entry outside "
                             f"RAM (EPTP {self.eptp:#x}): {e}") from None
        if type(r) is not EptTranslation:
            raise Stage2Fault(r)
        rights = r.rights
        dirty = bool(need & ACC_WRITE) or bool(r.path[-1].entry & C.VMX_EPT_DIRTY_BIT)
        if not peek or not self.ad:          # (a peek sets no accessed flag to cache)
            self._cache[page] = (r.hpa & ~0xFFF, rights, dirty)
        if self.ad and not dirty:
            rights &= _NO_WRITE
        return r.hpa, rights


def ept_exit_decision(fault, *, in_64bit_mode: bool, nmi_unblocked_by_iret: bool = False,
                      instruction_length: Optional[int] = None) -> Decision:
    """The VM exit for an :class:`EptViolation` or :class:`EptMisconfig`.

    EPT violation: exit reason 48, the walk's qualification, plus bit 12 (NMI
    unblocking due to IRET) when ``nmi_unblocked_by_iret``;
    GUEST_LINEAR_ADDRESS when bit 7 is set (bits 63:32 cleared outside 64-bit
    mode); GUEST_PHYSICAL_ADDRESS.  EPT misconfiguration: exit reason 49 and
    GUEST_PHYSICAL_ADDRESS.  The instruction length is defined only for an
    exit during the delivery of a software interrupt or exception (INT n,
    INT3, INTO, INT1: the length of that instruction, given by the caller).
    """
    if isinstance(fault, EptViolation):
        q = fault.qualification | (C.INTR_INFO_UNBLOCK_NMI if nmi_unblocked_by_iret else 0)
        gla = fault.gla
        if gla is not None and not in_64bit_mode:
            gla &= 0xFFFF_FFFF
        return exit_decision("EPT_VIOLATION", (fault.reason,), qualification=q,
                             instruction_length=instruction_length,
                             guest_linear_address=gla, guest_physical_address=fault.gpa)
    if isinstance(fault, EptMisconfig):
        return exit_decision("EPT_MISCONFIG", (fault.reason,), instruction_length=instruction_length,
                             guest_physical_address=fault.gpa)
    raise TypeError(f"not an EPT fault: {fault!r}")
