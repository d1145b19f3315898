"""Measured access to three pieces of Unicorn state its API does not expose.

Unicorn 2.1 has no API for (a) the number of instructions executed by a
counted ``emu_start``, (b) the error code of an exception it reports through
UC_HOOK_INTR, (c) resetting QEMU's double-fault tracking, which Unicorn
never clears (so after one hooked #PF the next #GP/#PF arrives as #DF; see
DESIGN.md), or (d) changing the engine's mode: an engine created in
UC_MODE_16 (needed to start at reset or SIPI) only lets Python read and write
16/32-bit registers, and ``emu_start`` subtracts CS*16 from its start
address, whatever the CPU's real mode; so once a core leaves real mode we
switch ``uc_struct.mode`` to UC_MODE_64 (measured: 64-bit registers, RIP and
``emu_start`` then behave as on an engine born in 64-bit mode).  All three live at fixed offsets of structures inside the
library.  Rather than hard-coding offsets, :func:`calibrate` finds them once
per process by experiment on scratch engines and verifies them:

* ``uc_struct.mode``: the field that holds 2, 4, 8 for engines made in
  UC_MODE_16, _32, _64.
* ``uc_struct.emu_counter``: the field that holds ``count + 1`` after a
  counted run that used up its budget, next to ``emu_count`` = ``count``.
* ``CPUX86State``: reached through a pointer in ``uc_struct`` (found by
  writing unique values into RAX/RCX and looking for them), then
  ``error_code`` (a #PF write to a non-present page gives 2, a bad selector
  load gives the selector) and ``old_exception`` (-1 at reset, the vector
  after a hooked fault).

If any experiment disagrees, :class:`CalibrationError` says so: a Unicorn
build this code was not measured on is an error, never a silent guess.
"""
from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from functools import partial

from unicorn import (UC_ARCH_X86, UC_HOOK_INTR, UC_MODE_16, UC_MODE_32,
                     UC_MODE_64, Uc, UcError)
from unicorn.x86_const import (UC_X86_REG_CR0, UC_X86_REG_CR3, UC_X86_REG_CR4,
                               UC_X86_REG_MSR, UC_X86_REG_RAX, UC_X86_REG_RCX,
                               UC_X86_REG_RIP, UC_X86_REG_RSP)
from unicorn.unicorn_py3.unicorn import uclib   # the C library (the binding's wrappers cost ~3 us a call)

from ..x86 import MSR_EFER


#: CPUX86State layout (QEMU 5, as in Unicorn 2.1), verified by calibrate():
#: regs[16], eip, eflags, cc_dst, cc_src, cc_src2, cc_op, df, hflags, hflags2,
#: segs[6] (SegmentCache: u32 selector, u64 base, u32 limit, u32 flags), ldt,
#: tr, gdt, idt, cr[5].
ENV_EIP = 128
ENV_EFLAGS = 136
ENV_HFLAGS = 176
ENV_SEGS = 184
SEG_STRIDE = 24
#: One SegmentCache: u32 selector, (pad), u64 base, u32 limit, u32 flags.
_SEG_CACHE = struct.Struct("<I4xQII")
ENV_LDT = ENV_SEGS + 6 * SEG_STRIDE
ENV_TR = ENV_LDT + SEG_STRIDE
ENV_GDT = ENV_TR + SEG_STRIDE
ENV_IDT = ENV_GDT + SEG_STRIDE
ENV_CR = ENV_IDT + SEG_STRIDE

# QEMU hflags bits the segment loads affect.
HF_CPL_MASK = 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
#: RFLAGS bits QEMU keeps lazily outside ``eflags`` while code runs: the six
#: arithmetic flags (CC_SRC/CC_OP) and DF (``df``).  The other bits of
#: ``eflags`` (TF, IF, IOPL, NT, RF, VM, AC, ...) are always current there.
LAZY_FLAGS = 0x8D5 | (1 << 10)
# SegmentCache.flags bits (the descriptor's high dword layout).
DESC_B = 1 << 22
DESC_L = 1 << 21


class CalibrationError(RuntimeError):
    """The Unicorn library does not behave as measured."""


