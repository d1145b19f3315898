"""An SVM guest on one core: VMRUN, #VMEXIT, and what the processor does for
the guest between them.

A :class:`SvmVcpu` sits between a :class:`~devirt_emu.platform.core.Core`
and a hypervisor model (its ``l0``), as :class:`~devirt_emu.vmx.vcpu.VmxVcpu`
does for VMX: it implements :class:`~devirt_emu.virt.VirtualizationLayer`.
The core hands it every sensitive event; the intercept rules
(:mod:`devirt_emu.svm.rules`, pure) decide; on an intercept the vCPU does
what the processor does on #VMEXIT and calls the L0.

The VMCB is a 4 KiB region in RAM (:class:`~devirt_emu.svm.vmcb.Vmcb`).
:meth:`SvmVcpu.vmrun` is VMRUN (AMD64 APM Vol. 2, 15.5 "VMRUN
Instruction"): the consistency checks of :mod:`devirt_emu.svm.vmrun` (a
failure is #VMEXIT with VMEXIT_INVALID), then the guest state VMRUN loads
from the save area (ES, CS, SS, DS, GDTR, IDTR, EFER, CR0, CR3, CR4, CR2,
DR6, DR7, RFLAGS, RIP, RSP, RAX; the interrupt shadow from ``int_state``),
TLB control (``tlb_ctl``; a change of ASID flushes, since the model's TLB
has no ASID tags), nested paging (``nested_ctl.NP_ENABLE``: the core's second
stage, :mod:`devirt_emu.svm.npt`; a refused access is #VMEXIT NPF), GIF set, the PAUSE filter counter loaded, and event
injection from EVENTINJ (15.20) through the guest IDT.  FS, GS, TR, LDTR and
the syscall/sysenter MSRs are VMLOAD's and VMSAVE's: VMRUN leaves them as
the engine has them (VMLOAD/VMSAVE executed by the guest without their
intercept are not modelled).

:meth:`SvmVcpu.vm_exit` is #VMEXIT (15.6): the same guest state saved into
the save area, EXITCODE, EXITINFO1, EXITINFO2, EXITINTINFO (15.7.2: the
event whose delivery was in progress), nRIP (when the CPU model has NRIPS),
the decode-assist bytes, then GIF cleared and the L0 called.

Between VMRUN and #VMEXIT (15.21 "Interrupt and Local APIC Support"):

* ``int_ctl.V_INTR_MASKING`` = 1: physical interrupts are masked by the
  host's RFLAGS.IF (the Python host runs with interrupts enabled), so with
  the INTR intercept a pending physical interrupt exits whatever the
  guest's IF; the guest's IF masks only virtual interrupts; MOV to/from CR8
  reads and writes V_TPR.  With V_INTR_MASKING = 0 a physical interrupt is
  taken by the guest when its IF allows (delivered through the guest IDT
  unless the INTR intercept is set).
* a virtual interrupt (V_IRQ, vector ``int_vector``, priority V_INTR_PRIO)
  is delivered through the guest IDT when GIF, the guest's IF, no interrupt
  shadow and (unless V_IGN_TPR) V_INTR_PRIO > V_TPR allow; V_IRQ is then
  cleared.  With the VINTR intercept it exits instead.
* STGI/CLGI not intercepted set and clear GIF; while GIF is clear no
  interrupt, NMI or INIT is taken.
* RDTSC/RDTSCP add ``tsc_offset``.
"""
from __future__ import annotations

import struct
from typing import NamedTuple, Optional

from unicorn import x86_const as UX

from ..events import Event, Kind
from ..platform.core import GPR_IDS, GuestError, State, _Fault
from ..platform.ucinternals import ENV_GDT, ENV_IDT
from ..virt import EventType, VirtualizationLayer
from . import exit_codes as X
from . import intercepts as I
from . import vmcb as V
from .amd_cpu import SVM_FEATURE_DECODE_ASSISTS, SVM_FEATURE_NRIPS, SvmCaps
from .npt import NptStage2
from .rules import (Decision, PauseFilter, decide, exit_decision, intercepted,
                    virtual_interrupt_exit, virtual_interrupt_ready)
from .vmrun import VmrunFailure, check_vmrun

