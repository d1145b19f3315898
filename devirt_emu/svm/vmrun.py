"""VMRUN's consistency checks on the guest state and controls of a VMCB.

Source: AMD64 APM Vol. 2, Section 15.5.1 "Basic Operation", the list
"Canonicalization and Consistency Checks": illegal guest-state combinations
make VMRUN fail with a #VMEXIT whose exit code is VMEXIT_INVALID (-1); and
Section 15.20 "Event Injection" for the EVENTINJ checks.  Where the APM is
terse, KVM's nested VMRUN checks (``nested_vmcb_check_save``,
``nested_vmcb_check_controls``) are the reading followed.

Each check is a small pure function of (vmcb, caps) returning None or a
:class:`VmrunFailure` naming the check and the field; :func:`check_vmrun`
runs them in the APM's order and returns the first failure.  ``vmcb`` is
anything with ``get(name) -> int`` (:class:`~devirt_emu.svm.vmcb.Vmcb`, or a
dict's ``__getitem__`` wrapped in a tiny class in tests).

Not modelled: the canonicalization VMRUN applies to segment bases and other
addresses (the model loads them as given), and the check "EFER.LME or LMA
set on a processor without long mode" (the modelled CPU has long mode).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from . import intercepts as ic
from . import vmcb as V
from .amd_cpu import EFER_LME, EFER_SVME, SVM_FEATURE_NPT, SvmCaps

CR0_PE, CR0_NW, CR0_CD, CR0_PG = 1, 1 << 29, 1 << 30, 1 << 31
CR4_PAE = 1 << 5
#: The segment attribute bits of the VMCB (APM 15.5.1): descriptor bits 55:52 in 11:8.
SEG_ATTR_L = 1 << 9
SEG_ATTR_DB = 1 << 10
IOPM_SIZE = 12 << 10
MSRPM_SIZE = 8 << 10


@dataclass(frozen=True)
class VmrunFailure:
    """VMRUN refused the VMCB: #VMEXIT with VMEXIT_INVALID.  ``check`` says
    which APM condition failed, ``field`` the VMCB field it read."""

    check: str
    field: str

    def __str__(self) -> str:
        return f"VMEXIT_INVALID: {self.check} ({self.field})"


def _fail(check: str, field: str) -> VmrunFailure:
    return VmrunFailure(check, field)


def check_efer_svme(v, caps: SvmCaps) -> Optional[VmrunFailure]:
    """APM 15.5.1: "EFER.SVME is zero"."""
    if not v.get("efer") & EFER_SVME:
        return _fail("EFER.SVME is zero", "efer")
    return None


def check_cr0(v, caps: SvmCaps) -> Optional[VmrunFailure]:
    """APM 15.5.1: "CR0.CD is zero and CR0.NW is set"; "CR0[63:32] are not zero"."""
    cr0 = v.get("cr0")
    if not cr0 & CR0_CD and cr0 & CR0_NW:
        return _fail("CR0.CD is zero and CR0.NW is set", "cr0")
    if cr0 >> 32:
        return _fail("CR0[63:32] are not zero", "cr0")
    return None


def check_cr3(v, caps: SvmCaps) -> Optional[VmrunFailure]:
    """APM 15.5.1: "Any MBZ bit of CR3 is set": in long mode (EFER.LME and
    CR0.PG) the bits at and above MAXPHYADDR, else bits 63:32."""
    cr3 = v.get("cr3")
    long_paging = v.get("efer") & EFER_LME and v.get("cr0") & CR0_PG
    limit = caps.maxphyaddr if long_paging else 32
    if cr3 >> limit:
        return _fail(f"an MBZ bit of CR3 is set (bits 63:{limit})", "cr3")
    return None


def check_cr4(v, caps: SvmCaps) -> Optional[VmrunFailure]:
    """APM 15.5.1: "Any MBZ bit of CR4 is set" (every bit the processor does not implement)."""
    if v.get("cr4") & ~caps.cr4_valid:
        return _fail("an MBZ bit of CR4 is set", "cr4")
    return None


def check_dr6_dr7(v, caps: SvmCaps) -> Optional[VmrunFailure]:
    """APM 15.5.1: "DR6[63:32] are not zero"; "DR7[63:32] are not zero"."""
    for name in ("dr6", "dr7"):
        if v.get(name) >> 32:
            return _fail(f"{name.upper()}[63:32] are not zero", name)
    return None


def check_efer(v, caps: SvmCaps) -> Optional[VmrunFailure]:
    """APM 15.5.1: "Any MBZ bit of EFER is set"."""
    if v.get("efer") & ~caps.efer_valid:
        return _fail("an MBZ bit of EFER is set", "efer")
    return None


def check_long_mode(v, caps: SvmCaps) -> Optional[VmrunFailure]:
    """APM 15.5.1: with EFER.LME and CR0.PG both set, "CR4.PAE is zero", "CR0.PE
    is zero", or "CS.L and CS.D are both set" is illegal."""
    if not (v.get("efer") & EFER_LME and v.get("cr0") & CR0_PG):
        return None
    if not v.get("cr4") & CR4_PAE:
        return _fail("EFER.LME and CR0.PG are set and CR4.PAE is zero", "cr4")
    if not v.get("cr0") & CR0_PE:
        return _fail("EFER.LME and CR0.PG are set and CR0.PE is zero", "cr0")
    attrib = v.get("cs_attrib")
    if attrib & SEG_ATTR_L and attrib & SEG_ATTR_DB:
        return _fail("EFER.LME, CR0.PG, CR4.PAE, CS.L and CS.D are all set", "cs_attrib")
    return None