@dataclass(frozen=True)
class Offsets:
    mode: int           # uc_struct.mode
    counter: int        # uc_struct.emu_counter
    cpu_ptr: int        # uc_struct field pointing at the X86CPU object
    env: int            # CPUX86State offset inside X86CPU
    error_code: int     # CPUX86State.error_code
    old_exception: int  # CPUX86State.old_exception


_offsets: Offsets | None = None


def _readable_ranges():
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            addr, perm = line.split()[:2]
            if perm[0] == "r":
                lo, hi = (int(x, 16) for x in addr.split("-"))
                out.append((lo, hi))
    return out


def _u64(addr: int) -> int:
    return ctypes.c_uint64.from_address(addr).value


def _i32(addr: int) -> int:
    return ctypes.c_int32.from_address(addr).value


# A straight-line program: "add rax, 1" repeated.
_ADD_LOOP = b"\x48\x83\xc0\x01" * 64


def _find_counter() -> int:
    found = None
    for n in (7, 23, 41):
        mu = Uc(UC_ARCH_X86, UC_MODE_64)
        mu.mem_map(0, 0x1000)
        mu.mem_write(0, _ADD_LOOP)
        mu.emu_start(0, len(_ADD_LOOP), count=n)
        base = mu._uch.value
        cands = {off for off in range(8, 0x2000, 8)
                 if _u64(base + off) == n + 1 and _u64(base + off + 8) == n}
        found = cands if found is None else found & cands
    if not found or len(found) != 1:
        raise CalibrationError(f"emu_counter not found uniquely in uc_struct: {found}")
    return found.pop()


def _find_mode() -> int:
    engines = {m: Uc(UC_ARCH_X86, m) for m in (UC_MODE_16, UC_MODE_32, UC_MODE_64)}
    blobs = {m: ctypes.string_at(u._uch.value, 0x1000) for m, u in engines.items()}
    cands = [o for o in range(0, 0x1000, 4)
             if all(struct.unpack_from("<i", b, o)[0] == m for m, b in blobs.items())]
    if len(cands) != 1:
        raise CalibrationError(f"uc_struct.mode not found uniquely: {cands}")
    return cands[0]


def _find_env():
    pat = struct.pack("<QQ", 0x1122334455667788, 0x99AABBCCDDEEFF00)
    common = None
    for _ in range(2):
        mu = Uc(UC_ARCH_X86, UC_MODE_64)
        mu.reg_write(UC_X86_REG_RAX, 0x1122334455667788)
        mu.reg_write(UC_X86_REG_RCX, 0x99AABBCCDDEEFF00)
        ranges = _readable_ranges()
        base = mu._uch.value
        pairs = set()
        for off in range(0, 0x1000, 8):
            p = _u64(base + off)
            for lo, hi in ranges:
                if lo <= p < hi:
                    j = ctypes.string_at(p, min(0x40000, hi - p)).find(pat)
                    if j >= 0:
                        pairs.add((off, j))
                    break
        common = pairs if common is None else common & pairs
    # keep the pairs that hold on fresh engines too, for several distinct values
    for off, j in sorted(common):
        if all(_env_pair_holds(off, j, v) for v in (0x0123456789ABCDEF, 0x7EDCBA9876543210,
                                                    0x5555AAAA3333CCCC)):
            return off, j
    raise CalibrationError("CPUX86State not found through uc_struct")


def _env_pair_holds(cpu_ptr: int, env_off: int, value: int) -> bool:
    mu = Uc(UC_ARCH_X86, UC_MODE_64)
    mu.reg_write(UC_X86_REG_RAX, value)          # (the engine sets its CPU up lazily)
    mu.reg_write(UC_X86_REG_RCX, value ^ 0xFFFF)
    p = _u64(mu._uch.value + cpu_ptr)
    if not any(lo <= p + env_off < hi - 16 for lo, hi in _readable_ranges()):
        return False
    return _u64(p + env_off) == value and _u64(p + env_off + 8) == value ^ 0xFFFF


