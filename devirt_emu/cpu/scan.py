"""Find every sensitive instruction that can start in a code page.

The platform maps code pages without execute permission; on the first fetch
from a page it calls :func:`scan_page` and hooks exactly the addresses
returned.  The scan is a *superset* disassembly: every byte offset of the
page is a possible instruction start (data mixed with code, jumps into the
middle of what a linear sweep would see, the tail of an instruction crossing
in from the previous page), so the result is exactly::

    {base + off: decode_at(code[off:], base + off, mode)
     for off in range(page length) if that decode is not None}

computed without decoding all 4096 offsets:

1. one compiled regular expression per code size, generated from the rows of
   the table that exist in it, finds every position where such an opcode
   (with its ModRM byte, when the row constrains it) occurs; a zero-width
   lookahead makes overlapping occurrences visible (64-bit pages thus never
   try the legacy-only far JMP/CALL opcodes EA, 9A and FF /3, /5);
2. an instruction of the table that starts at ``s`` has its opcode at ``p``
   with only prefix bytes (legacy, and REX in 64-bit mode) between, at most
   14 of them; so the starts to try for an opcode at ``p`` are ``p`` and each
   earlier offset reachable through prefix bytes;
3. each such start is decoded with :func:`~devirt_emu.cpu.decode.decode_offset`,
   the same function :func:`~devirt_emu.cpu.decode.decode_at` uses.
"""
from __future__ import annotations

import re
from collections import defaultdict

from devirt_emu.cpu.decode import LEGACY_PREFIXES, MAX_INSN_LEN, MODES, check_mode, decode_offset
from devirt_emu.cpu.insn_table import TABLE, modrm_bytes
from devirt_emu.events import Insn

PAGE_SIZE = 4096


def _char_class(values) -> str:
    """A regex character class (as ``\\xNN`` escapes, with ranges) of byte values."""
    vals = sorted(set(values))
    parts, i = [], 0
    while i < len(vals):
        k = i
        while k + 1 < len(vals) and vals[k + 1] == vals[k] + 1:
            k += 1
        parts.append(f"\\x{vals[i]:02x}" + (f"-\\x{vals[k]:02x}" if k > i else ""))
        i = k + 1
    return "[" + "".join(parts) + "]"


def _alternation(seqs) -> str:
    """A regex for a set of byte sequences, each a tuple of byte-value sets."""
    ends: set[int] = set()
    longer: dict[frozenset, set] = defaultdict(set)
    for seq in seqs:
        if len(seq) == 1:
            ends |= seq[0]
        else:
            longer[seq[0]].add(seq[1:])
    parts = [_char_class(ends)] if ends else []
    for first, rests in sorted(longer.items(), key=lambda kv: sorted(kv[0])):
        parts.append(_char_class(first) + "(?:" + _alternation(rests) + ")")
    return "|".join(parts)


def _opcode_regex(mode: int) -> re.Pattern:
    """A bytes regex matching (zero-width) at each occurrence of the opcode of
    a table row that exists in code size ``mode``.

    Each row contributes its opcode bytes, followed by the set of ModRM bytes
    its reg/mod constraints allow when it has a ModRM byte.
    """
    seqs = set()
    for row in TABLE:
        if mode not in row.modes:
            continue
        seq = tuple(frozenset({b}) for b in row.opcode)
        if row.modrm:
            seq += (modrm_bytes(row),)
        seqs.add(seq)
    return re.compile(("(?=" + _alternation(seqs) + ")").encode("ascii"), re.DOTALL)


#: Per code size, the regex of :func:`_opcode_regex`.
OPCODE_RES: dict[int, re.Pattern] = {mode: _opcode_regex(mode) for mode in MODES}

#: Per mode, the one-byte instructions of the table (INT3, HLT, CLI, IN AL,DX...):
#: byte value -> its Insn, so that an unprefixed one costs one dict lookup.
_ONE_BYTE: dict[int, dict[int, Insn]] = {
    mode: {b: insn for b in range(256)
           if (insn := decode_offset(bytes([b]), 0, mode)) is not None}
    for mode in MODES
}

#: Per mode and first opcode byte, the prefix classes ("", "66", "F3", "F2") any
#: row of the table starting with that byte allows (empty: no row).
_PREFIX_CLASSES: dict[int, tuple] = {
    mode: tuple(frozenset().union(*(r.pfx for r in TABLE
                                    if r.opcode[0] == b and mode in r.modes))
                for b in range(256))
    for mode in MODES
}

_PREFIX_BYTES_LEGACY = frozenset(LEGACY_PREFIXES)
_PREFIX_BYTES_64 = _PREFIX_BYTES_LEGACY | frozenset(range(0x40, 0x50))