def check_vmrun_intercept(v, caps: SvmCaps) -> Optional[VmrunFailure]:
    """APM 15.5.1: "The VMRUN intercept bit is clear"."""
    if not v.get("intercept_word4") & 1 << (ic.INTERCEPT_VMRUN & 31):
        return _fail("the VMRUN intercept bit is clear", "intercept_word4")
    return None


def check_asid(v, caps: SvmCaps) -> Optional[VmrunFailure]:
    """APM 15.5.1: "ASID is equal to zero" (ASID 0 is the host's)."""
    if v.get("asid") == 0:
        return _fail("the ASID is zero", "asid")
    return None


def check_permission_maps(v, caps: SvmCaps) -> Optional[VmrunFailure]:
    """APM 15.5.1: "The MSR or IOIO intercept tables extend to a physical address
    that is greater than or equal to the maximum supported physical address"
    (bits 11:0 of the base addresses are ignored, APM 15.10.1 and 15.11).
    Checked for a map whose intercept (IOIO_PROT, MSR_PROT) is set, as KVM does."""
    w3 = v.get("intercept_word3")
    top = 1 << caps.maxphyaddr
    for bit, name, size in ((ic.INTERCEPT_IOIO_PROT, "iopm_base_pa", IOPM_SIZE),
                            (ic.INTERCEPT_MSR_PROT, "msrpm_base_pa", MSRPM_SIZE)):
        if w3 >> (bit & 31) & 1:
            base = v.get(name) & ~0xFFF
            if base + size - 1 >= top:
                return _fail(f"the {'IOPM' if size == IOPM_SIZE else 'MSRPM'} extends beyond "
                             f"MAXPHYADDR ({caps.maxphyaddr} bits)", name)
    return None


def check_nested_paging(v, caps: SvmCaps) -> Optional[VmrunFailure]:
    """Nested paging enabled (nested_ctl.NP_ENABLE) on a processor without it, or
    with nested_cr3 beyond MAXPHYADDR (KVM's reading of 15.25.3)."""
    if not v.get("nested_ctl") & V.SVM_NESTED_CTL_NP_ENABLE:
        return None
    if not caps.has(SVM_FEATURE_NPT):
        return _fail("NP_ENABLE is set and nested paging is not supported", "nested_ctl")
    if v.get("nested_cr3") >> caps.maxphyaddr:
        return _fail("nested_cr3 is beyond MAXPHYADDR", "nested_cr3")
    return None


#: EVENTINJ.TYPE values the APM defines (15.20): 0 INTR, 2 NMI, 3 exception, 4 software interrupt.
EVENT_TYPES = frozenset({0, 2, 3, 4})


def event_inj_problem(event_inj: int) -> Optional[str]:
    """APM 15.20 "Event Injection": an illegal EVENTINJ (valid bit set) makes
    VMRUN exit with VMEXIT_INVALID: a reserved TYPE (1, 5, 6, 7), or an
    exception (TYPE 3) with vector 2 (NMI is TYPE 2) or a vector above 31."""
    if not event_inj & V.SVM_EVTINJ_VALID:
        return None
    etype = (event_inj & V.SVM_EVTINJ_TYPE_MASK) >> V.SVM_EVTINJ_TYPE_SHIFT
    vector = event_inj & V.SVM_EVTINJ_VEC_MASK
    if etype not in EVENT_TYPES:
        return f"EVENTINJ.TYPE {etype} is reserved"
    if etype == 3 and (vector == 2 or vector > 31):
        return f"EVENTINJ injects exception vector {vector}"
    return None


def check_event_inj(v, caps: SvmCaps) -> Optional[VmrunFailure]:
    """APM 15.5.1 "Illegal event injection (see Section 15.20)"."""
    problem = event_inj_problem(v.get("event_inj"))
    return None if problem is None else _fail(problem, "event_inj")


#: The checks in the order of APM 15.5.1's list.
CHECKS: tuple[Callable, ...] = (
    check_efer_svme, check_cr0, check_cr3, check_cr4, check_dr6_dr7, check_efer,
    check_long_mode, check_vmrun_intercept, check_asid, check_permission_maps,
    check_nested_paging, check_event_inj,
)


def check_vmrun(v, caps: Optional[SvmCaps] = None) -> Optional[VmrunFailure]:
    """Every consistency check of VMRUN; the first failure or None."""
    caps = caps or SvmCaps()
    for check in CHECKS:
        failure = check(v, caps)
        if failure is not None:
            return failure
    return None
