"""Virtual-TLB mode: a core's memory accesses translated in Python, in two stages.

In its default mode Unicorn translates linear addresses with QEMU's own page
walker, which knows one stage only.  In *virtual-TLB mode*
(``ctl_set_tlb_mode(UC_TLB_VIRTUAL)``) QEMU calls a UC_HOOK_TLB_FILL hook on
every TLB miss instead, and caches the 4-KiB translation and the
permissions the hook returns.  :class:`VirtualTlb` is that hook: the guest's
own page walk (:func:`~devirt_emu.platform.paging.walk`: 4-level, PAE or
32-bit paging, or paging off), every guest-physical address on the way (the
paging-structure entries and the final page) passed
through a *second stage* that the owner supplies (the VMX layer's EPT, see
:mod:`devirt_emu.vmx.ept_mmu`), accessed and dirty flags set as the SDM says.
A refused access becomes the guest's #PF (with the architectural error code
and CR2), a #GP for a non-canonical address, or a :class:`Stage2Fault` that
the owner turns into a VM exit.  The platform's own accesses on the guest's
behalf (event delivery, the memory side of INS/OUTS) use the same walk
through :meth:`VirtualTlb.translate`.

The core turns this mode on only while its VMX layer runs a guest with EPT
(``set_second_stage`` of :class:`SecondStage`, the Core's mixin in this
module); natively and with EPT off the engine keeps QEMU's walker, at full
speed.

Measured on Unicorn 2.1.4 (this machine, Python 3.11; scratch engines)
---------------------------------------------------------------------
* The hook receives the page-aligned linear address and UC_MEM_READ (16),
  UC_MEM_WRITE (17) or UC_MEM_FETCH (18); it fills ``entry.paddr`` and
  ``entry.perms`` (UC_PROT_* bits) and returns True.  QEMU then serves every
  later access the permissions allow from its TLB without calling the hook:
  a read fill that grants write lets the first write through unseen.  So a
  fill grants write only when the dirty flags are already set (here and in
  the second stage), as QEMU's own walker does.
* A refusal (False, or permissions without the access) ends ``emu_start``
  with UC_ERR_EXCEPTION: no UC_HOOK_INTR call, CR2 untouched, RIP at the
  instruction for a data access and at the fetch address for a fetch.  The
  full faulting address (the hook only sees the page) is ``invalid_addr`` in
  ``uc_struct``, found by :func:`calibrate_invalid_addr`.
* The instruction counter of a counted run includes an instruction whose
  data access was refused (it does not include a refused fetch).
* A refused fetch for the second page of an instruction that straddles a
  page boundary fails the translation of the whole block: RIP is the block's
  first instruction and nothing of it ran (QEMU 5 translates the block
  before running it).  The core then stops the engine in front of the
  straddling instruction (see ``SecondStage._straddle_fetch``) and retries.
* Unicorn also calls the hook for its own bookkeeping: when a run ends it
  looks up the page before each exit address (``until``, and the exits of
  ``ctl_set_exits``) to drop their translated code, and ``ctl_remove_cache``
  looks up its range.  Refusing such a lookup ends ``emu_start`` with
  UC_ERR_EXCEPTION after the run, hiding the run's own result (measured: a
  FETCH_PROT stop came back as UC_ERR_EXCEPTION; the refusal unwinds from
  outside QEMU's CPU loop, so it is not exercised by any test).  So only an access made
  while the core runs, and for a fetch only near RIP, is ever refused; the
  others get their real translation or a placeholder entry to no memory.
* TLB flushes: MOV to CR3 with CR0.PG = 1 flushes everything; INVLPG flushes
  its page; ``mem_protect`` flushes everything; so does
  ``uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)``.  ``context_restore``, a
  switch of the TLB mode (either way), a write of CR0/CR4 with an unchanged
  value and WRMSR of EFER do not flush: :class:`VirtualTlb` flushes on every
  switch and the core after EFER writes.
* Physical page permissions (``mem_protect``) still apply after the
  translation; UC_HOOK_MEM_FETCH_PROT and UC_HOOK_MEM_WRITE_PROT then report
  the *physical* address (the core maps it back to
  the linear address: ``Core._fetch_linear``).
* Cost (``benchmarks/bench_ept.py``): a fill is a Python two-stage walk, about
  45 microseconds here; a hit costs nothing.  Unicorn's TLB kept a loop over
  2048 pages without refilling it (one fill per page until the next flush).

Scope
-----
* Every paging mode of :mod:`~devirt_emu.platform.paging` but 5-level
  paging (:class:`~devirt_emu.platform.paging.UnsupportedPaging`, a guest
  error): 4-level paging (4 KiB / 2 MiB / 1 GiB pages), PAE paging (through
  the core's PDPTE registers, :class:`PaeRegisters`; 4 KiB / 2 MiB pages),
  32-bit paging (4 KiB / 4 MiB pages, PSE-36) and paging off.  SMEP, SMAP and
  protection keys are not modelled (the modelled CPU's CPUID does not
  advertise them).
* Unicorn performs a task switch in this mode with paging on except for EIP
  (measured: see ``SecondStage._after_task_switch_step``), which the core
  then puts itself.
* The user/supervisor distinction comes from the CPL when the fill happens
  (the hook is not told QEMU's MMU index): QEMU's own implicit supervisor
  accesses at CPL 3 (descriptor-table reads by the engine) would be checked
  as user accesses.
* Accessed and dirty flags of the guest's paging structures are set once the
  guest translation succeeds (not on a #PF), before the final access goes
  to the second stage; those writes go through the second stage as writes
  to a paging-structure entry (SDM "EPT Violations").
* Non-canonical linear addresses give #GP(0) (a stack access would give
  #SS(0): the hook cannot tell).
"""
from __future__ import annotations

