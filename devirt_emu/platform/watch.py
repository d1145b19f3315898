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
from ..cpu.scan import scan_starts
from .errors import GuestError, _Fault
from .memory import LAPIC_MMIO_BASE, PAGE_SIZE

#: A store reported this many bytes before a page may end on it.  Measured on
#: Unicorn 2.1.4: write hooks see stores in pieces of at most 8 bytes (a 16-byte
#: SSE store is two, FXSAVE many), and a piece that crosses into the next page is
#: reported once, at its first address, to the hooks whose range holds that.
STORE_REACH = 7


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
    page scan right: it rescans only the starts a store can change (the 14
    bytes before it and its own), and only when the stored bytes differ from
    the old; when the sensitive instructions there changed it re-hooks them at
    once, inside the engine, which goes on running.  Other cores executing the
    page drop their translations of it before they next run (and rescan it, if
    its sites changed); in the other cores a code page stays write-protected,
    and a store by one of them invalidates it everywhere (the slow path).
    """

    def _watch_code(self, ppage: int, lpage: int, modes: tuple, tail: bytes,
                    sites: dict) -> None:
        """Keep the scan of ``ppage`` (at linear ``lpage``; ``sites``: linear
        address -> {code size: Insn}) and hook the stores into it."""
        by_offset = {addr - lpage: by_mode for addr, by_mode in sites.items()}
        scan = CodeScan(ppage, lpage, modes, bytes(tail), by_offset, sorted(by_offset))
        scans = self._code_scans.get(ppage)
        if scans is None:
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
            hi = lo + size
            if hi <= 0:
                return              # a store before the page that does not reach it
            if self._counted:
                # measured: a store into the translation block it runs in makes
                # Unicorn undo the instruction before the store lands and run it
                # again alone, and count it again; so the first store of an
                # instruction, seen again one count later at the same EIP, is that
                count = self.probe.executed()
                if count != self._last_store_count:
                    key = (self.probe.eip(), address, size, value)
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
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            if lo < 0:
                data, lo = data[-lo:], 0
            if hi > PAGE_SIZE:
                data, hi = data[:PAGE_SIZE - lo], PAGE_SIZE
            if self.mem.view[ppage + lo:ppage + hi] == data:
                return              # the same bytes: nothing to rescan
            self._code_stored(ppage, lo, hi, data)
        except BaseException as e:       # a bug of ours: end the run with verdict error
            self.machine.internal_error(self, e)
            self.request_stop("exit")

    def _code_stored(self, ppage: int, lo: int, hi: int, data: bytes) -> None:
        """``data`` is about to replace bytes ``[lo, hi)`` of executable page ``ppage``."""
        changed = False
        for scan in self._code_scans.get(ppage, ()):
            changed |= self._rescan_window(scan, lo, hi, data)
            if lo < MAX_INSN_LEN:
                # the scan of the linear page before decoded across into these bytes
                prev = self._code_by_lpage.get(scan.lpage - PAGE_SIZE)
                if prev is not None:
                    n = min(hi, MAX_INSN_LEN) - lo
                    changed |= self._rescan_window(prev, PAGE_SIZE + lo, PAGE_SIZE + lo + n,
                                                   data[:n])
        for core in self.machine.cores:
            if core is not self and ppage in core.exec_pages:
                core._code_stale.add(ppage)      # it translated the old bytes
        if changed:
            self.machine.forget_scans(ppage)

    def _rescan_window(self, scan: CodeScan, lo: int, hi: int, data: bytes) -> bool:
        """Rescan the starts of ``scan`` that ``data`` at ``[lo, hi)`` can change
        (offsets past the page are in its tail); re-hook them if their sensitive
        instructions differ.  Returns whether they did."""
        first = lo - (MAX_INSN_LEN - 1) if lo > MAX_INSN_LEN - 1 else 0
        end = hi + MAX_INSN_LEN - 1
        ppage = scan.ppage
        view = self.mem.view
        buf = bytearray(view[ppage + first:ppage + min(end, PAGE_SIZE)])
        if end > PAGE_SIZE:
            buf += scan.tail[max(first - PAGE_SIZE, 0):end - PAGE_SIZE]
        buf[lo - first:hi - first] = data
        if hi > PAGE_SIZE:
            t = bytearray(scan.tail)
            t[max(lo - PAGE_SIZE, 0):hi - PAGE_SIZE] = data[max(PAGE_SIZE - lo, 0):]
            scan.tail = bytes(t)
        stop = min(hi, PAGE_SIZE)
        if first >= stop:
            return False
        buf = bytes(buf)
        offsets = scan.offsets
        i, j = bisect_left(offsets, first), bisect_left(offsets, stop)
        new: dict[int, dict] = {}
        for m in scan.modes:
            for off, insn in scan_starts(buf, 0, stop - first, m).items():
                new.setdefault(first + off, {})[m] = insn
        if not new and i == j:
            return False
        old = {off: scan.sites[off] for off in offsets[i:j]}
        if new == old:
            return False
        self._resite(scan, old, new)
        return True

    def _resite(self, scan: CodeScan, old: dict, new: dict) -> None:
        """Replace the site hooks of ``old`` (offset -> {mode: Insn}) by hooks on
        ``new``, from inside the engine (measured on Unicorn 2.1.4: a hook deleted
        in a callback never fires again, one added fires in code translated
        after; the store itself makes Unicorn retranslate the code it changed)."""
        lpage = scan.lpage
        single = len(scan.modes) == 1
        gone = {lpage + off for off in old}
        kept = []
        exits_changed = False
        for h, addr, insn in self.hooks.get(scan.ppage, ()):
            if addr not in gone:
                kept.append((h, addr, insn))
            elif h is not None:
                self._del_site_hook(h, addr)
            elif self._exit_sites.pop(addr, None) is not None:
                exits_changed = True
        if exits_changed:
            self._exit_pages[scan.ppage] = [a for a in self._exit_pages.get(scan.ppage, ())
                                            if a not in gone]
            self._set_exits()
        for off, by_mode in new.items():
            insn = by_mode[64] if single else None
            kept.append((self._add_site_hook(lpage + off, insn, by_mode), lpage + off, insn))
        self.hooks[scan.ppage] = kept
        for off in old:
            del scan.sites[off]
        scan.sites.update(new)
        scan.offsets = sorted(scan.sites)
        for core in self.machine.cores:
            if core is not self and scan.ppage in core.exec_pages:
                core._code_rescan.add(scan.ppage)

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
