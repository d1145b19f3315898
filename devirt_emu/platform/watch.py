"""Watched physical pages: every engine access to one is stopped before it takes
effect and handed to a watcher (the VMX layer's APIC-access page).

Also the pages a core executes from, whose stores keep the page scan right
(:class:`CodeWatching`).

A mixin of :class:`~devirt_emu.platform.core.Core`.  Measured on Unicorn 2.1.4:
a RAM page protected to no-access stops reads, writes and fetches before the
instruction has any effect, the protection hooks reporting the physical
address and the real size; a read that starts on the page below and crosses
into it is not stopped.  MMIO callbacks cannot do this (they split 8-byte
accesses and see a stale RIP), so a page outside RAM, the xAPIC page
included, is replaced by a no-access stand-in while it is watched.
"""
from __future__ import annotations

import ctypes
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Optional

from unicorn import (UC_HOOK_MEM_READ_PROT, UC_HOOK_MEM_WRITE, UC_PROT_NONE, UC_PROT_READ,
                     UC_PROT_WRITE, UcError)
from unicorn.unicorn_const import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH
from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

from ..cpu.decode import MAX_INSN_LEN
from ..cpu.scan import scan_starts, store_may_change_sites
from .errors import GuestError, _Fault
from .memory import LAPIC_MMIO_BASE, PAGE_SIZE

#: A store reported this many bytes before a page may end on it.  Measured on
#: Unicorn 2.1.4: write hooks see stores in pieces of at most 8 bytes (a 16-byte
#: SSE store is two, FXSAVE many), and a piece that crosses into the next page is
#: reported once, at its first address, to the hooks whose range holds that.
STORE_REACH = 7
#: The site of a hook whose instruction a store removed: it does nothing when it fires.
_DORMANT = (None, {})
#: The bytes before and after a store's rescan window store_may_change_sites reads.
_BEFORE = 4
_AFTER = 4
#: The value masks of the store sizes a write hook reports.
_MASKS = {n: (1 << (8 * n)) - 1 for n in range(1, 9)}


@dataclass(frozen=True)
class PageAccess:
    """An access to a watched page, stopped before it took effect.

    ``pa`` is the physical address of the first byte on the watched page,
    ``access`` "read", "write" or "fetch", ``size`` the access size in bytes
    as the engine (or the platform) made it, ``value`` the data of a write
    (little-endian; None otherwise)."""

    pa: int
    access: str
    size: int
    value: Optional[int] = None
    #: An access the platform makes itself, in Python, for the guest (see
    #: :meth:`PageWatching.watch_page`): event delivery, the memory side of
    #: INS/OUTS, descriptor and TSS accesses.  ``linear`` is its linear address.
    platform: bool = False
    #: The access is part of delivering an event through the IDT (platform only).
    during_delivery: bool = False
    linear: Optional[int] = None


@dataclass(frozen=True)
class WatchStep:
    """What :meth:`Core.step_watched` did.  ``retired``: instructions retired
    (0 or 1); ``denied``: an access the permissions of the step refused (the
    instruction then had no effect), else None; ``window``: the window's bytes
    after the instruction (None if ``denied``)."""

    retired: int
    denied: Optional[PageAccess]
    window: Optional[bytes]