import ctypes
import struct
from typing import Optional

from unicorn import UC_HOOK_TLB_FILL, UC_TLB_CPU, UC_TLB_VIRTUAL, UcError
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH

from ..x86 import (EFER_NX, MSR_EFER, X86_CR0_PG, X86_CR0_WP, X86_CR4_LA57, X86_CR4_PAE,
                   X86_CR4_PSE)
from .errors import GuestError, _Fault
from .memory import PAGE_SIZE
from .paging import (PF_I, PF_U, PF_W, PageFault, PagingMode,
                     UnsupportedPaging, Walk, check_rights, pdpt_address, pdpte_reserved,
                     pdptes_reload, walk)
from .ucinternals import HF_CPL_MASK, HF_LMA, CalibrationError

#: Access kinds, as UC_PROT bits (and as bits 2:0 of an EPT-violation qualification).
ACC_READ, ACC_WRITE, ACC_FETCH = 1, 2, 4
_UC_ACCESS = {16: ACC_READ, 17: ACC_WRITE, 18: ACC_FETCH}   # UC_MEM_READ/WRITE/FETCH

_PTE_A, _PTE_D = 1 << 5, 1 << 6
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_PDPT = struct.Struct("<4Q")
_U64_MASK = (1 << 64) - 1
#: Where placeholder entries point: no memory (far above RAM and the LAPIC page).
PLACEHOLDER_PA = (1 << 40) - 0x1000


_RMW_MNEMONICS = frozenset({"cmpxchg", "cmpxchg8b", "cmpxchg16b", "xadd"})
_disassemblers: dict = {}


def _disassembler(mode: int):
    md = _disassemblers.get(mode)
    if md is None:
        from capstone import CS_ARCH_X86, CS_MODE_16, CS_MODE_32, CS_MODE_64, Cs
        md = Cs(CS_ARCH_X86, {16: CS_MODE_16, 32: CS_MODE_32, 64: CS_MODE_64}[mode])
        md.detail = True
        _disassemblers[mode] = md
    return md


def straddling_instruction(code: bytes, address: int, mode: int) -> int | None:
    """``code`` runs from ``address`` to the end of its page: the address of the
    instruction that continues on the next page (the first one the bytes do
    not complete), or None if the instructions end exactly at the page end."""
    at = address
    for insn in _disassembler(mode).disasm(code, address):
        at = insn.address + insn.size
    return at if at < address + len(code) else None


def instruction_length(code: bytes, mode: int) -> int | None:
    """Length of the instruction at the start of ``code`` (None if undecodable)."""
    for insn in _disassembler(mode).disasm(code, 0, 1):
        return insn.size
    return None