EFER_LMA, EFER_SVME = 1 << 10, 1 << 12
CR0_PG = 1 << 31
RFLAGS_IF = 1 << 9
MSR_EFER = 0xC0000080
MSR_PAT = 0x277
_SEGS = ((0, "es"), (1, "cs"), (2, "ss"), (3, "ds"))
_CR_REGS = {0: UX.UC_X86_REG_CR0, 3: UX.UC_X86_REG_CR3, 4: UX.UC_X86_REG_CR4}
#: The neutral event types of the seam as EVENTINJ/EXITINTINFO types (APM 15.20).
_SVM_TYPE = {
    EventType.EXTERNAL_INTERRUPT: V.SVM_EVTINJ_TYPE_INTR, EventType.NMI: V.SVM_EVTINJ_TYPE_NMI,
    EventType.HARDWARE_EXCEPTION: V.SVM_EVTINJ_TYPE_EXEPT,
    EventType.PRIVILEGED_SOFTWARE_EXCEPTION: V.SVM_EVTINJ_TYPE_EXEPT,
    EventType.SOFTWARE_EXCEPTION: V.SVM_EVTINJ_TYPE_EXEPT,
    EventType.SOFTWARE_INTERRUPT: V.SVM_EVTINJ_TYPE_SOFT,
}
_KIND_EXCEPTION, _KIND_PAUSE = Kind.EXCEPTION, Kind.PAUSE


def _spans(*names: str) -> tuple:
    """The byte ranges of fields, relative to :data:`_SAVE_LO`, adjacent ones
    merged, as slices."""
    out: list = []
    for a, b in sorted((V.BY_NAME[n].offset - _SAVE_LO,
                        V.BY_NAME[n].offset - _SAVE_LO + V.BY_NAME[n].size) for n in names):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return tuple(slice(a, b) for a, b in out)


#: The part of the save area VMRUN loads and #VMEXIT saves (ES .. CR2).
_SAVE_LO, _SAVE_HI = V.SAVE_AREA, V.BY_NAME["cr2"].offset + 8
#: The groups of save-area fields VMRUN loads, each with its byte ranges.
_GROUP_SPANS = (
    ("cr", _spans("efer", "cr0", "cr3", "cr4")),
    ("dtr", _spans("gdtr_base", "gdtr_limit", "idtr_base", "idtr_limit")),
    ("seg", _spans(*(f"{s}_{p}" for s in ("es", "cs", "ss", "ds")
                     for p in ("selector", "attrib", "limit", "base")))),
    ("dr", _spans("dr6", "dr7")),
    ("rflags", _spans("rflags")), ("rsp", _spans("rsp")), ("rax", _spans("rax")),
    ("rip", _spans("rip")), ("cr2", _spans("cr2")),
)
_ALL_GROUPS = frozenset(g for g, _ in _GROUP_SPANS)

# save_guest_state writes the save area in a few packs (Table B-2's layout):
_OFF = {n: V.BY_NAME[n].offset for n in ("es_selector", "gdtr_limit", "idtr_limit", "cpl", "efer",
                                         "cr4", "rsp", "rax", "cr2")}
_ES_AT, _GDTR_AT, _IDTR_AT = _OFF["es_selector"], _OFF["gdtr_limit"], _OFF["idtr_limit"]
_CPL_AT, _EFER_AT, _CR4_AT = _OFF["cpl"], _OFF["efer"], _OFF["cr4"]
_RSP_AT, _RAX_AT, _CR2_AT = _OFF["rsp"], _OFF["rax"], _OFF["cr2"]
#: ES, CS, SS, DS: (selector, attrib, limit, base) each, consecutive.
_SEG_BLOCK = struct.Struct("<" + "HHIQ" * 4)
#: a descriptor-table register: limit, then base.
_DTR = struct.Struct("<IQ")
#: CR4, CR3, CR0, DR7, DR6, RFLAGS, RIP: consecutive quadwords.
_CR_BLOCK = struct.Struct("<7Q")
_U8, _U64 = struct.Struct("<B"), struct.Struct("<Q")
assert [V.BY_NAME[f"{s}_selector"].offset for s in ("es", "cs", "ss", "ds")] == \
    [_ES_AT + 16 * i for i in range(4)]
assert V.BY_NAME["gdtr_base"].offset == _GDTR_AT + 4 and V.BY_NAME["idtr_base"].offset == _IDTR_AT + 4
assert [V.BY_NAME[n].offset for n in ("cr4", "cr3", "cr0", "dr7", "dr6", "rflags", "rip")] == \
    [_CR4_AT + 8 * i for i in range(7)]
_SVM_KINDS = frozenset({Kind.VMRUN, Kind.VMLOAD, Kind.VMSAVE, Kind.STGI, Kind.CLGI, Kind.SKINIT,
                        Kind.INVLPGA})