class PageWatching:
    """The watched-pages half of a Core."""

    def watch_page(self, ppage: int, watcher: Callable[..., None]) -> None:
        """Stop every engine access to physical page ``ppage`` before it takes
        effect and call ``watcher(core, access)`` outside the engine, with RIP
        at the instruction (which has had no effect; a REP string instruction
        keeps the iterations it completed).  The watcher leaves it undone
        (RIP may be moved, e.g. by a VM exit) or runs it with
        :meth:`step_watched`.  A page outside RAM (the xAPIC MMIO page
        included) is replaced in this core by a no-access stand-in page until
        :meth:`unwatch_page`.  Called during a run (from a hook), the change
        takes effect when the engine has stopped, which it is asked to do
        before the next instruction.

        The platform's own accesses for the guest (``read_linear`` and
        ``write_linear``, not ``peek`` reads: event delivery, INS/OUTS, task
        switches) that touch the page call the watcher at once, inside the
        access, with ``access.platform`` True, ``during_delivery`` set while an
        event is being delivered, and the part of the access that lies on the
        page.  The watcher then returns None to let the access go to memory,
        the bytes a read returns instead, or (a write) True when it has taken
        the data itself; to stop the access it raises
        :class:`~devirt_emu.platform.tlb.AccessAborted` (after taking a VM exit,
        say), which ends the instruction or the delivery the access was part
        of."""
        if ppage < 0 or ppage & 0xFFF:
            raise ValueError(f"watch_page: {ppage:#x} is not a 4 KiB page address")
        if self._in_run:
            self._watch_queue.append((ppage, watcher))
            self.request_stop("check")
            return
        if ppage in self._watched:
            self._watched[ppage] = watcher
            return
        if self._read_prot_hook is None:
            self._read_prot_hook = self.uc.hook_add(UC_HOOK_MEM_READ_PROT, self._on_read_prot)
        if self.mem.contains(ppage, PAGE_SIZE):
            if ppage in self.exec_pages:
                self.disarm_page(ppage)
            self.uc.mem_protect(ppage, PAGE_SIZE, UC_PROT_NONE)
        else:
            stand_in = ctypes.create_string_buffer(PAGE_SIZE)
            try:
                if ppage == LAPIC_MMIO_BASE:
                    self.uc.mem_unmap(ppage, PAGE_SIZE)
                self.uc.mem_map_ptr(ppage, PAGE_SIZE, UC_PROT_NONE, ctypes.addressof(stand_in))
            except UcError as e:
                if ppage == LAPIC_MMIO_BASE:
                    self._map_lapic_mmio()
                raise GuestError(f"core {self.index}: cannot watch physical page {ppage:#x}: "
                                 f"{e}") from None
            self._watch_scratch[ppage] = stand_in
        self._watched[ppage] = watcher

    def unwatch_page(self, ppage: int) -> None:
        """Undo :meth:`watch_page` (nothing if ``ppage`` is not watched)."""
        if self._in_run:
            self._watch_queue.append((ppage, None))
            self.request_stop("check")
            return
        if self._watched.pop(ppage, None) is None:
            return
        stand_in = self._watch_scratch.pop(ppage, None)
        if stand_in is None:
            perms = UC_PROT_READ if self.machine.is_code_page(ppage) else UC_PROT_READ | UC_PROT_WRITE
            self.uc.mem_protect(ppage, PAGE_SIZE, perms)
        else:
            self.uc.mem_unmap(ppage, PAGE_SIZE)
            if ppage == LAPIC_MMIO_BASE:
                self._map_lapic_mmio()

    def watched_pages(self) -> frozenset[int]:
        """The physical pages watched in this core now."""
        return frozenset(self._watched)

    def watches(self, pa: int, n: int) -> bool:
        """Is one of the ``n`` bytes at physical ``pa`` on a watched page (within a page pair)?"""
        w = self._watched
        return bool(w) and (pa & ~0xFFF in w or (pa + n - 1) & ~0xFFF in w)

    def _apply_watch_queue(self) -> None:
        queue, self._watch_queue = self._watch_queue, []
        for ppage, watcher in queue:
            if watcher is None:
                self.unwatch_page(ppage)
            else:
                self.watch_page(ppage, watcher)

    def _map_lapic_mmio(self) -> None:
        self.uc.mmio_map(LAPIC_MMIO_BASE, PAGE_SIZE, self._mmio_read, None, self._mmio_write, None)

    def _call_watcher(self, hit: PageAccess) -> None:
        """An access to a watched page stopped the engine: hand it to the watcher,
        then end the run so that the scheduler sees what the watcher did."""
        watcher = self._watched.get(hit.pa & ~0xFFF)
        if watcher is None:
            return          # unwatched in the meantime: the instruction simply runs again
        try:
            watcher(self, hit)
        except _Fault as f:
            self.deliver_exception(f.vector, f.error_code, f.cr2)
        except GuestError as e:
            self.machine.guest_error(str(e))
            self._stop_reason = "exit"
        except Exception as e:          # a bug of ours: end the run with verdict error
            self.machine.internal_error(self, e)
            self._stop_reason = "exit"
        if self._stop_reason is None:
            self._stop_reason = "check"

    def _platform_watched(self, pa: int, linear: int, n: int, data: Optional[bytes]):
        """A platform access (``data`` None: a read of ``n`` bytes) at physical ``pa``
        on a watched page: what its watcher returns (see watch_page)."""
        watcher = self._watched.get(pa & ~0xFFF)
        if watcher is None:
            return None
        access = PageAccess(pa, "read" if data is None else "write", n,
                            None if data is None else int.from_bytes(data, "little"),
                            platform=True, during_delivery=self.delivering is not None,
                            linear=linear)
        got = watcher(self, access)
        if data is None and got is not None and len(got) != n:
            raise RuntimeError(f"the watcher of page {pa & ~0xFFF:#x} returned {len(got)} "
                               f"bytes for a read of {n}")
        return got

    def _drop_page_translations(self) -> None:
        """After a step closed its page again.  Measured on Unicorn 2.1.4 (a
        bare engine, paging off, the page on its own mapping or inside a larger
        one; and a guest under the L0 with EPT, virtual-TLB mode): after a step
        that opened the page read-only and read it, mem_protect(UC_PROT_NONE)
        leaves the read's TLB entry in place and a later read of the page is
        not stopped, unless something else flushed the TLB in between (a step
        that opened it read-write does: that changes the mapping's read-only
        state).  A TLB flush makes the next read stop."""
        vt = self.vtlb
        if vt is not None and vt.active:
            vt.flush()
        else:
            self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)

    def _page_view(self, ppage: int) -> memoryview:
        stand_in = self._watch_scratch.get(ppage)
        if stand_in is None:
            return self.mem.view[ppage:ppage + PAGE_SIZE]
        return memoryview(stand_in).cast("B")

    def step_watched(self, ppage: int, window: Optional[tuple[int, bytes]] = None, *,
                     writable: bool = False) -> WatchStep:
        """From a watcher: execute the instruction at RIP once with the watched
        page ``ppage`` readable (and writable if ``writable``), its bytes
        ``[offset, offset + len(data))`` replaced by ``window = (offset, data)``
        for the duration; then the page is no-access and its bytes are as
        before again.  An access the step's permissions refuse (a write when
        not ``writable``, a fetch) stops the instruction before it takes effect
        and is returned as ``denied``.  With the page open, further reads of
        it by the same instruction are not checked.  Exceptions the instruction
        raises are delivered as usual."""
        if ppage not in self._watched:
            raise ValueError(f"step_watched: page {ppage:#x} is not watched")
        if self._in_run:
            raise RuntimeError("step_watched is for watchers, which run outside the engine")
        view = self._page_view(ppage)
        offset, data = window if window is not None else (0, b"")
        if offset < 0 or offset + len(data) > PAGE_SIZE:
            raise ValueError(f"step_watched: window {offset:#x}+{len(data)} is outside the page")
        saved = bytes(view[offset:offset + len(data)])
        view[offset:offset + len(data)] = data
        self.uc.mem_protect(ppage, PAGE_SIZE, UC_PROT_READ | (UC_PROT_WRITE if writable else 0))
        address = self.rip()
        self._skip_once = address       # its code hook, if any, already ran before the stop
        self._watch_stepping = True
        self._watch_denied = None
        try:
            retired = self._step_one()
        finally:
            self._watch_stepping = False
            if self._skip_once == address:
                self._skip_once = -1
            after = bytes(view[offset:offset + len(data)])
            view[offset:offset + len(data)] = saved
            if ppage in self._watched:
                self.uc.mem_protect(ppage, PAGE_SIZE, UC_PROT_NONE)
                self._drop_page_translations()
        denied, self._watch_denied = self._watch_denied, None
        return WatchStep(retired, denied, None if denied is not None else after)