def memory_access(code: bytes, mode: int) -> tuple[int, str] | None:
    """(size in bytes of its memory operand, mnemonic) of the instruction at the
    start of ``code`` (``mode`` 16, 32 or 64); None if it is undecodable or has
    no memory operand.  What an emulator decodes to emulate an MMIO access."""
    for insn in _disassembler(mode).disasm(code, 0, 1):
        for op in insn.operands:
            if op.type == 3:                    # X86_OP_MEM
                return op.size, insn.mnemonic.split()[-1]
        return None
    return None


def read_modify_write(code: bytes, mode: int) -> bool:
    """Does the instruction at the start of ``code`` (``mode`` 16, 32 or 64) read
    and write one memory operand (ADD [m], r; INC [m]; XCHG; CMPXCHG...)?  Such
    an access is a write for paging and EPT (the #PF error code's W/R bit, bit 1
    of an EPT-violation qualification) even when its read part is refused
    first, as QEMU makes it.  capstone's operand access decides, plus the
    instructions it reports as reading their memory operand only (measured,
    capstone 5: CMPXCHG, XADD)."""
    for insn in _disassembler(mode).disasm(code, 0, 1):
        if insn.mnemonic.split()[-1] in _RMW_MNEMONICS:      # ("lock cmpxchg")
            return True
        return any(op.type == 3 and op.access == 3 for op in insn.operands)   # X86_OP_MEM, R|W
    return False


class Stage2Fault(Exception):
    """The second stage refused a guest-physical access (for EPT: a violation
    or a misconfiguration).  ``info`` is the second stage's own description
    (opaque to the platform); its owner turns it into a VM exit."""

    def __init__(self, info):
        super().__init__(info)
        self.info = info


class AccessAborted(Exception):
    """A platform access on the guest's behalf ended in a VM exit that has
    already been taken: unwind the instruction or event delivery that made
    it, with no further effect."""


class NonCanonical(Exception):
    """A linear address that is not canonical in 64-bit mode (#GP(0))."""

    def __init__(self, linear: int):
        super().__init__(f"non-canonical address {linear:#x}")
        self.linear = linear


_invalid_addr_offset: int | None = None


def calibrate_invalid_addr() -> int:
    """Offset of ``uc_struct.invalid_addr``, the full address of the access a
    TLB-fill hook refused (the hook itself only sees its page).  Found once
    per process on scratch engines: refused reads, writes and fetches of
    unaligned addresses, the only 8-byte field holding each of them."""
    global _invalid_addr_offset
    if _invalid_addr_offset is not None:
        return _invalid_addr_offset
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    found = None
    # mov rcx, imm64 ; then mov rax, [rcx] / mov [rcx], rax / jmp rcx
    tails = (b"\x48\x8b\x01", b"\x48\x89\x01", b"\xff\xe1")
    for addr in (0x9000_0131, 0x5123_4567_89AB, 0x7FFF_0000_0FF7):
        for tail in tails:
            uc = Uc(UC_ARCH_X86, UC_MODE_64)
            uc.mem_map(0, 0x2000)
            uc.mem_write(0x1000, b"\x48\xb9" + _U64.pack(addr) + tail)
            uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)

            def fill(uc_, vaddr, access, entry, data):
                if vaddr == 0x1000:
                    entry.paddr, entry.perms = 0x1000, 7
                    return True
                return False
            uc.hook_add(UC_HOOK_TLB_FILL, fill)
            try:
                uc.emu_start(0x1000, 0x1000 + 13)
            except UcError:
                pass
            blob = ctypes.string_at(uc._uch.value, 0x2000)
            here = {o for o in range(0, len(blob) - 8, 8) if _U64.unpack_from(blob, o)[0] == addr}
            found = here if found is None else found & here
    if not found or len(found) != 1:
        raise CalibrationError(f"uc_struct.invalid_addr not found uniquely: {found}")
    _invalid_addr_offset = found.pop()
    return _invalid_addr_offset