def attrib_to_ar(attrib: int) -> int:
    """A VMCB segment attribute (APM 15.5.1: descriptor bits 47:40 in 7:0, 55:52
    in 11:8) in the VMCS access-rights format the core's segment API takes
    (bits 15:12 AVL/L/DB/G, bit 16 unusable: a segment that is not present)."""
    ar = attrib & 0xFF | (attrib >> 8 & 0xF) << 12
    return ar if attrib & 0x80 else ar | 1 << 16


def ar_to_attrib(ar: int) -> int:
    """The inverse of :func:`attrib_to_ar` (an unusable segment: P clear)."""
    attrib = ar & 0xFF | (ar >> 12 & 0xF) << 8
    return attrib & ~0x80 if ar & 1 << 16 else attrib


def exit_int_info(delivering) -> tuple[int, int]:
    """(EXITINTINFO, its error code) for a #VMEXIT during the delivery of an
    event (APM 15.7.2 "Intercepts During IDT Interrupt Delivery"): vector,
    TYPE, EV when an error code is pushed, V; (0, 0) without a delivery."""
    if delivering is None:
        return 0, 0
    info = V.SVM_EXITINTINFO_VALID | _SVM_TYPE[delivering.type] | delivering.vector
    if delivering.error_code is not None:
        info |= V.SVM_EXITINTINFO_VALID_ERR
    return info, delivering.error_code or 0


class SvmExitRecord(NamedTuple):
    """One #VMEXIT as the CLI reports it (``--json`` ``exits``)."""

    core: int
    code: int
    name: str
    exit_info_1: int
    exit_info_2: int
    rip: int
    in_window: bool
    cause: tuple = ()

    def to_json(self) -> dict:
        return {"core": self.core, "exit_code": self.code, "name": self.name,
                "exit_info_1": self.exit_info_1, "exit_info_2": self.exit_info_2,
                "rip": self.rip, "in_window": self.in_window}