def _paged_engine():
    """A 64-bit engine with 4-level paging mapping 0-2 MiB (one 2 MiB page)."""
    mu = Uc(UC_ARCH_X86, UC_MODE_64)
    mu.mem_map(0, 0x200000)
    mu.mem_write(0x1000, struct.pack("<Q", 0x2003))
    mu.mem_write(0x2000, struct.pack("<Q", 0x3003))
    mu.mem_write(0x3000, struct.pack("<Q", 0x83))
    mu.reg_write(UC_X86_REG_CR3, 0x1000)
    mu.reg_write(UC_X86_REG_CR4, mu.reg_read(UC_X86_REG_CR4) | 0x20)
    mu.reg_write(UC_X86_REG_MSR, (MSR_EFER, 0x500))
    mu.reg_write(UC_X86_REG_CR0, mu.reg_read(UC_X86_REG_CR0) | 0x80010001)
    mu.reg_write(UC_X86_REG_RSP, 0x8000)
    return mu


# mov qword ptr [0x40000008], 1  -> #PF, error code 2 (write, not present)
_PF_WRITE = bytes.fromhex("48c70425080000400100000000")
# mov ax, 0x1234 ; mov ds, ax     -> #GP, error code 0x1234 (selector)
_GP_SEL = bytes.fromhex("66b834128ed8")


def _fault_snapshot(cpu_ptr, env_off, code):
    mu = _paged_engine()
    env = _u64(mu._uch.value + cpu_ptr) + env_off
    mu.reg_write(UC_X86_REG_RAX, 0x5A5A5A5A12345678)
    if _u64(env) != 0x5A5A5A5A12345678:
        raise CalibrationError("CPUX86State pointer does not hold RAX")
    before = ctypes.string_at(env, 0x2000)
    snap = {}

    def hook(uc, intno, _):
        snap["intno"] = intno
        snap["after"] = ctypes.string_at(env, 0x2000)
        uc.emu_stop()

    mu.hook_add(UC_HOOK_INTR, hook)
    mu.mem_write(0x10000, code + b"\xf4")
    try:
        mu.emu_start(0x10000, 0x10000 + len(code) + 1)
    except UcError as e:
        raise CalibrationError(f"calibration fault did not reach the hook: {e}") from None
    return before, snap


def calibrate() -> Offsets:
    """Find (once per process) and return the offsets; raise CalibrationError."""
    global _offsets
    if _offsets is not None:
        return _offsets
    mode = _find_mode()
    counter = _find_counter()
    cpu_ptr, env_off = _find_env()
    b1, s1 = _fault_snapshot(cpu_ptr, env_off, _PF_WRITE)
    b2, s2 = _fault_snapshot(cpu_ptr, env_off, _GP_SEL)
    if s1.get("intno") != 14 or s2.get("intno") != 13:
        raise CalibrationError(f"calibration faults gave vectors {s1.get('intno')}, {s2.get('intno')}")
    err = [o for o in range(0, 0x2000, 4)
           if struct.unpack_from("<i", s1["after"], o)[0] == 2
           and struct.unpack_from("<i", s2["after"], o)[0] == 0x1234]
    old = [o for o in range(0, 0x2000, 4)
           if struct.unpack_from("<i", b1, o)[0] == -1
           and struct.unpack_from("<i", s1["after"], o)[0] == 14
           and struct.unpack_from("<i", s2["after"], o)[0] == 13]
    if len(err) != 1 or len(old) != 1:
        raise CalibrationError(f"error_code candidates {err}, old_exception candidates {old}")
    _verify_layout(cpu_ptr, env_off)
    _offsets = Offsets(mode, counter, cpu_ptr, env_off, err[0], old[0])
    return _offsets