class VirtualTlb:
    """The virtual-TLB mode of one core (``core.vtlb``), with its second stage.

    ``second_stage`` is any object with ``translate(gpa, access, gla,
    translation, peek) -> (hpa, rights)``: the host-physical address of a
    guest-physical one and the ACC_* rights a TLB entry may grant for its
    page, or :class:`Stage2Fault`.  ``gla`` is the linear address being
    translated and ``translation`` says whether ``gpa`` is its translation
    (False: one of the guest's paging-structure entries); ``peek`` asks for no
    side effect (no accessed/dirty flag set; the caller only wants to know).
    """

    def __init__(self, core):
        self.core = core
        self.uc = core.uc
        self.probe = core.probe
        self.mem = core.mem
        self.view = core.mem.view
        self.stage2 = None
        self.active = False
        self._refused: tuple | None = None     # (page, access, user) of the last refused fill
        self._error: BaseException | None = None
        self._placeholders: set[int] = set()
        #: (linear page, access, user) -> host-physical page of the platform's
        #: successful peeks since the last flush: a TLB of the platform's own
        #: reads (a processor may cache translations until an invalidation,
        #: SDM Vol. 3A "Caching Translation Information"); peeks have no side
        #: effect, so no accessed or dirty flag is skipped
        self._peeks: dict[tuple, int] = {}
        self.fills = 0                        # hook calls (TLB misses), for benchmarks
        self._invalid_addr = core.uc._uch.value + calibrate_invalid_addr()
        self.uc.hook_add(UC_HOOK_TLB_FILL, self._on_fill)

    # ------------------------------------------------------------------ mode
    def enable(self, stage2) -> None:
        """Translate through ``stage2`` from now on (flushes the TLB)."""
        self.stage2 = stage2
        if not self.active:
            self.uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
            self.active = True
        self.flush()

    def disable(self) -> None:
        """Back to QEMU's own one-stage walker (flushes the TLB)."""
        if self.active:
            self.uc.ctl_set_tlb_mode(UC_TLB_CPU)
            self.active = False
            self.flush()
        self.stage2 = None
        self._refused = self._error = None

    def flush(self) -> None:
        """Drop every cached translation of the engine (measured: neither a mode
        switch nor context_restore does)."""
        self._placeholders.clear()
        self._peeks.clear()
        self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    # ------------------------------------------------------------------ the walk
    def translate(self, linear: int, access: int = ACC_READ, *, user: bool = False,
                  peek: bool = False) -> int:
        """Host-physical address of ``linear`` for ``access`` (ACC_*).  Raises
        PageFault (the guest's #PF), NonCanonical, UnsupportedPaging or
        Stage2Fault; with ``peek`` nothing in memory changes."""
        if not peek:
            return self._walk(linear, access, user, False)[0]
        key = (linear >> 12, access, user)
        page = self._peeks.get(key)
        if page is None:
            page = self._walk(linear, access, user, True)[0] & ~0xFFF
            self._peeks[key] = page
        return page | (linear & 0xFFF)

    def guest_walk(self, linear: int, cr3: Optional[int] = None) -> Optional[Walk]:
        """The first stage alone, as a peek (a supervisor read, no side effect):
        the guest's walk of ``linear`` with its paging-structure entries at
        guest-physical addresses (read through the second stage), or None when
        paging is off; ``cr3`` walks another CR3's tables in the current paging
        mode (its PDPTEs read from its table with PAE paging).  Raises
        PageFault, NonCanonical, UnsupportedPaging or Stage2Fault."""
        return self._first_stage(linear, ACC_READ, False, True, cr3)[0]

    def _first_stage(self, linear: int, access: int, user: bool, peek: bool,
                     cr3: Optional[int] = None):
        """(the guest's Walk or None with paging off, the linear address as the
        mode uses it, (read, write, fetch) rights or None); raises the #PF."""
        p = self.probe
        cr0 = p.cr(0)
        if not cr0 & X86_CR0_PG:
            return None, linear & 0xFFFF_FFFF, None
        cr4 = p.cr(4)
        pdptes = None
        if p.hflags() & HF_LMA:
            if cr4 & X86_CR4_LA57:
                raise UnsupportedPaging("5-level paging (CR4.LA57) is not modelled")
            mode = PagingMode.LEVEL4
            top = linear >> 47
            if top and top != 0x1FFFF:
                raise NonCanonical(linear)
        else:
            linear &= 0xFFFF_FFFF
            if cr4 & X86_CR4_PAE:
                mode = PagingMode.PAE
                pdptes = self.core.pdpte_registers(peek=peek) if cr3 is None else \
                    self.core._read_pdptes(cr3, True)
            else:
                mode = PagingMode.BITS32
        efer = self.core.rdmsr_raw(MSR_EFER)
        nxe = bool(efer & EFER_NX)
        write = bool(access & ACC_WRITE)          # ACC_READ | ACC_WRITE: a read-modify-write
        fetch = access == ACC_FETCH
        # the #PF error code's access bits (paging.error_code, inlined: this runs on every fill)
        code = (PF_W if write else 0) | (PF_U if user else 0) | \
            (PF_I if fetch and nxe and mode is not PagingMode.BITS32 else 0)
        s2 = self.stage2.translate
        view = self.view
        size_limit = self.mem.size

        def read_entry(egpa: int, size: int):
            ehpa = s2(egpa, ACC_READ, linear, False, peek)[0]
            if ehpa + size > size_limit:
                return None                        # outside RAM: no entry there
            return (_U64 if size == 8 else _U32).unpack_from(view, ehpa)[0]

        w = walk(mode, linear, p.cr(3) if cr3 is None else cr3, read_entry, code=code,
                 pdptes=pdptes, pse=bool(cr4 & X86_CR4_PSE), nxe=nxe)
        return w, linear, check_rights(w, linear, code, write=write, user=user, fetch=fetch,
                                       wp=bool(cr0 & X86_CR0_WP), nxe=nxe)

    def _walk(self, linear: int, access: int, user: bool, peek: bool) -> tuple[int, int]:
        w, linear, allowed = self._first_stage(linear, access, user, peek)
        s2 = self.stage2.translate
        if w is None:
            return s2(linear, access, linear, True, peek)
        read_ok, write_ok, exec_ok = allowed
        entries = w.entries
        leaf = entries[-1][1]
        if not peek:
            # accessed flags on every entry used, dirty on the leaf for a write: a
            # locked read-modify-write of the entry, a data read and a data write for
            # the second stage (an EPT violation reports both, qualification bits 0
            # and 1, as kvm-unit-tests' ept_access_test_paddr_read_only_ad_disabled
            # expects on hardware)
            write = bool(access & ACC_WRITE)
            last = len(entries) - 1
            view = self.view
            for i, (egpa, e, size) in enumerate(entries):
                new = e | _PTE_A | (_PTE_D if write and i == last else 0)
                if new != e:
                    ehpa = s2(egpa, ACC_READ | ACC_WRITE, linear, False, False)[0]
                    (_U64 if size == 8 else _U32).pack_into(view, ehpa, new)
                    if i == last:
                        leaf = new
        hpa, rights = s2(w.pa, access, linear, True, peek)
        perms = 0
        if read_ok:
            perms |= ACC_READ
        if write_ok and leaf & _PTE_D:
            perms |= ACC_WRITE
        if exec_ok:
            perms |= ACC_FETCH
        return hpa, perms & rights

    # ------------------------------------------------------------------ the hook
    def _on_fill(self, uc, vaddr, uc_access, entry, data) -> bool:
        self.fills += 1
        access = _UC_ACCESS.get(uc_access, ACC_READ)
        p = self.probe
        user = (p.hflags() & HF_CPL_MASK) == 3
        # Unicorn also looks up pages for its own bookkeeping (measured: TB
        # invalidations, e.g. of the page before each exit address when a run
        # ends, and ctl_remove_cache) and a refusal there is not the guest's:
        # only an access made while the core runs, and for a fetch only one of
        # RIP's page or the next, may be refused.
        guest = self.core.in_run and (
            access != ACC_FETCH or ((vaddr - ((p.segment(1)[1] + p.eip()) & ~0xFFF)) & _U64_MASK) in (0, 0x1000))
        if not guest and vaddr in self._placeholders:
            return self._placeholder(vaddr, entry)     # (measured: asked again after every run)
        try:
            hpa, perms = self._walk(vaddr, access, user, not guest)
        except (PageFault, Stage2Fault, NonCanonical, UnsupportedPaging):
            return self._refuse(vaddr, access, user) if guest else self._placeholder(vaddr, entry)
        except Exception as e:              # a bug of ours: reported by the core
            if not guest:
                return self._placeholder(vaddr, entry)
            self._error = e
            return self._refuse(vaddr, access, user)
        if not perms & access:              # cannot happen after a successful walk
            return self._refuse(vaddr, access, user) if guest else self._placeholder(vaddr, entry)
        entry.paddr = hpa & ~0xFFF
        entry.perms = perms
        return True

    def _placeholder(self, page: int, entry) -> bool:
        """A bookkeeping lookup of a page the guest cannot reach: an entry to no
        memory (Unicorn's invalidation then finds nothing there), remembered so
        that a real fetch from it later (FETCH_UNMAPPED) flushes and walks."""
        self._placeholders.add(page)
        entry.paddr = PLACEHOLDER_PA
        entry.perms = ACC_FETCH
        return True

    def drop_placeholder(self, rip: int) -> bool:
        """A fetch near ``rip`` hit a placeholder entry: flush the TLB so that the
        next fill walks (True), or False if no placeholder is involved."""
        page = rip & ~0xFFF
        if page in self._placeholders or page + 0x1000 in self._placeholders:
            self._placeholders.clear()
            self.flush()
            return True
        return False

    def _refuse(self, page: int, access: int, user: bool) -> bool:
        self._refused = (page, access, user)
        if access != ACC_FETCH:
            # the counted run counted the instruction whose data access this is
            # (measured); a refused fetch is not counted (nor are Unicorn's own
            # probes, which are fetches)
            self.core._uncount += 1
        return False

    def refused(self) -> tuple[int, int, bool] | None:
        """After an emu_start that ended with UC_ERR_EXCEPTION: the refused access
        as (full linear address, ACC_* access, user) or None if no fill was
        refused; forgets it."""
        r, self._refused = self._refused, None
        if r is None:
            return None
        page, access, user = r
        full = ctypes.c_uint64.from_address(self._invalid_addr).value
        linear = full if full & ~0xFFF == page else page
        return linear, access, user

    def take_error(self) -> BaseException | None:
        """An exception our fill hook raised (a bug), once."""
        e, self._error = self._error, None
        return e