class SvmVcpu(VirtualizationLayer):
    """The SVM side of one core (its ``core.virt``)."""

    def __init__(self, core, vmcb_pa: int, l0, caps: Optional[SvmCaps] = None, record=None):
        self.core = core
        self.mem = core.mem
        self.vmcb = V.Vmcb(core.mem, vmcb_pa)
        self.l0 = l0
        if caps is None:
            model = getattr(core.machine, "cpu", None)
            caps = SvmCaps.from_model(model) if model is not None and model.has_svm else SvmCaps()
        self.caps = caps
        self.record = record
        self.read_mem = self.mem.read
        self.active = False          # in the guest (between VMRUN and #VMEXIT)
        self.blocked = False         # the L0 halted this vCPU (HLT exit)
        self.gif = True              # the global interrupt flag (STGI/CLGI, APM 15.17)
        self.pause = PauseFilter(0)
        self.asid: Optional[int] = None     # the ASID of the last VMRUN
        self.last_exit: Optional[Decision] = None
        #: The last event the intercept rules let through, and their decision (why-not).
        self.last_no_exit: Optional[tuple[Event, Decision]] = None
        self.last_failure: Optional[VmrunFailure] = None
        self.stop_on_exit = None
        self.exit_pending = False
        self._exit_event: Optional[Event] = None
        self._v_intr_masking = False
        self._nrips = self.caps.has(SVM_FEATURE_NRIPS)
        self.npt: Optional[NptStage2] = None     # the nested tables the core uses, when enabled
        self._clean: Optional[bytes] = None      # the save area as the engine holds it, if known
        self._checked: Optional[bytes] = None    # the fields VMRUN's checks read, as last passed

    # ------------------------------------------------------------------ VMRUN
    def vmrun(self) -> bool:
        """VMRUN with this VMCB.  False when the checks failed (#VMEXIT with
        VMEXIT_INVALID written, the L0 told)."""
        v = self.vmcb
        self.l0.prepare_entry(self)
        view, pa = self.mem.view, v.pa
        save = bytes(view[pa + _SAVE_LO:pa + _SAVE_HI])
        key = bytes(view[pa:pa + 0x18]) + bytes(view[pa + 0x40:pa + 0x60]) + \
            bytes(view[pa + 0x90:pa + 0xB8]) + save
        if key != self._checked:
            # (the fields the checks read are unchanged since the last VMRUN that passed them)
            failure = check_vmrun(v, self.caps)
            if failure is not None:
                return self._vmrun_failed(failure)
            self._checked = key
        self._sync_engine(save)
        core = self.core
        asid, tlb = v.get("asid"), v.get("tlb_ctl")
        if tlb != V.TLB_CONTROL_DO_NOTHING or asid != self.asid:
            core.flush_tlb()          # (one untagged TLB: a new ASID must not see old entries)
        self.asid = asid
        self._sync_npt(tlb != V.TLB_CONTROL_DO_NOTHING)
        self.pause = PauseFilter.at_vmrun(v)
        self._v_intr_masking = bool(v.get("int_ctl") & V.V_INTR_MASKING_MASK)
        self.gif = True
        self.active = True
        self.blocked = False
        inj = v.get("event_inj")
        if inj & V.SVM_EVTINJ_VALID:
            self._inject(inj)
        return True

    def _vmrun_failed(self, failure: VmrunFailure) -> bool:
        v = self.vmcb
        self.last_failure = failure
        self.active = False
        v.exitcode = X.INVALID
        v.set("exit_info_1", 0)
        v.set("exit_info_2", 0)
        d = exit_decision(X.INVALID, (failure.check,))
        self.last_exit = d
        self._log(d, self.core.rip())
        self.l0.entry_failed(self, failure)
        return False

    def engine_matches_vmcb(self) -> None:
        """Declare that the engine holds exactly the save area's state now (a
        harness that restored the CPU context the VMCB was saved from): the next
        VMRUN loads only the fields written after this."""
        pa = self.vmcb.pa
        self._clean = bytes(self.mem.view[pa + _SAVE_LO:pa + _SAVE_HI])

    def _sync_engine(self, save: Optional[bytes] = None) -> None:
        """Load into the engine the save-area groups written since it last matched
        the save area (all of them when that is not known)."""
        if save is None:
            pa = self.vmcb.pa
            save = bytes(self.mem.view[pa + _SAVE_LO:pa + _SAVE_HI])
        clean = self._clean
        if clean is None:
            self._load_guest_state(_ALL_GROUPS)
        elif save != clean:
            groups = []
            for grp, spans in _GROUP_SPANS:
                for sl in spans:
                    if save[sl] != clean[sl]:
                        groups.append(grp)
                        break
            self._load_guest_state(groups)
        else:
            self._load_guest_state(())
        self._clean = save

    def _load_guest_state(self, groups=None) -> None:
        """Load the save area into the engine: the groups of fields (see
        :data:`_GROUP_SPANS`) in ``groups`` (None: all), which VMRUN narrows to
        those written since the engine last matched the save area (the saved
        bytes at #VMEXIT or at the last VMRUN: ``_clean``); the interrupt shadow
        always."""
        v, core = self.vmcb, self.core
        uc = core.uc
        g = v.get
        p = core.probe
        if groups is None:
            groups = _ALL_GROUPS
        mode_changed = False
        if "cr" in groups:
            efer, cr0, cr3, cr4 = g("efer"), g("cr0"), g("cr3"), g("cr4")
            engine_efer = efer & ~(EFER_LMA | EFER_SVME)   # (QEMU's own SVM must not see SVME)
            mode_changed = (p.cr(0), p.cr(3), p.cr(4), core.rdmsr_raw(MSR_EFER) & ~EFER_LMA) != \
                (cr0, cr3, cr4, engine_efer)
        if mode_changed:
            uc.reg_write(UX.UC_X86_REG_CR3, cr3)
            uc.reg_write(UX.UC_X86_REG_CR4, cr4)
            if not efer & EFER_LMA and core.rdmsr_raw(MSR_EFER) & EFER_LMA:
                uc.reg_write(UX.UC_X86_REG_CR0, cr0 & ~CR0_PG)   # (only this clears LMA in Unicorn)
            uc.reg_write(UX.UC_X86_REG_MSR, (MSR_EFER, engine_efer))
            uc.reg_write(UX.UC_X86_REG_CR0, cr0)
        if "dtr" in groups:
            uc.reg_write(UX.UC_X86_REG_GDTR, (0, g("gdtr_base"), g("gdtr_limit"), 0))
            uc.reg_write(UX.UC_X86_REG_IDTR, (0, g("idtr_base"), g("idtr_limit"), 0))
        if "seg" in groups:
            for idx, name in _SEGS:
                core.write_segment(idx, g(f"{name}_selector"), g(f"{name}_base"),
                                   g(f"{name}_limit"), attrib_to_ar(g(f"{name}_attrib")))
        if "dr" in groups:
            uc.reg_write(UX.UC_X86_REG_DR6, g("dr6"))
            uc.reg_write(UX.UC_X86_REG_DR7, g("dr7"))
        if "rflags" in groups:
            uc.reg_write(UX.UC_X86_REG_EFLAGS, g("rflags"))
        if "rsp" in groups:
            p.set_gpr(4, g("rsp"))
        if "rax" in groups:
            p.set_gpr(0, g("rax"))
        if "rip" in groups:
            rip = g("rip")
            if rip != p.eip():
                p.set_eip(rip)   # (only when it moved: a RIP write inside a hook restarts there)
        if "cr2" in groups:
            core.set_cr2(g("cr2"))
        core.shadow_at = core.icount if g("int_state") & V.SVM_INTERRUPT_SHADOW_MASK else -1
        if core.state is State.HALTED:
            core.state = State.RUNNING
        if mode_changed:
            core.after_mode_change()

    def save_guest_state(self) -> None:
        """Copy the guest state VMRUN loads and #VMEXIT saves from the engine
        into the save area (also: an L0 adopting a running core's state)."""
        v, core = self.vmcb, self.core
        p = core.probe
        view, pa = self.mem.view, v.pa
        segs = []
        for idx in (0, 1, 2, 3):                       # ES, CS, SS, DS: one 64-byte block
            sel, base, limit, ar = core.read_segment(idx)
            segs += (sel, ar_to_attrib(ar), limit, base)
        _SEG_BLOCK.pack_into(view, pa + _ES_AT, *segs)
        gb, gl = p.dtr(ENV_GDT)[:2]
        ib, il = p.dtr(ENV_IDT)[:2]
        _DTR.pack_into(view, pa + _GDTR_AT, gl, gb)
        _DTR.pack_into(view, pa + _IDTR_AT, il, ib)
        _U8.pack_into(view, pa + _CPL_AT, core.cpl())
        _U64.pack_into(view, pa + _EFER_AT, core.rdmsr_raw(MSR_EFER) | EFER_SVME)
        _CR_BLOCK.pack_into(view, pa + _CR4_AT, p.cr(4), p.cr(3), p.cr(0),
                            p.reg(UX.UC_X86_REG_DR7) & 0xFFFFFFFF,
                            p.reg(UX.UC_X86_REG_DR6) & 0xFFFFFFFF,
                            p.reg(UX.UC_X86_REG_EFLAGS), p.eip())
        _U64.pack_into(view, pa + _RSP_AT, p.gpr(4))
        _U64.pack_into(view, pa + _RAX_AT, p.gpr(0))
        _U64.pack_into(view, pa + _CR2_AT, core.cr2)   # (the architectural CR2 the core keeps)
        v.put("int_state", V.SVM_INTERRUPT_SHADOW_MASK if core.icount == core.shadow_at else 0)
        pa = v.pa
        self._clean = bytes(self.mem.view[pa + _SAVE_LO:pa + _SAVE_HI])

    def _inject(self, inj: int) -> None:
        """EVENTINJ (APM 15.20): deliver through the guest IDT now.  The model
        clears the V bit once it has taken the event (a later VMRUN injects only
        what the L0 writes anew)."""
        v, core = self.vmcb, self.core
        v.set("event_inj", inj & ~V.SVM_EVTINJ_VALID)
        vector = inj & V.SVM_EVTINJ_VEC_MASK
        t = inj & V.SVM_EVTINJ_TYPE_MASK
        ec = v.get("event_inj_err") if inj & V.SVM_EVTINJ_VALID_ERR else None
        if t == V.SVM_EVTINJ_TYPE_NMI:
            etype = EventType.NMI
        elif t == V.SVM_EVTINJ_TYPE_EXEPT:
            # vectors 3 and 4 behave as the traps of INT3 and INTO (APM 15.20)
            etype = EventType.SOFTWARE_EXCEPTION if vector in (3, 4) else \
                EventType.HARDWARE_EXCEPTION
        elif t == V.SVM_EVTINJ_TYPE_SOFT:
            etype = EventType.SOFTWARE_INTERRUPT
        else:
            etype = EventType.EXTERNAL_INTERRUPT
        # the frame returns to the guest's RIP (a VMM injecting INTn sets RIP past it)
        core.inject_event(vector, etype, ec, core.rip())

    # ------------------------------------------------------------------ #VMEXIT
    def _log(self, d: Decision, rip: int) -> None:
        if self.record is not None:
            core = self.core
            in_window = bool(core.markers) and core.markers[-1][1] is None
            self.record(SvmExitRecord(core.index, d.code, d.name, d.exit_info_1, d.exit_info_2,
                                      rip, in_window, d.cause))

    def vm_exit(self, d: Decision, event: Optional[Event]) -> None:
        """#VMEXIT for decision ``d``; then the L0 handles it."""
        core = self.core
        rip = event.rip if event is not None and event.insn is not None else core.rip()
        self.active = False
        self.last_exit = d
        v = self.vmcb
        self.save_guest_state()
        base = core.probe.cs_base()
        if base and d.next_rip:
            # the rule's nRIP is linear (an Event's RIP is CS.base + RIP); the VMCB's is RIP
            nrip = (d.next_rip - base) & ((1 << 64) - 1)
            d = d._replace(next_rip=nrip, exit_info_2=nrip if d.code == X.IOIO else d.exit_info_2)
        code = d.code & ((1 << 64) - 1)
        put = v.put
        put("exit_code", code)
        put("exit_code_hi", code >> 32)
        put("exit_info_1", d.exit_info_1)
        put("exit_info_2", d.exit_info_2)
        info, err = exit_int_info(core.delivering)
        put("exit_int_info", info)
        put("exit_int_info_err", err)
        put("next_rip", d.next_rip if self._nrips else 0)
        put("insn_len", len(d.insn_bytes))
        v.set("insn_bytes", d.insn_bytes)
        self.gif = False             # #VMEXIT clears GIF (the host sets it again: STGI)
        self._log(d, rip)
        core.count(Kind.VM_EXIT)
        if core.trace is not None:
            core.trace(core, Event(Kind.VM_EXIT, core.index, rip,
                                   extra={"exit_code": d.code, "name": d.name,
                                          "exit_info_1": d.exit_info_1}))
        self._exit_event = event
        if self.stop_on_exit is not None and self.stop_on_exit(d.code):
            self.exit_pending = True
            if event is not None and event.insn is not None and event.kind is not _KIND_EXCEPTION:
                core.cancel_retirement()
            core.request_stop("vm-exit")
            return
        self.l0.handle_exit(self)
        if not self.active and self.l0.wants_entry(self):
            self.vmrun()

    def complete_exit(self) -> None:
        """The exit the stepping API stopped at goes to the L0 now."""
        if not self.exit_pending:
            return
        self.exit_pending = False
        self.l0.handle_exit(self)
        if not self.active and self.l0.wants_entry(self):
            self.vmrun()
        self.core.settle_pending_exit(self._exit_event, self.active)

    def abandon_exiting_instruction(self) -> None:
        """The hypervisor will not complete the instruction that exited."""
        ev = self._exit_event
        if ev is not None and ev.insn is not None and ev.kind is not _KIND_EXCEPTION:
            self.core.cancel_retirement()

    # ------------------------------------------------------------------ L0 helpers
    @property
    def exit_event(self) -> Optional[Event]:
        """The event of the last #VMEXIT (None for one not tied to an event): the
        instruction an L0 without decode assists for it (CLTS, LMSW) reads."""
        return self._exit_event

    def gpr(self, n: int) -> int:
        """Guest GPR ``n`` while the L0 runs: RAX and RSP from the save area, the
        others from the engine (VMRUN does not load them)."""
        if n == 0:
            return self.vmcb.get("rax")
        if n == 4:
            return self.vmcb.get("rsp")
        return self.core.probe.gpr(n)

    def set_gpr(self, n: int, value: int) -> None:
        value &= (1 << 64) - 1
        if n == 0:
            self.vmcb.put("rax", value)
        elif n == 4:
            self.vmcb.put("rsp", value)
        else:
            self.core.probe.set_gpr(n, value)

    def skip_instruction(self) -> None:
        """The save area's RIP to nRIP (KVM's skip_emulated_instruction with NRIPS)."""
        v = self.vmcb
        nrip = v.get("next_rip")
        if not nrip:
            raise GuestError(f"core {self.core.index}: skip without nRIP (exit {v.exitcode:#x})")
        v.put("rip", nrip)

    def inject(self, vector: int, etype: int, error_code: Optional[int] = None) -> None:
        """EVENTINJ for the next VMRUN (``etype``: an SVM_EVTINJ_TYPE_* value)."""
        v = self.vmcb
        inj = V.SVM_EVTINJ_VALID | etype | vector
        if error_code is not None:
            inj |= V.SVM_EVTINJ_VALID_ERR
            v.put("event_inj_err", error_code)
        v.put("event_inj", inj)

    def emulate_on_platform(self) -> None:
        """Let the platform execute the exiting instruction (port I/O, MSRs) on the
        guest state of the save area; the state it leaves is saved back."""
        ev = self._exit_event
        if ev is None or ev.insn is None:
            raise GuestError(f"core {self.core.index}: the L0 asked to emulate the exiting "
                             "instruction of an exit that has none")
        self._sync_engine()
        try:
            self.core.run_native(ev)
        finally:
            self.save_guest_state()

    # ------------------------------------------------------------------ the core's seam
    def on_event(self, core, event: Event) -> bool:
        if not self.active:
            return False
        if event.kind in _SVM_KINDS:
            # EFER.SVME is kept out of the engine (see _load_guest_state): the guest's is set
            event.regs["efer"] = core.rdmsr_raw(MSR_EFER) | EFER_SVME
        out = decide(event, self.vmcb, self.read_mem,
                     pause=self.pause if event.kind is _KIND_PAUSE else None)
        if out.fault:
            raise _Fault(out.vector, out.error_code)
        if out.pause is not None:
            self.pause = out.pause
        if out.exit:
            if out.trap:
                self._complete_write(event)     # a write trap: the write happens first
                self.vm_exit(out, None)
                return True
            self.vm_exit(out, event)
            return True
        self.last_no_exit = (event, out)
        return self._in_guest(event)

    def _complete_write(self, ev: Event) -> None:
        """The instruction of a CR or EFER write trap, completed before the #VMEXIT."""
        core, insn = self.core, ev.insn
        uc = core.uc
        if ev.kind is Kind.WRMSR:
            value = (core.probe.gpr(2) & 0xFFFFFFFF) << 32 | core.probe.gpr(0) & 0xFFFFFFFF
            uc.reg_write(UX.UC_X86_REG_MSR, (MSR_EFER, value & ~(EFER_LMA | EFER_SVME)))
        elif ev.kind is Kind.MOV_TO_CR and insn.cr in _CR_REGS:
            value = core.probe.gpr(insn.gpr)
            core.pae.load_for_mov_cr(insn.cr, value)
            uc.reg_write(_CR_REGS[insn.cr], value)
        else:
            raise GuestError(f"core {core.index}: a write trap of {ev.kind.value} "
                             f"{'CR%d' % insn.cr if insn.cr is not None else ''} is not modelled")
        core.set_rip(ev.rip + insn.length)
        core.after_mode_change()

    def _in_guest(self, ev: Event) -> bool:
        """What the guest's execution of an unintercepted instruction changes."""
        k = ev.kind
        core = self.core
        if k is Kind.STGI or k is Kind.CLGI:
            self.gif = k is Kind.STGI
            core.set_rip(ev.rip + ev.insn.length)
            return True
        if k in (Kind.VMLOAD, Kind.VMSAVE, Kind.SKINIT, Kind.INVLPGA):
            raise GuestError(f"core {core.index}: {k.value} executed by the guest without its "
                             "intercept is not modelled")
        if k in (Kind.RDTSC, Kind.RDTSCP):
            core.tsc_adjust = self.vmcb.get("tsc_offset")
            try:
                core.run_native(ev)
            finally:
                core.tsc_adjust = 0
            return True
        if self._v_intr_masking and k in (Kind.MOV_FROM_CR, Kind.MOV_TO_CR) and ev.insn.cr == 8:
            return self._cr8_v_tpr(ev)
        return False

    def _cr8_v_tpr(self, ev: Event) -> bool:
        """With V_INTR_MASKING, CR8 is V_TPR (APM 15.21.3 "Virtual TPR")."""
        v, core, insn = self.vmcb, self.core, ev.insn
        int_ctl = v.get("int_ctl")
        if ev.kind is Kind.MOV_FROM_CR:
            core.uc.reg_write(GPR_IDS[insn.gpr], int_ctl & V.V_TPR_MASK)
        else:
            value = core.probe.gpr(insn.gpr)
            if value >> 4:
                raise _Fault(13, 0)
            v.set("int_ctl", int_ctl & ~V.V_TPR_MASK | value)
        core.set_rip(ev.rip + insn.length)
        return True

    def _insn_bytes(self) -> bytes:
        """Decode assists (APM Vol. 2, "Decode Assists": #PF and NPF): the bytes
        of the instruction at RIP the processor fetched, up to 15; fewer where
        the next page cannot be read, none where the first cannot."""
        if not self.caps.has(SVM_FEATURE_DECODE_ASSISTS):
            return b""
        core = self.core
        rip = core.rip()
        for n in (15, 0x1000 - (rip & 0xFFF)):
            try:
                return core.read_linear(rip, min(n, 15), peek=True)
            except Exception:           # (a #PF, a nested fault, memory outside RAM)
                continue
        return b""

    def on_exception(self, core, vector: int, error_code, cr2) -> bool:
        if not self.active or vector == 2:
            return False
        d = core.delivering
        ev = Event(Kind.EXCEPTION, core.index, core.rip(), d.insn if d is not None else None,
                   vector=vector, error_code=error_code, cr2=cr2, regs=core.lazy_regs())
        if vector == 14:
            ev.extra["insn_bytes"] = self._insn_bytes()
        out = decide(ev, self.vmcb, self.read_mem)
        if out.exit:
            self.vm_exit(out, ev)
            return True
        return False

    def _sync_npt(self, flush: bool) -> None:
        """At VMRUN: the core translates through the nested tables when
        nested_ctl.NP_ENABLE is set (virtual-TLB mode), with QEMU's own walker
        otherwise (guest page tables then hold host-physical addresses)."""
        v, core = self.vmcb, self.core
        if not v.get("nested_ctl") & V.SVM_NESTED_CTL_NP_ENABLE:
            if self.npt is not None:
                self.npt = None
                core.set_second_stage(None)
            return
        ncr3 = v.get("nested_cr3")
        if self.npt is None or self.npt.ncr3 != ncr3:
            self.npt = NptStage2(self.mem, ncr3, lambda: self.active)
            core.set_second_stage(self.npt)
        elif flush:
            self.npt.invalidate()
            core.flush_tlb()

    def on_stage2_fault(self, core, fault) -> bool:
        """A refused nested access: #VMEXIT NPF (fault-like: the access did not happen)."""
        if not self.active:
            return False
        f = fault.info
        d = exit_decision(X.NPF, (f.reason,), exit_info_1=f.exit_info_1, exit_info_2=f.gpa)
        self.vm_exit(d._replace(insn_bytes=self._insn_bytes()), None)
        return True

    def wants_window(self) -> bool:
        return self.active and bool(self.vmcb.get("int_ctl") & V.V_IRQ_MASK)

    def has_wakeup(self) -> Optional[bool]:
        if not self.active and not self.blocked:
            return None
        lapic = self.core.lapic
        if lapic.init_pending or lapic.nmi_pending:
            return True
        if self.blocked:
            return lapic.sipi_pending is not None or lapic.pending_vector() is not None \
                or self.l0.has_pending(self)
        if intercepted(self.vmcb, I.INTERCEPT_INTR) and lapic.pending_vector() is not None:
            return True
        if self.vmcb.get("int_ctl") & V.V_IRQ_MASK and \
                self.core.probe.reg(UX.UC_X86_REG_EFLAGS) & RFLAGS_IF:
            return True
        return None

    def next_event_ns(self) -> Optional[int]:
        return None

    def single_step(self) -> bool:
        return False

    def boundary(self, core) -> bool:
        """Interrupts, NMIs, INIT and virtual interrupts on an instruction
        boundary in the guest (APM 15.13 "Interrupt Intercepts", 15.21)."""
        if self.blocked:
            return self.l0.unblock(self)
        if not self.active or not self.gif:
            return False
        v = self.vmcb
        lapic = core.lapic
        if lapic.init_pending and intercepted(v, I.INTERCEPT_INIT):
            lapic.take_init()
            core.count(Kind.INIT)
            self.vm_exit(exit_decision(X.INIT, ("INTERCEPT_INIT=1",)), None)
            return True
        if core.state in (State.WAIT_SIPI, State.SHUTDOWN):
            return False
        shadow = core.icount == core.shadow_at
        if lapic.nmi_pending and not core.nmi_blocked and not shadow \
                and intercepted(v, I.INTERCEPT_NMI):
            lapic.take_nmi()
            core.count(Kind.NMI)
            self.vm_exit(exit_decision(X.NMI, ("INTERCEPT_NMI=1",)), None)
            return True
        rflags = core.probe.reg(UX.UC_X86_REG_EFLAGS)
        if lapic.pending_vector() is not None and intercepted(v, I.INTERCEPT_INTR) and \
                (self._v_intr_masking or (rflags & RFLAGS_IF and not shadow)):
            core.count(Kind.INTERRUPT)
            why = "V_INTR_MASKING=1: the host's IF (1) masks physical interrupts" \
                if self._v_intr_masking else "the guest's RFLAGS.IF=1"
            self.vm_exit(exit_decision(X.INTR, ("INTERCEPT_INTR=1", why)), None)
            return True
        int_ctl = v.get("int_ctl")
        if int_ctl & V.V_IRQ_MASK:
            d = virtual_interrupt_exit(v, rflags=rflags, interrupt_shadow=shadow, gif=self.gif)
            if d.exit:
                self.vm_exit(d, None)
                return True
            if virtual_interrupt_ready(int_ctl, rflags=rflags, interrupt_shadow=shadow,
                                       gif=self.gif):
                v.set("int_ctl", int_ctl & ~V.V_IRQ_MASK)
                core.inject_event(v.get("int_vector") & 0xFF, EventType.EXTERNAL_INTERRUPT, None,
                                  core.rip())
                return True
        return False