@dataclass
class CodeScan:
    """One scan of an executable page, kept while the page is executable in a
    core: the linear page it was scanned at, its code sizes, the 15 bytes of
    the next linear page it decoded across, and its sensitive sites
    (page offset -> {code size: Insn}; ``offsets`` sorted)."""

    ppage: int
    lpage: int
    modes: tuple
    tail: bytes
    sites: dict
    offsets: list


class CodeWatching:
    """The stores-into-code half of a Core.

    A page a core executes from is writable in that core's engine, with a
    write hook over it (and over the 7 bytes before it, where a store that ends
    on it is reported: see STORE_REACH).  Unicorn retranslates the code a
    store changes by itself, as the processor does (SDM Vol. 3A "Self-Modifying
    Code"): the store lands and the next fetch sees the new bytes, also when the
    store is into the storing instruction or the next one.  The hook keeps the
    page scan right without stopping the engine: nothing when the stored bytes
    equal the old; else, unless :func:`~devirt_emu.cpu.scan.store_may_change_sites`
    rules it out, a rescan of the starts the store can change (the 14 bytes
    before it and its own), and when their sensitive instructions changed, new
    hooks (a hook whose instruction went stays, dormant: see :meth:`_resite`).
    Measured on Unicorn 2.1.4, two things need more: a store into the
    translation block it runs in is undone and run again alone, and counted
    twice (the hook takes the second count off, and the core runs such an
    instruction alone when its run ended between the two); an unaligned store
    into a page with translated code, once it hits the running block, leaves
    every later store of the run unreported, so the run ends after it.
    Other cores executing the page drop their translations of it before they
    next run (and rescan it, if its sites changed); in the other cores a code
    page stays write-protected, and a store by one of them invalidates it
    everywhere (the slow path).
    """

    def _watch_code(self, ppage: int, lpage: int, modes: tuple, tail: bytes,
                    sites: dict) -> None:
        """Keep the scan of ``ppage`` (at linear ``lpage``; ``sites``: linear
        address -> {code size: Insn}) and hook the stores into it."""
        by_offset = {addr - lpage: by_mode for addr, by_mode in sites.items()}
        scan = CodeScan(ppage, lpage, modes, bytes(tail), by_offset, sorted(by_offset))
        scans = self._code_scans.get(ppage)
        if scans is None:
            if self._peers is None:
                self._peers = tuple(c for c in self.machine.cores if c is not self)
            self._code_scans[ppage] = [scan]
            h = uc_hook_h()
            begin = max(ppage - STORE_REACH, 0)
            status = uclib.uc_hook_add(self.uc._uch, ctypes.byref(h), UC_HOOK_MEM_WRITE,
                                       self._code_write_cb, ctypes.c_void_p(ppage),
                                       ctypes.c_uint64(begin),
                                       ctypes.c_uint64(ppage + PAGE_SIZE - 1))
            if status:
                raise UcError(status)
            self._code_write_hooks[ppage] = h.value
        else:
            scans.append(scan)
        self._code_by_lpage[lpage] = scan

    def _unwatch_code(self, ppage: int) -> None:
        for scan in self._code_scans.pop(ppage, ()):
            if self._code_by_lpage.get(scan.lpage) is scan:
                del self._code_by_lpage[scan.lpage]
        h = self._code_write_hooks.pop(ppage, None)
        if h is not None:
            status = uclib.uc_hook_del(self.uc._uch, uc_hook_h(h))
            if status:
                raise UcError(status)
        self._code_stale.discard(ppage)

    def _on_code_write_raw(self, handle, access, address, size, value, ppage):
        # called by Unicorn (ctypes) before a store of ``size`` bytes at physical
        # ``address`` lands; nothing may escape from here
        try:
            lo = address - ppage
            if lo + size <= 0:
                return              # a store before the page that does not reach it
            if self._counted:
                # measured: a store into the translation block it runs in makes
                # Unicorn undo the instruction before the store lands and run it
                # again alone, and count it again; so the first store of an
                # instruction, seen again one count later at the same EIP, is that
                count = self._counter()
                if count != self._last_store_count:
                    key = (self._eip(), address, size, value)
                    if count == self._last_store_count + 1 and key == self._last_store:
                        self._uncount += 1
                        key = None
                    self._last_store, self._last_store_count = key, count
            if address & (size - 1) and not self._store_alone:
                # measured: Unicorn makes an unaligned store into a page with
                # translated code out of byte stores, and when one of them hits the
                # running translation block it calls no write hook again until the
                # run ends: end the run after this instruction (see Core._engine_run)
                self.request_stop("store")
            mask = _MASKS.get(size)
            if mask is None:
                # wider than any store measured: rescan the whole page after the run
                self._code_rescan.add(ppage)
                self.request_stop("store")
                return
            data = (value & mask).to_bytes(size, "little")
            hi = lo + size
            if lo < 0:
                data, lo = data[-lo:], 0
            elif hi > PAGE_SIZE:
                data, hi = data[:PAGE_SIZE - lo], PAGE_SIZE
            if self._ram[ppage + lo:ppage + hi] != data:
                self._code_stored(ppage, lo, hi, data)
        except BaseException as e:       # a bug of ours: end the run with verdict error
            self.machine.internal_error(self, e)
            self.request_stop("exit")

    def _code_stored(self, ppage: int, lo: int, hi: int, data: bytes) -> None:
        """``data`` is about to replace bytes ``[lo, hi)`` of executable page ``ppage``."""
        changed = False
        for scan in self._code_scans[ppage]:
            if self._rescan_window(scan, lo, hi, data):
                changed = True
            if lo < MAX_INSN_LEN and self._code_by_lpage:
                # the scan of the linear page before decoded across into these bytes
                prev = self._code_by_lpage.get(scan.lpage - PAGE_SIZE)
                if prev is not None:
                    n = min(hi, MAX_INSN_LEN) - lo
                    if self._rescan_window(prev, PAGE_SIZE + lo, PAGE_SIZE + lo + n, data[:n]):
                        changed = True
        for core in self._peers:
            if ppage in core.exec_pages:
                core._code_stale.add(ppage)          # it translated the old bytes
        if changed:
            self.machine.forget_scans(ppage)

    def _rescan_window(self, scan: CodeScan, lo: int, hi: int, data: bytes) -> bool:
        """Rescan the starts of ``scan`` that ``data`` at ``[lo, hi)`` can change
        (offsets past the page are in its tail); re-hook them if their sensitive
        instructions differ.  Returns whether they did."""
        first = lo - (MAX_INSN_LEN - 1) if lo > MAX_INSN_LEN - 1 else 0
        end = hi + MAX_INSN_LEN - 1
        ppage = scan.ppage
        offsets = scan.offsets
        i = bisect_left(offsets, first)
        j = bisect_left(offsets, hi, i)
        if i == j and lo >= _BEFORE and end + _AFTER <= PAGE_SIZE:
            # no sensitive instruction starts near the store: most stores cannot
            # make one start there (see store_may_change_sites)
            view = self._ram
            code = b"".join((view[ppage + lo - _BEFORE:ppage + lo], data,
                             view[ppage + hi:ppage + end + _AFTER]))
            n = _BEFORE + hi - lo
            for m in scan.modes:
                if store_may_change_sites(code, _BEFORE, n, m):
                    break
            else:
                return False
        if end <= PAGE_SIZE:
            buf = bytearray(self.mem.view[ppage + first:ppage + end])
        else:
            buf = bytearray(self.mem.view[ppage + first:ppage + PAGE_SIZE])
            buf += scan.tail[max(first - PAGE_SIZE, 0):end - PAGE_SIZE]
        buf[lo - first:hi - first] = data
        if hi > PAGE_SIZE:
            t = bytearray(scan.tail)
            t[max(lo - PAGE_SIZE, 0):hi - PAGE_SIZE] = data[max(PAGE_SIZE - lo, 0):]
            scan.tail = bytes(t)
        stop = hi if hi < PAGE_SIZE else PAGE_SIZE
        if first >= stop:
            return False
        buf = bytes(buf)
        j = bisect_left(offsets, stop, i)
        modes = scan.modes
        if len(modes) == 1:
            found = scan_starts(buf, 0, stop - first, modes[0])
            if not found and i == j:
                return False
            m = modes[0]
            new = {first + off: {m: insn} for off, insn in found.items()}
        else:
            new = {}
            for m in modes:
                for off, insn in scan_starts(buf, 0, stop - first, m).items():
                    new.setdefault(first + off, {})[m] = insn
            if not new and i == j:
                return False
        sites = scan.sites
        old = {off: sites[off] for off in offsets[i:j]}
        if new == old:
            return False
        self._resite(scan, old, new, i, j)
        return True

    def _resite(self, scan: CodeScan, old: dict, new: dict, i: int, j: int) -> None:
        """Replace the sites ``old`` (offset -> {mode: Insn}, the ``offsets[i:j]``
        of ``scan``) by ``new``, from inside the engine.  Measured on Unicorn
        2.1.4: adding or deleting a code hook during a run costs about 50 us (the
        engine drops its translations), so a site that goes keeps its hook,
        dormant (it does nothing when it fires), and a site that comes back at
        that address wakes it; only a site at an address never hooked adds a
        hook (which fires in the code the store made Unicorn retranslate)."""
        lpage, ppage = scan.lpage, scan.ppage
        handles = self.hooks[ppage]
        sites = scan.sites
        site_of = self._site_of
        gone_exits = []
        for off in old:
            if off in new:
                continue
            del sites[off]
            addr = lpage + off
            entry = handles.get(addr)
            if entry is None:
                continue
            if entry[0] is None:            # an exit site (see _hooks_to_exits)
                del handles[addr]
                if self._exit_sites.pop(addr, None) is not None:
                    gone_exits.append(addr)
            else:
                site_of[addr] = _DORMANT
                handles[addr] = (entry[0], None)
        if gone_exits:
            exits = self._exit_pages.get(ppage, [])
            self._exit_pages[ppage] = [a for a in exits if a not in gone_exits]
            self._set_exits()
        single = len(scan.modes) == 1
        for off, by_mode in new.items():
            if old.get(off) == by_mode:
                continue
            addr = lpage + off
            insn = by_mode[64] if single else None
            entry = handles.get(addr)
            if entry is not None and entry[0] is None:      # an exit site changed
                self._exit_sites.pop(addr, None)
                exits = self._exit_pages.get(ppage, [])
                self._exit_pages[ppage] = [a for a in exits if a != addr]
                self._set_exits()
                entry = None
            if entry is None:
                handles[addr] = (self._add_site_hook(addr, insn, by_mode), insn)
            else:
                site_of[addr] = (insn, by_mode)
                handles[addr] = (entry[0], insn)
            sites[off] = by_mode
        scan.offsets[i:j] = sorted(new)
        cores = self.machine.cores
        if len(cores) > 1:
            for core in cores:
                if core is not self and ppage in core.exec_pages:
                    core._code_rescan.add(ppage)

    def _drop_stale_code(self) -> None:
        """Before a run: forget what other cores' stores made stale here."""
        for ppage in list(self._code_rescan):
            self.disarm_page(ppage)
            self.protect_page(ppage, writable=False)
        self._code_rescan.clear()
        for ppage in list(self._code_stale):
            for scan in self._code_scans.get(ppage, ()):
                self.uc.ctl_remove_cache(scan.lpage, scan.lpage + PAGE_SIZE)
        self._code_stale.clear()