class SecondStage:
    """The second-stage half of a Core (a mixin, as PageWatching is): switching
    virtual-TLB mode on and off, the platform's own two-stage translations, and
    what the core does when the engine stops because the fill hook refused an
    access."""

    def set_second_stage(self, stage2) -> None:
        """Translate this core's accesses through the guest's page tables and then
        ``stage2`` (virtual-TLB mode, :mod:`devirt_emu.platform.tlb`), or with
        QEMU's own one-stage walker again when ``stage2`` is None.  Either way
        the engine's TLB is flushed."""
        if stage2 is None:
            if self.vtlb is not None:
                self.vtlb.disable()
            return
        if self.vtlb is None:
            self.vtlb = VirtualTlb(self)
        self.vtlb.enable(stage2)

    def flush_tlb(self) -> None:
        """Drop the engine's cached translations (virtual-TLB mode only: QEMU's
        own walker flushes itself as the architecture says)."""
        if self.vtlb is not None and self.vtlb.active:
            self.vtlb.flush()

    def _translate2(self, linear: int, access: int, user: bool, peek: bool) -> int:
        try:
            return self.vtlb.translate(linear, access, user=user, peek=peek)
        except Stage2Fault as s:
            if peek:
                raise PageFault(linear, 0) from None
            self._stage2_exit(s)            # now, while the event being delivered is known
            raise AccessAborted() from None
        except NonCanonical:
            if peek:
                raise PageFault(linear, 0) from None
            raise _Fault(13, 0) from None
        except UnsupportedPaging as e:
            if peek:
                raise
            raise GuestError(f"core {self.index}: {e}") from None

    def _stage2_exit(self, fault: Stage2Fault) -> None:
        """A second-stage fault: the VMX layer takes the VM exit."""
        if self.virt is None or not self.virt.on_stage2_fault(self, fault):
            raise GuestError(f"core {self.index}: second-stage fault outside VMX non-root "
                             f"operation: {fault.info}")

    def _tlb_refusal(self) -> None:
        """The engine stopped because our TLB-fill hook refused an access: walk it
        again with the full address and raise what it is (#PF, #GP, a VM exit)."""
        vt = self.vtlb
        bug = vt.take_error()
        if bug is not None:
            raise bug
        r = vt.refused()
        if r is None:
            raise GuestError(f"core {self.index}: the engine reported an unhandled CPU exception "
                             f"at RIP {self.rip():#x} with no refused translation")
        linear, access, user = r
        if access == ACC_FETCH and (linear ^ self.rip()) & ~0xFFF and self._straddle_fetch():
            return
        self._drop_straddle_exit()
        if access == ACC_READ and self._rmw_at_rip():
            access = ACC_READ | ACC_WRITE         # the refused read is the read of a write
        try:
            vt.translate(linear, access, user=user)
        except PageFault as pf:
            raise _Fault(14, pf.error_code, pf.linear) from None
        except NonCanonical:
            raise _Fault(13, 0) from None
        except UnsupportedPaging as e:
            raise GuestError(f"core {self.index}: {e}") from None
        except Stage2Fault as s:
            self._stage2_exit(s)
        # else the translation changed since the refusal (another core, the L0): retry

    def _bytes_at_rip(self) -> bytes | None:
        """Up to 15 bytes from RIP (to the page end when the next page cannot be
        read), None when none can be read."""
        rip = self.rip()
        for n in (15, PAGE_SIZE - (rip & 0xFFF)):
            try:
                return self.read_linear(rip, min(n, 15), peek=True)
            except (PageFault, UnsupportedPaging, GuestError):
                continue
        return None

    def instruction_length_at_rip(self) -> int | None:
        """Length of the instruction at RIP (None if it cannot be read or decoded)."""
        code = self._bytes_at_rip()
        return None if code is None else instruction_length(code, self.code_size())

    def memory_access_at_rip(self) -> tuple[int, str] | None:
        """The memory access of the instruction at RIP: (operand size, mnemonic),
        None if it cannot be read or decoded or has no memory operand."""
        code = self._bytes_at_rip()
        return None if code is None else memory_access(code, self.code_size())

    def _rmw_at_rip(self) -> bool:
        """Is the instruction at RIP a read-modify-write of memory?"""
        code = self._bytes_at_rip()
        return code is not None and read_modify_write(code, self.code_size())

    def _straddle_fetch(self) -> bool:
        """A refused fetch on the page after RIP's: QEMU failed to translate the
        whole block from RIP (measured), so the instructions before the one that
        straddles the page end have not run.  Stop the engine in front of that
        instruction (a temporary exit) and let the run go on: the fetch then
        faults with RIP at it.  False when RIP is already there."""
        rip = self.rip()
        end = (rip | 0xFFF) + 1
        try:
            code = self.read_linear(rip, end - rip, peek=True)
        except (PageFault, UnsupportedPaging, GuestError):
            return False
        at = straddling_instruction(code, rip, self.code_size())
        if at is None or at == rip:
            return False
        self._straddle_exit = at
        self._set_exits()
        self.uc.ctl_remove_cache(rip & ~0xFFF, end)
        return True

    def _after_task_switch_step(self, completed: bool) -> None:
        """The task switch of a far JMP/CALL or IRET was just stepped
        (``task_switcher.stepping_from``: its address and the old TR).  Measured on Unicorn
        2.1.4 (scratch engine, 32-bit far JMP to a TSS, identity fill hook): in
        virtual-TLB mode with paging on, the switch is done (old state saved, TR,
        CR3, registers, segments and EFLAGS of the new task loaded) except EIP,
        which is left at the instruction (the TLB fills of the switch, after the
        CR3 load flushed the TLB, restore it); with paging off or in the default
        TLB mode EIP is the new task's.  So the new task's EIP is put from its
        TSS when TR changed and EIP did not."""
        address, old_tr = self.task_switcher.stepping_from
        self.task_switcher.stepping_from = None
        vt = self.vtlb
        p = self.probe
        if not completed or vt is None or not vt.active or not p.cr(0) & X86_CR0_PG:
            return
        tr, base, _, flags = p.segment(7)
        if tr == old_tr or self.rip() != address:
            return
        if (flags >> 8) & 8:                           # 32-bit TSS: EIP at 20H
            eip = struct.unpack("<I", self.read_linear(base + 0x20, 4, peek=True))[0]
        else:                                          # 16-bit TSS: IP at 0EH
            eip = struct.unpack("<H", self.read_linear(base + 0x0E, 2, peek=True))[0]
        p.set_eip(eip)

    def _drop_straddle_exit(self) -> None:
        if self._straddle_exit is not None:
            self._straddle_exit = None
            self._set_exits()