def _verify_layout(cpu_ptr: int, env_off: int) -> None:
    from unicorn.x86_const import UC_X86_REG_GDTR, UC_X86_REG_IDTR, UC_X86_REG_TR
    mu = _paged_engine()
    env = _u64(mu._uch.value + cpu_ptr) + env_off
    mu.reg_write(UC_X86_REG_GDTR, (0, 0x12345000, 0x7F, 0))
    mu.reg_write(UC_X86_REG_IDTR, (0, 0x23456000, 0xFFF, 0))
    mu.reg_write(UC_X86_REG_TR, (0x28, 0x34567000, 0x67, 0x8B))
    from unicorn.x86_const import UC_X86_REG_EFLAGS, UC_X86_REG_R15, UC_X86_REG_RBX, UC_X86_REG_RIP
    mu.reg_write(UC_X86_REG_RBX, 0x3333333333333333)
    mu.reg_write(UC_X86_REG_R15, 0xFFFF15151515)
    mu.reg_write(UC_X86_REG_RIP, 0x4242424242)
    mu.reg_write(UC_X86_REG_EFLAGS, 0x63202)       # IOPL 3, IF, RF, VM: none of them lazy
    checks = (
        (3 * 8, 0x3333333333333333), (15 * 8, 0xFFFF15151515), (ENV_EIP, 0x4242424242),
        (ENV_EFLAGS, 0x63202),
        (ENV_GDT + 8, 0x12345000), (ENV_GDT + 16, 0x7F), (ENV_IDT + 8, 0x23456000),
        (ENV_TR, 0x28), (ENV_TR + 8, 0x34567000), (ENV_TR + 16, 0x67),
        (ENV_CR + 3 * 8, 0x1000),
    )
    for off, want in checks:
        got = _u64(env + off) if off % 8 == 0 else ctypes.c_uint32.from_address(env + off).value
        if off in (ENV_TR, ENV_TR + 16, ENV_GDT + 16):
            got &= 0xFFFFFFFF
        if got != want:
            raise CalibrationError(f"CPUX86State layout differs at +{off:#x}: {got:#x} != {want:#x}")