def scan_page(code: bytes, base: int, mode: int) -> dict[int, Insn]:
    """Address -> Insn for every offset of the page where a sensitive instruction decodes.

    ``code`` is the page (up to 4096 bytes) followed by up to 15 bytes of the
    next page, so that instructions starting on this page and ending on the
    next one are decoded; starts are reported only for the first
    ``min(len(code), 4096)`` offsets.  ``base`` is the page's virtual address
    (4 KiB aligned); ``mode`` the code size (16, 32 or 64).  Raises
    ValueError on a bad mode, an unaligned base or ``code`` longer than a
    page plus 15 bytes.
    """
    check_mode(mode)
    if not isinstance(base, int) or base < 0 or base % PAGE_SIZE:
        raise ValueError(f"base must be a 4 KiB-aligned address, not {base!r}")
    if len(code) > PAGE_SIZE + MAX_INSN_LEN:
        raise ValueError(f"code is {len(code)} bytes: at most a page plus {MAX_INSN_LEN}")
    found = scan_starts(bytes(code), 0, min(len(code), PAGE_SIZE), mode)
    return {base + off: insn for off, insn in found.items()}


def scan_starts(code: bytes, first: int, stop: int, mode: int) -> dict[int, Insn]:
    """Offset -> Insn for every offset in ``[first, stop)`` of ``code`` where a
    sensitive instruction decodes (the same decode as :func:`scan_page`), the
    bytes from ``stop`` on serving only to complete instructions that start
    before it.  Offsets before ``first`` are never decoded, so ``code`` may be
    any window of a page: a store into code rescans only the starts whose
    bytes it changed.  ``mode`` must be valid (see :func:`check_mode`)."""
    prefixes = _PREFIX_BYTES_64 if mode == 64 else _PREFIX_BYTES_LEGACY
    one_byte = _ONE_BYTE[mode]
    classes = _PREFIX_CLASSES[mode]
    found: dict[int, Insn] = {}
    # an instruction starting before ``stop`` has its opcode within 14 bytes of its
    # start (no endpos: the lookahead must see the bytes after the opcode)
    last = stop + MAX_INSN_LEN - 1
    for m in OPCODE_RES[mode].finditer(code, first):
        p = m.start()
        if p >= last:
            break
        s = p
        low = max(first, p - (MAX_INSN_LEN - 1))
        # the prefix class of a start (as decode_offset has it: the F2/F3 nearest the
        # opcode, else 66, else none); a start whose class no row of the opcode
        # allows (90 is PAUSE only after F3) is not decoded
        allowed = classes[code[p]]
        rep, p66 = 0, False
        while True:
            if s < stop and (("F3" if rep == 0xF3 else "F2") if rep else
                             ("66" if p66 else "")) in allowed:
                insn = one_byte.get(code[p]) if s == p else None
                if insn is None:
                    insn = decode_offset(code, s, mode)
                if insn is not None:
                    found[s] = insn
            if s <= low or code[s - 1] not in prefixes:
                break
            s -= 1
            b = code[s]
            if b == 0x66:
                p66 = True
            elif (b == 0xF2 or b == 0xF3) and not rep:
                rep = b
    return found



def store_may_change_sites(code: bytes, lo: int, hi: int, mode: int) -> bool:
    """Can the new bytes ``code[lo:hi]`` change a scan's sensitive starts, given
    that none starts within the 14 bytes before them or among them?  ``code``
    holds the bytes as they are after the store, from at least 4 before ``lo``
    (_LONGEST_PATTERN - 1) to at least 18 after ``hi`` (MAX_INSN_LEN - 1 and a
    pattern).

    A new start would need an opcode pattern (the opcode bytes and the ModRM
    byte the table constrains, or the SIB byte after it, which can change the
    length) that overlaps the new bytes, or new prefix bytes in front of a
    pattern after them: a start whose prefix, pattern and SIB bytes are all
    unchanged decodes as before (its displacement and immediate bytes give
    neither its length nor whether it decodes), and before, it decoded as
    nothing sensitive.  False means the starts cannot change; True that they may."""
    pattern = OPCODE_RES[mode]
    reach = OPCODE_REACH[mode]
    # (the lookahead sees up to endpos: every pattern starting before hi fits)
    for m in pattern.finditer(code, lo - (_LONGEST_PATTERN - 1), hi + _LONGEST_PATTERN - 1):
        p = m.start()
        if p >= hi:
            break
        if p >= lo or p + reach[code[p]] > lo:
            return True
    prefixes = _PREFIX_BYTES_64 if mode == 64 else _PREFIX_BYTES_LEGACY
    if code[hi - 1] not in prefixes:
        return False
    q = hi
    while q < len(code) and code[q] in prefixes:
        q += 1
    return pattern.match(code, q) is not None


#: Per code size and first opcode byte: how many bytes from it a pattern of the
#: table can depend on (its opcode bytes, and ModRM plus SIB when it has ModRM).
OPCODE_REACH = {mode: bytes(max((len(row.opcode) + 2 * row.modrm for row in TABLE
                                 if mode in row.modes and row.opcode[0] == b), default=0)
                            for b in range(256))
                for mode in MODES}
_LONGEST_PATTERN = max(max(reach) for reach in OPCODE_REACH.values())