class PaeRegisters:
    """The PDPTE registers of a Core (SDM "PDPTE Registers"), a mixin: the four
    PDPTEs PAE paging translates with, ``self.pdptes``, loaded

    * before a MOV to CR0, CR3 or CR4 runs that loads them (the core's hook and
      the VMX layer's MOV to CR0/CR4 call :meth:`load_pdptes_for_mov_cr`): a
      present PDPTE with a reserved bit set is #GP(0), and the instruction
      then has no effect;
    * at VM entry (the VMX layer calls :meth:`set_pdpte_registers`: from
      GUEST_PDPTR0-3 with EPT, from memory without);
    * at the first walk after CR3 changed behind the core's back (a task
      switch, which Unicorn performs): :meth:`pdpte_registers` reloads them
      from the new CR3 then, unchecked (a reserved bit then gives a #PF with
      RSVD at the walk, as QEMU's walker does);

    and used by the platform's walks (:func:`~devirt_emu.platform.paging.walk`
    in virtual-TLB mode, :meth:`translate` otherwise).  In virtual-TLB mode
    (EPT) the 32-byte table is read through the second stage as a read with
    no guest-linear address: an EPT violation there is a VM exit whose
    qualification has bit 7 clear (SDM "Exit Qualification for EPT
    Violations").  Measured on Unicorn 2.1.4 (scratch engine, 32-bit code):
    QEMU's own walker, which translates the guest's accesses when virtual-TLB
    mode is off, re-reads the PDPTEs from memory on every TLB miss (a PDPTE
    rewritten after MOV to CR3 was used after an INVLPG) and MOV to CR3 does
    not check them (no #GP for a reserved bit): only the platform's walks
    use the registers."""

    def pdpte_registers(self, *, peek: bool = False) -> tuple:
        """The PDPTE registers for the current CR3, reloaded from memory if CR3
        changed since they were loaded (with ``peek``, nothing is stored and
        nothing in memory changes).  May raise Stage2Fault in virtual-TLB mode."""
        cr3 = self.probe.cr(3)
        if self._pdptes_cr3 != cr3:
            pdptes = self._read_pdptes(cr3, peek)
            if peek:
                return pdptes
            self.pdptes, self._pdptes_cr3 = pdptes, cr3
        return self.pdptes

    def set_pdpte_registers(self, pdptes) -> None:
        """Load the registers (VM entry) for the current CR3; the TLB of
        virtual-TLB mode is flushed if they changed."""
        pdptes = tuple(pdptes)
        changed = pdptes != self.pdptes
        self.pdptes, self._pdptes_cr3 = pdptes, self.probe.cr(3)
        if changed:
            self.flush_tlb()

    def reset_pdpte_registers(self) -> None:
        """Power-up and INIT: zero, and reloaded at their first use."""
        self.pdptes, self._pdptes_cr3 = (0, 0, 0, 0), None

    def read_pdptes(self, cr3: int) -> tuple:
        """The four PDPTEs of the table at CR3[31:5], read as a PDPTE load does
        (through the second stage when one is active); no check."""
        return self._read_pdptes(cr3, False)

    def load_pdptes_for_mov_cr(self, cr: int, value: int) -> None:
        """MOV of ``value`` to CR``cr`` (0, 3 or 4) is about to run: if it loads the
        PDPTE registers (:func:`~devirt_emu.platform.paging.pdptes_reload`), load
        them, or raise _Fault(13, 0) when a present one sets a reserved bit
        (nothing changes), or AccessAborted when reading them was a VM exit."""
        p = self.probe
        if not p.hflags() & HF_LMA:
            value &= 0xFFFF_FFFF
        cr0, cr4 = p.cr(0), p.cr(4)
        new_cr0 = value if cr == 0 else cr0
        new_cr4 = value if cr == 4 else cr4
        if not pdptes_reload(cr, cr0, cr4, new_cr0, new_cr4, self.rdmsr_raw(MSR_EFER)):
            return
        cr3 = value if cr == 3 else p.cr(3)
        try:
            pdptes = self._read_pdptes(cr3, False)
        except Stage2Fault as s:
            self._stage2_exit(s)
            raise AccessAborted() from None
        if any(pdpte_reserved(e) for e in pdptes):
            raise _Fault(13, 0)
        self.pdptes, self._pdptes_cr3 = pdptes, cr3
        self.flush_tlb()

    def _read_pdptes(self, cr3: int, peek: bool) -> tuple:
        pa = pdpt_address(cr3)
        vt = self.vtlb
        if vt is not None and vt.active:
            pa = vt.stage2.translate(pa, ACC_READ, None, False, peek)[0]
        if not self.mem.contains(pa, 32):
            return (_U64_MASK,) * 4          # no memory there: all ones, as on a PC
        return _PDPT.unpack_from(self.mem.view, pa)