class EngineProbe:
    """Fast reads and writes of one engine's hidden state (ctypes, no copies)."""

    __slots__ = ("mode_addr", "counter_addr", "error_code_addr", "old_exception_addr", "env",
                 "_uch", "_pc_buf", "_pc_ref", "_rd_buf", "_rd_ref",
                 "_gprs", "_eip", "_eflags", "_hflags", "_crs", "_counter", "_segs", "_cs_base")

    def __init__(self, uc: Uc):
        off = calibrate()
        base = uc._uch.value
        env = _u64(base + off.cpu_ptr) + off.env
        self.env = env
        self.mode_addr = base + off.mode
        self.counter_addr = base + off.counter
        self.error_code_addr = env + off.error_code
        self.old_exception_addr = env + off.old_exception
        self._uch = uc._uch
        self._pc_buf = ctypes.c_uint64(0)
        self._pc_ref = ctypes.byref(self._pc_buf)
        self._rd_buf = ctypes.c_uint64(0)
        self._rd_ref = ctypes.byref(self._rd_buf)
        # typed views of the engine's state, made once (a from_address per access costs ~0.5 us)
        self._gprs = (ctypes.c_uint64 * 16).from_address(env)
        self._eip = ctypes.c_uint64.from_address(env + ENV_EIP)
        self._eflags = ctypes.c_uint64.from_address(env + ENV_EFLAGS)
        self._hflags = ctypes.c_uint32.from_address(env + ENV_HFLAGS)
        self._crs = (ctypes.c_uint64 * 5).from_address(env + ENV_CR)
        self._counter = ctypes.c_uint64.from_address(self.counter_addr)
        self._segs = (ctypes.c_uint8 * (8 * SEG_STRIDE)).from_address(env + ENV_SEGS)
        self._cs_base = ctypes.c_uint64.from_address(env + ENV_SEGS + SEG_STRIDE + 8)

    def set_real_mode_api(self, real: bool) -> None:
        """Make the engine's register API and start address real-mode (UC_MODE_16) or not."""
        ctypes.c_int32.from_address(self.mode_addr).value = UC_MODE_16 if real else UC_MODE_64

    def executed(self) -> int:
        """Instructions counted by the current/last counted emu_start (see module doc)."""
        return self._counter.value

    def error_code(self) -> int:
        return ctypes.c_int32.from_address(self.error_code_addr).value & 0xFFFFFFFF

    def clear_fault_tracking(self) -> None:
        """Tell QEMU no exception is in flight (we deliver exceptions ourselves)."""
        ctypes.c_int32.from_address(self.old_exception_addr).value = -1

    # ----- general registers (no Unicorn call: what uc_reg_read/write do) ---
    def gpr(self, n: int) -> int:
        """GPR ``n`` (SDM numbering: 0 = RAX ... 15 = R15)."""
        return self._gprs[n]

    def set_gpr(self, n: int, value: int) -> None:
        self._gprs[n] = value & 0xFFFF_FFFF_FFFF_FFFF

    def gpr_reader(self, n: int):
        """A callable returning GPR ``n`` (a C call: no Python frame)."""
        return partial(self._gprs.__getitem__, n)

    def cr_reader(self, n: int):
        """A callable returning CR``n`` (as gpr_reader)."""
        return partial(self._crs.__getitem__, n)

    def eip(self) -> int:
        return self._eip.value

    def reg(self, rid: int) -> int:
        """uc_reg_read of a register that fits 64 bits (a GPR or part of one, RIP,
        EFLAGS, CRn, DRn, a segment selector), without the binding's wrapper."""
        buf = self._rd_buf
        buf.value = 0              # narrower registers write only their own bytes
        if uclib.uc_reg_read(self._uch, rid, self._rd_ref):
            raise RuntimeError(f"uc_reg_read({rid}) failed")
        return buf.value

    def system_flags(self) -> int:
        """RFLAGS without its lazily kept bits (:data:`LAZY_FLAGS` read as 0):
        IF, IOPL, VM and the like straight from QEMU's ``eflags``, with no
        Unicorn call (``reg(UC_X86_REG_EFLAGS)`` assembles the whole value)."""
        return self._eflags.value & ~LAZY_FLAGS

    def set_eip(self, value: int) -> None:
        """RIP := value through uc_reg_write itself (not the Python binding's
        wrapper): Unicorn must see the write, since from inside a hook it is what
        makes the engine leave the current translation block and go on at RIP."""
        self._pc_buf.value = value & 0xFFFF_FFFF_FFFF_FFFF
        if uclib.uc_reg_write(self._uch, UC_X86_REG_RIP, self._pc_ref):
            raise RuntimeError("uc_reg_write(RIP) failed")

    # ----- control and descriptor-table registers (no Unicorn call) ---------
    def cr(self, n: int) -> int:
        return self._crs[n]

    def dtr(self, env_offset: int) -> tuple[int, int]:
        """(base, limit) of GDTR (ENV_GDT) or IDTR (ENV_IDT)."""
        a = self.env + env_offset
        return _u64(a + 8), ctypes.c_uint32.from_address(a + 16).value

    # ----- segment caches ---------------------------------------------------
    def segment(self, index: int) -> tuple[int, int, int, int]:
        """(selector, base, limit, flags) of segs[index] (ES, CS, SS, DS, FS, GS;
        6 = LDTR, 7 = TR, as the SDM's and QEMU's orders agree)."""
        return _SEG_CACHE.unpack_from(self._segs, SEG_STRIDE * index)

    def set_segment(self, index: int, selector: int, base: int, limit: int, flags: int) -> None:
        """Write a segment cache as a descriptor load would (call fix_hflags after)."""
        a = self.env + ENV_SEGS + SEG_STRIDE * index
        ctypes.c_uint32.from_address(a).value = selector
        ctypes.c_uint64.from_address(a + 8).value = base
        ctypes.c_uint32.from_address(a + 16).value = limit
        ctypes.c_uint32.from_address(a + 20).value = flags

    def cs_base(self) -> int:
        return self._cs_base.value

    def hflags(self) -> int:
        return self._hflags.value

    def cpl(self) -> int:
        return self._hflags.value & HF_CPL_MASK     # QEMU keeps the CPL there (0 in real mode)

    def fix_hflags(self) -> None:
        """Recompute the hflags bits that depend on CS, SS and the data segment
        bases (CPL, CS32, SS32, CS64, ADDSEG), after set_segment."""
        h = ctypes.c_uint32.from_address(self.env + ENV_HFLAGS)
        hf = h.value
        cs_flags = self.segment(1)[3]
        ss = self.segment(2)
        hf &= ~(HF_CPL_MASK | HF_CS32 | HF_SS32 | HF_CS64 | HF_ADDSEG)
        if hf & HF_PE:
            hf |= (ss[3] >> 13) & 3
        if hf & HF_LMA and cs_flags & DESC_L:
            hf |= HF_CS32 | HF_SS32 | HF_CS64
        else:
            if cs_flags & DESC_B:
                hf |= HF_CS32
            if ss[3] & DESC_B:
                hf |= HF_SS32
            if not hf & HF_PE or not hf & HF_CS32:
                hf |= HF_ADDSEG
            elif self.segment(0)[1] | self.segment(2)[1] | self.segment(3)[1]:
                hf |= HF_ADDSEG
        h.value = hf
