"""The assembler: Intel-syntax x86 through keystone, with what keystone lacks.

keystone 0.9.2 assembles one unit of Intel-syntax source (``.code16`` /
``.code32`` / ``.code64`` switch the mode inside it) but has no ``.include``,
no sections, no numeric local labels, no comments and no line numbers in its
errors.  This module adds them with a small preprocessor:

* comments: ``#`` and ``//`` to the end of the line (outside string and
  character literals); ``;`` separates statements on a line, as in GNU as on
  x86 (``xor eax, eax; cpuid`` is two statements);
* strict operands: an unbalanced ``[`` / ``]`` or ``(`` / ``)`` and a binary
  operator with nothing after it (``[rbx+``, ``rax, 5 *``) are errors, which
  keystone would otherwise repair silently (``mov rax, [rbx+`` as
  ``mov rax, [rbx]``, ``mov rax, [rbx`` as a load from address 0);
* ``.include "file"``: the path is tried relative to the including file,
  then in ``firmware/``;
* ``.text`` / ``.rodata`` / ``.data``: the unit is laid out as all the code,
  then all ``.rodata`` lines from a fresh 4 KiB page (label ``_rodata_start``),
  then all ``.data`` lines from a fresh page (label ``_data_start``).  So data
  the guest writes never shares a page with code (a store into a code page
  makes the platform check the page's sensitive instructions around it), and
  code pages hold no strings or tables that the page scan would decode as
  instructions.  Each line keeps the ``.codeNN`` mode that was in force
  where it was written; padding is zero bytes;
* ``.macro`` definitions are hoisted to the start of the unit (they emit
  nothing), so a macro may be used in ``.text`` and ``.data`` alike;
* numeric local labels as in GNU as: ``1:`` defines, ``1b`` / ``1f`` refer to
  the nearest definition backwards / forwards (not inside ``.macro`` bodies);
* a symbol table: every label's address, found by appending ``.quad label``
  for each label and reading the values back from the tail of the output
  (then dropping it).  Labels starting with ``.L``, numeric labels and labels
  inside ``.macro`` / ``.rept`` / ``.irp`` / ``.if`` blocks are not listed;
* two workarounds for silent keystone mis-encodings: constants defined once
  are substituted by their values (keystone garbles ``100 + K`` and
  ``[table + K]``), and ``fs:[N]`` / ``gs:[N]`` in 64-bit code are spelled
  so that keystone emits the absolute form (it emits a wrong RIP-relative
  one);
* errors: :class:`AsmError`, whose message names the original file and line.
  The failing line is found by assembling growing prefixes of the unit
  (bisected), with the labels defined further down replaced by placeholders,
  so that an undefined symbol is told apart from a line keystone rejects.

Results are cached by the preprocessed source, the base address and the
keystone version in ``$XDG_CACHE_HOME/devirt-emu`` (default
``~/.cache/devirt-emu``); when that directory cannot be written, nothing is
cached.

Public API: :func:`assemble` for any source, :func:`build_image` for the
firmware + guest image that the machine loads at :data:`IMAGE_BASE`.
"""
from __future__ import annotations

import ast
import base64
import contextlib
import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import keystone

__all__ = [
    "AsmError",
    "Image",
    "IMAGE_BASE",
    "FIRMWARE_DIR",
    "assemble",
    "build_image",
]

#: Where the machine loads the image; image offset 0 is the AP real-mode entry.
IMAGE_BASE = 0x8000

#: The firmware sources (boot.S, lib.S, ...), also the fallback include directory.
FIRMWARE_DIR = Path(__file__).resolve().parent.parent / "firmware"

#: Bumped whenever the preprocessor's output for a given source changes meaning.
_CACHE_FORMAT = 2      # 2: entries made before engines were radix-probed may be wrong

_PAGE = 4096

_KS_VERSION = getattr(keystone, "__version__", None) or ".".join(map(str, keystone.ks_version()))


class AsmError(Exception):
    """Source that does not assemble.  ``str()`` is one line: ``file:line: message``.

    ``filename`` and ``line`` are None when the error cannot be tied to a line.
    """

    def __init__(self, message: str, filename: Optional[str] = None, line: Optional[int] = None,
                 text: Optional[str] = None):
        self.message = message
        self.filename = filename
        self.line = line
        self.text = text
        where = f"{filename}:{line}: " if filename is not None and line is not None else (
            f"{filename}: " if filename is not None else "")
        tail = f": {text.strip()}" if text and text.strip() else ""
        super().__init__(f"{where}{message}{tail}")


@dataclass(frozen=True)
class Image:
    """An assembled firmware + guest image.

    ``data`` is loaded at physical ``base``.  ``[base, code_end)`` holds
    code only; ``[code_end, data_start)`` read-only data (``.rodata``);
    ``[data_start, base + len(data))`` written data (``symbols["_image_end"]``
    is its end); all four bounds are page aligned.  ``entry32`` is where the
    BSP starts (32-bit protected mode, as a multiboot loader leaves it); the
    APs start at image offset 0 in real mode, CS = ``ap_sipi_vector << 8``,
    IP = 0.
    """

    base: int
    data: bytes
    symbols: dict[str, int] = field(repr=False)
    entry32: int
    ap_sipi_vector: int
    code_end: int
    data_start: int


# ----------------------------------------------------------------------------
# preprocessing

@dataclass(frozen=True)
class _Loc:
    filename: str
    line: int
    text: str


@dataclass
class _Line:
    text: str               # the statement, comment stripped, labels split off
    loc: Optional[_Loc]
    section: str = "text"   # "text", "rodata" or "data"
    mode: str = ".code64"
    block_depth: int = 0    # depth of .macro/.rept/.irp/.if blocks *inside* which it sits
    in_macro: bool = False


_LABEL_RE = re.compile(r"^\s*([A-Za-z_.$][\w.$]*|\d+)\s*:(?!:)")
_NUMREF_RE = re.compile(r"(?<![\w.$])(\d+)([bf])(?![\w.$])")
_SET_RE = re.compile(r"^\s*(?:\.set|\.equ)\s+([A-Za-z_.$][\w.$]*)\s*,|^\s*([A-Za-z_.$][\w.$]*)\s*=(?!=)")
_DIRECTIVE_RE = re.compile(r"^\s*(\.[A-Za-z_][\w]*)\b")
_INCLUDE_RE = re.compile(r'^\s*\.include\s+"([^"]+)"\s*$')

_BLOCK_OPEN = {".macro", ".rept", ".irp", ".irpc", ".if", ".ifdef", ".ifndef", ".ifeq", ".ifne",
               ".ifgt", ".ifge", ".iflt", ".ifle", ".ifb", ".ifnb", ".ifc", ".ifnc"}
_BLOCK_CLOSE = {".endm", ".endr", ".endif"}
_MODES = {".code16", ".code32", ".code64"}
_UNSUPPORTED_SECTIONS = {".section", ".bss", ".previous", ".pushsection", ".popsection"}


def _literal_end(text: str, i: int) -> int:
    """``text[i]`` opens a "string" or a 'c' character literal: the index after
    it (the end of the text for an unterminated string; ``i + 1`` for a lone
    quote)."""
    n = len(text)
    if text[i] == '"':
        j = i + 1
        while j < n:
            if text[j] == "\\":
                j += 2
                continue
            if text[j] == '"':
                return j + 1
            j += 1
        return n
    end = text.find("'", i + 2 if i + 1 < n and text[i + 1] == "\\" else i + 1)
    return end + 1 if end != -1 else i + 1


def _strip_comment(text: str) -> str:
    """Cut a ``#`` or ``//`` comment, respecting "strings" and 'c' literals."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            i = _literal_end(text, i)
            continue
        if c == "#" or (c == "/" and text.startswith("//", i)):
            return text[:i]
        i += 1
    return text


def _split_statements(text: str) -> list[str]:
    """Split a line (comment stripped) at each ``;`` outside literals."""
    parts, start, i, n = [], 0, 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            i = _literal_end(text, i)
            continue
        if c == ";":
            parts.append(text[start:i])
            start = i + 1
        i += 1
    parts.append(text[start:])
    return parts


_OPENERS = {"[": "]", "(": ")"}
_CLOSERS = {"]": "[", ")": "("}
#: A binary operator followed by nothing: by the end of the statement, a comma or a
#: closing bracket (unary + - ~ ! only before an operand, so they dangle here too).
_DANGLING_OPERATOR = re.compile(r"(<<|>>|[-+*/%|&^~!])\s*(?:$|[\],)])")


def _operand_error(text: str) -> Optional[str]:
    """Why the operands of a statement are malformed (None if they are not):
    brackets and parentheses must balance, and no operator may dangle."""
    plain, i, n = [], 0, len(text)
    while i < n:                      # literals out of the way: "a[" and '+' are fine
        if text[i] in "\"'":
            plain.append(" 0 ")
            i = _literal_end(text, i)
            continue
        plain.append(text[i])
        i += 1
    code = "".join(plain)
    stack = []
    for c in code:
        if c in _OPENERS:
            stack.append(c)
        elif c in _CLOSERS:
            if not stack or stack[-1] != _CLOSERS[c]:
                return f"'{c}' without a matching '{_CLOSERS[c]}'"
            stack.pop()
    if stack:
        return f"'{stack[-1]}' is not closed"
    m = _DANGLING_OPERATOR.search(code)
    if m:
        return f"operator '{m.group(1)}' with no operand after it"
    return None


def _read_lines(path: Path, loc: Optional[_Loc], stack: tuple[Path, ...]) -> Iterator[tuple[str, _Loc]]:
    """Yield (statement text, location) for a file with its includes expanded."""
    try:
        source = path.read_text()
    except FileNotFoundError:
        raise AsmError(f"no such file: {path}", *(_loc_parts(loc))) from None
    except (OSError, UnicodeDecodeError) as e:
        raise AsmError(f"cannot read {path}: {e}", *(_loc_parts(loc))) from None
    yield from _expand(source, str(path), path.parent, stack + (path.resolve(),))


def _loc_parts(loc: Optional[_Loc]) -> tuple:
    return (loc.filename, loc.line, loc.text) if loc else (None, None, None)


def _expand(source: str, filename: str, directory: Optional[Path],
            stack: tuple[Path, ...]) -> Iterator[tuple[str, _Loc]]:
    for number, raw in enumerate(source.splitlines(), start=1):
        loc = _Loc(filename, number, raw)
        for text in _split_statements(_strip_comment(raw)):
            text = text.rstrip()
            m = _INCLUDE_RE.match(text)
            if m:
                target = _resolve_include(m.group(1), directory, loc)
                if target.resolve() in stack:
                    raise AsmError(f'recursive .include of "{m.group(1)}"', *_loc_parts(loc))
                yield from _read_lines(target, loc, stack)
                continue
            if re.match(r"^\s*\.include\b", text):
                raise AsmError('malformed .include (expected .include "file")', *_loc_parts(loc))
            why = _operand_error(text)
            if why is not None:
                raise AsmError(why, *_loc_parts(loc))
            yield text, loc


def _resolve_include(name: str, directory: Optional[Path], loc: _Loc) -> Path:
    candidates = []
    if os.path.isabs(name):
        candidates.append(Path(name))
    else:
        if directory is not None:
            candidates.append(directory / name)
        candidates.append(FIRMWARE_DIR / name)
    for c in candidates:
        if c.is_file():
            return c
    raise AsmError(f'cannot find include file "{name}" (looked in '
                   + ", ".join(str(c.parent) for c in candidates) + ")", *_loc_parts(loc))


def _split_labels(text: str) -> tuple[list[str], str]:
    """Split leading ``label:`` definitions off a statement."""
    labels = []
    while True:
        m = _LABEL_RE.match(text)
        if not m:
            return labels, text.strip()
        labels.append(m.group(1))
        text = text[m.end():]


def _preprocess(source: str, filename: str, directory: Optional[Path]) -> tuple[list[_Line], list[str]]:
    """Expand includes, split labels, track sections/modes/blocks.

    Returns the statements in source order and the names for the symbol table.
    """
    lines: list[_Line] = []
    symbols: list[str] = []
    section, mode, depth = "text", ".code64", 0
    macro_depth = 0
    for text, loc in _expand(source, filename, directory, ()):
        labels, rest = _split_labels(text)
        for name in labels:
            if depth == 0 and not name.startswith(".L") and not name.isdigit():
                symbols.append(name)
            lines.append(_Line(f"{name}:", loc, section, mode, depth, macro_depth > 0))
        if not rest:
            continue
        dm = _DIRECTIVE_RE.match(rest)
        directive = dm.group(1).lower() if dm else None
        if directive in (".text", ".rodata", ".data") and rest.strip().lower() == directive:
            if depth:
                raise AsmError(f"{directive} inside a .macro/.rept/.if block", *_loc_parts(loc))
            section = directive[1:]
            continue
        if directive in _UNSUPPORTED_SECTIONS:
            raise AsmError(f"{directive} is not supported: use .text (code), .rodata "
                           "(read-only data) or .data (written data)", *_loc_parts(loc))
        if directive in _MODES and depth == 0:
            mode = directive
            continue
        if directive in _BLOCK_CLOSE:
            if depth == 0:
                raise AsmError(f"{directive} without a matching block start", *_loc_parts(loc))
            depth -= 1
            lines.append(_Line(rest, loc, section, mode, depth, macro_depth > 0))
            if directive == ".endm":
                macro_depth -= 1
            continue
        lines.append(_Line(rest, loc, section, mode, depth, macro_depth > 0 or directive == ".macro"))
        if directive in _BLOCK_OPEN:
            depth += 1
            if directive == ".macro":
                macro_depth += 1
    if depth:
        raise AsmError("unterminated .macro/.rept/.irp/.if block at end of input", filename)
    _resolve_numeric_labels(lines)
    _fold_constants(lines, set(symbols))
    _fix_segment_constants(lines)
    return lines, symbols


def _resolve_numeric_labels(lines: list[_Line]) -> None:
    """Rename GNU-as numeric labels (``1:``, ``1b``, ``1f``) to unique ``.L`` names."""
    defs: dict[str, list[int]] = {}
    for i, ln in enumerate(lines):
        m = re.fullmatch(r"(\d+):", ln.text)
        if m and not ln.in_macro:
            defs.setdefault(m.group(1), []).append(i)
    if not defs and not any(_NUMREF_RE.search(ln.text) for ln in lines):
        return
    for i, ln in enumerate(lines):
        if ln.in_macro:
            continue
        m = re.fullmatch(r"(\d+):", ln.text)
        if m:
            k = defs[m.group(1)].index(i)
            ln.text = f".Lnum{m.group(1)}_{k}:"
            continue
        if '"' in ln.text:
            continue  # numeric references are not looked for next to string literals

        def repl(mm: re.Match, i=i, ln=ln) -> str:
            num, direction = mm.group(1), mm.group(2)
            positions = defs.get(num, [])
            if direction == "b":
                cands = [k for k, p in enumerate(positions) if p <= i]
                k = cands[-1] if cands else None
            else:
                cands = [k for k, p in enumerate(positions) if p > i]
                k = cands[0] if cands else None
            if k is None:
                raise AsmError(f"numeric label {num}{direction}: no label {num}: "
                               f"{'before' if direction == 'b' else 'after'} this line",
                               *_loc_parts(ln.loc))
            return f".Lnum{num}_{k}"

        ln.text = _NUMREF_RE.sub(repl, ln.text)


_TOKEN_RE = re.compile(r"""\s*(?:
    (?P<num>0[xX][0-9A-Fa-f]+|0[bB][01]+|[0-9]+)
  | (?P<chr>'(?:\\.|[^'\\])')
  | (?P<name>[A-Za-z_.$][\w.$]*)
  | (?P<op><<|>>|[-+*/%&|^~()])
)""", re.X)
_ESCAPES = {"n": 10, "t": 9, "r": 13, "0": 0, "\\": 92, "'": 39, '"': 34}


def _evaluate(expr: str, values: dict[str, int]) -> Optional[int]:
    """Value of an integer expression of literals and known constants, or None."""
    parts, pos, expr = [], 0, expr.strip()
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if not m or m.end() == pos:
            return None
        pos = m.end()
        if m.group("num"):
            t = m.group("num")
            if len(t) > 1 and t[0] == "0" and t[1] not in "xXbB":
                parts.append(str(int(t, 8)))       # GNU as: a leading 0 means octal
            else:
                parts.append(str(int(t, 0)))
        elif m.group("chr"):
            body = m.group("chr")[1:-1]
            if body.startswith("\\"):
                if body[1] not in _ESCAPES:
                    return None
                parts.append(str(_ESCAPES[body[1]]))
            else:
                parts.append(str(ord(body)))
        elif m.group("name"):
            if m.group("name") not in values:
                return None
            parts.append(f"({values[m.group('name')]})")
        else:
            parts.append("//" if m.group("op") == "/" else m.group("op"))
    try:
        tree = ast.parse(" ".join(parts), mode="eval")
    except SyntaxError:
        return None
    allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult,
               ast.FloorDiv, ast.Mod, ast.LShift, ast.RShift, ast.BitOr, ast.BitAnd, ast.BitXor,
               ast.USub, ast.UAdd, ast.Invert)
    if not all(isinstance(node, allowed) for node in ast.walk(tree)):
        return None
    try:
        value = eval(compile(tree, "<expr>", "eval"), {"__builtins__": {}}, {})  # noqa: S307
    except (ZeroDivisionError, ValueError, OverflowError):
        return None
    if not isinstance(value, int) or not -(1 << 64) < value < (1 << 64):
        return None
    return value


_IDENT_RE = re.compile(r"(?<![\w.$\\])([A-Za-z_.$][\w.$]*)")


def _substitute(text: str, values: dict[str, int]) -> str:
    """Replace known constants by their values, outside string literals."""
    out, last = [], 0
    for m in re.finditer(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])\'', text):
        out.append(_substitute_plain(text[last:m.start()], values))
        out.append(m.group(0))
        last = m.end()
    out.append(_substitute_plain(text[last:], values))
    return "".join(out)


def _substitute_plain(text: str, values: dict[str, int]) -> str:
    def repl(m: re.Match) -> str:
        v = values.get(m.group(1))
        if v is None:
            return m.group(0)
        return f"{v:#x}" if v >= 0 else f"(-{-v:#x})"
    return _IDENT_RE.sub(repl, text)


def _fold_constants(lines: list[_Line], labels: set[str]) -> None:
    """Replace symbolic constants by their values before keystone sees them.

    keystone 0.9.2 mis-assembles an expression in which a ``.set``/``.equ``/
    ``=`` symbol follows a literal or a label (``mov eax, 100 + K`` becomes a
    load from address K; ``[table + K]`` drops ``table``), silently.  So every
    constant defined exactly once, outside blocks, by an expression of
    literals and other such constants, is substituted by its value
    everywhere (its definition stays, for ``.if`` and data directives).
    """
    counts: dict[str, int] = {}
    for ln in lines:
        for name in _defined_names(ln.text):
            counts[name] = counts.get(name, 0) + (1 if ln.block_depth == 0 and not ln.in_macro else 2)
    values: dict[str, int] = {}
    for ln in lines:
        m = _SET_RE.match(ln.text)
        if not m:
            continue
        name = m.group(1) or m.group(2)
        if counts.get(name) != 1 or name in labels:
            continue
        v = _evaluate(ln.text[m.end():], values)
        if v is not None:
            values[name] = v
    if not values:
        return
    for ln in lines:
        if re.match(r"^\s*\.macro\b", ln.text):
            continue
        m = _SET_RE.match(ln.text)
        if m:
            ln.text = ln.text[:m.end()] + _substitute(ln.text[m.end():], values)
        else:
            ln.text = _substitute(ln.text, values)


_SEG_OPERAND_RE = re.compile(r"\b([fgFG][sS])\s*:\s*\[([^\]]*)\]")


def _fix_segment_constants(lines: list[_Line]) -> None:
    """Rewrite ``fs:[N]`` / ``gs:[N]`` (N a constant) as ``gs:[riz*1 + N]`` in 64-bit code.

    keystone 0.9.2 encodes a 64-bit segment-overridden operand with a constant
    displacement as RIP-relative, and for register loads gets the
    displacement wrong (``mov rdi, gs:[8]`` becomes ``gs:[rip + 8]``).  The
    ``riz`` spelling forces the absolute SIB form.  Not applied inside
    ``.macro`` bodies, whose mode is unknown.
    """
    for ln in lines:
        if ln.mode != ".code64" or ln.in_macro or "s:" not in ln.text.lower():
            continue

        def repl(m: re.Match) -> str:
            value = _evaluate(m.group(2), {})
            if value is None:
                return m.group(0)
            return f"{m.group(1)}:[riz*1 + {value:#x}]" if value >= 0 else \
                f"{m.group(1)}:[riz*1 + (-{-value:#x})]"

        ln.text = _SEG_OPERAND_RE.sub(repl, ln.text)


def _layout(lines: list[_Line]) -> list[_Line]:
    """Order the statements: macros, code, read-only data, written data.

    Read-only data and written data each start on a fresh page (zero-filled
    padding), so that code pages hold only code and data pages only data.
    """
    macros = [ln for ln in lines if ln.in_macro]
    out: list[_Line] = list(macros)

    def emit(stream: list[_Line]) -> None:
        current = None
        for ln in stream:
            if ln.mode != current and ln.block_depth == 0:
                out.append(_Line(ln.mode, None))
                current = ln.mode
            out.append(ln)

    for section in ("text", "rodata", "data"):
        stream = [ln for ln in lines if not ln.in_macro and ln.section == section]
        if section != "text" and stream:
            out.append(_Line(".balign 4096, 0", None))
            out.append(_Line(f"_{section}_start:", None))
        emit(stream)
    return out


def _defined_names(text: str) -> list[str]:
    m = re.fullmatch(r"([A-Za-z_.$][\w.$]*):", text)
    if m:
        return [m.group(1)]
    m = _SET_RE.match(text)
    if m:
        return [m.group(1) or m.group(2)]
    return []


# ----------------------------------------------------------------------------
# keystone

@contextlib.contextmanager
def _captured_stderr() -> Iterator[list[str]]:
    """Collect what keystone's LLVM core prints on file descriptor 2."""
    out: list[str] = []
    try:
        saved = os.dup(2)
    except OSError:
        yield out
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode("utf-8", "replace"))


_KS_MODES = {16: keystone.KS_MODE_16, 32: keystone.KS_MODE_32, 64: keystone.KS_MODE_64}
_ENGINES: dict[int, keystone.Ks] = {}


def keystone_engine(mode: int = 64) -> keystone.Ks:
    """A keystone engine for x86 ``mode`` (16, 32 or 64) that reads numbers as decimal.

    keystone 0.9.2 never initialises MCAsmInfo::Radix (keystone pull requests
    528 and 608): an engine whose memory happened to hold 16 reads every
    decimal number as hexadecimal.  Seen here now and then in long test runs
    ("mov eax, 100 + 4" assembled as MOV EAX, 104H).  Each engine is probed once
    ("mov al, 10" must be B0 0A) and kept; a bad one is replaced.
    """
    ks = _ENGINES.get(mode)
    if ks is None:
        rejected = []                  # kept alive meanwhile, so that a new engine lands elsewhere
        for _ in range(64):
            ks = keystone.Ks(keystone.KS_ARCH_X86, _KS_MODES[mode])
            enc, _ = ks.asm("mov al, 10", 0)
            if bytes(enc or b"") == b"\xb0\x0a":
                break
            rejected.append(ks)
        else:
            raise AsmError(f"keystone: no {mode}-bit engine reads decimal numbers "
                           "(its radix is left uninitialised)")
        _ENGINES[mode] = ks
    return ks


def _ks_run(text: str, base: int) -> tuple[Optional[bytes], Optional[keystone.KsError], str]:
    ks = keystone_engine(64)
    with _captured_stderr() as err:
        try:
            enc, _ = ks.asm(text, base)
            result = (bytes(enc) if enc is not None else b""), None
        except keystone.KsError as e:
            result = None, e
    llvm = ""
    for ln in "".join(err).splitlines():
        if "error:" in ln:
            llvm = ln.split("error:", 1)[1].strip()
            break
    return result[0], result[1], llvm


def _describe(e: keystone.KsError, llvm: str) -> str:
    if e.errno == keystone.KS_ERR_ASM_SYMBOL_MISSING:
        return "undefined symbol"
    msg = str(e)
    return f"{msg} ({llvm})" if llvm else msg


_NOT_NAMES = {
    "byte", "word", "dword", "qword", "tbyte", "xmmword", "ymmword", "zmmword", "fword", "ptr",
    "offset", "rip", "eip", "ip", "short", "near", "far",
}
_REG_RE = re.compile(
    r"^(?:[re]?[abcd]x|[abcd][lh]|[re]?(?:si|di|sp|bp)|(?:si|di|sp|bp)l|r\d{1,2}[dwb]?|"
    r"[cdefgs]s|cr\d+|dr\d+|[xyz]mm\d+|st|mm\d|k[0-7])$", re.I)


def _unknown_names(text: str, known: set[str]) -> list[str]:
    words = re.findall(r"(?<![\w.$])([A-Za-z_.$][\w.$]*)", text)
    if not words:
        return []
    operands = words[1:]  # the first word is the mnemonic or directive
    return [w for w in operands
            if w not in known and w.lower() not in _NOT_NAMES and not _REG_RE.match(w)]


def _locate_error(lines: list[_Line], tail: list[str], base: int,
                  whole: keystone.KsError) -> AsmError:
    """Find the first statement whose prefix fails to assemble; describe it.

    A prefix is assembled with placeholders for the labels and constants the
    rest of the unit defines.  Labels that only a macro expansion defines get
    no placeholder, so while the whole unit fails for another reason, a
    prefix failing with "undefined symbol" does not count as the error.
    """
    defined_at: list[list[str]] = [_defined_names(ln.text) for ln in lines]
    all_names: set[str] = {n for names in defined_at for n in names}
    cuts = [i + 1 for i, ln in enumerate(lines) if ln.block_depth == 0]
    missing = keystone.KS_ERR_ASM_SYMBOL_MISSING
    looking_for_missing = whole.errno == missing

    def attempt(k: int) -> tuple[Optional[keystone.KsError], str]:
        seen = {n for names in defined_at[:k] for n in names}
        stubs = []
        for names, ln in zip(defined_at[k:], lines[k:]):
            for n in names:
                if n not in seen:
                    seen.add(n)
                    is_label = ln.text.endswith(":")
                    stubs.append(f"{n} = {base:#x}" if is_label else f"{n} = 0")
        text = "\n".join([ln.text for ln in lines[:k]] + stubs)
        _, err, llvm = _ks_run(text, base)
        if err is not None and err.errno == missing and not looking_for_missing:
            err = None
        return err, llvm

    found = None
    if cuts:
        lo, hi = 0, len(cuts) - 1
        err, llvm = attempt(cuts[hi])
        if err is not None:
            found = (cuts[hi], err, llvm)
            while lo < hi:
                mid = (lo + hi) // 2
                err, llvm = attempt(cuts[mid])
                if err is not None:
                    hi, found = mid, (cuts[mid], err, llvm)
                else:
                    lo = mid + 1
    if found is None:
        # every statement assembles: the symbol table tail itself failed
        _, err, llvm = _ks_run("\n".join([ln.text for ln in lines] + tail), base)
        return AsmError(f"assembly failed: {_describe(err or whole, llvm)}")
    k, err, llvm = found
    ln = lines[k - 1]
    # a block statement that fails is reported at the start of its block
    start = k - 1
    while start > 0 and lines[start].block_depth > 0:
        start -= 1
    line = lines[start] if lines[start].loc else ln
    if line.loc is None:
        return AsmError(f"assembly failed: {_describe(err, llvm)}")
    message = _describe(err, llvm)
    if err.errno == missing:
        unknown = _unknown_names(ln.text, all_names)
        if unknown:
            message = "undefined symbol " + ", ".join(f"'{u}'" for u in dict.fromkeys(unknown))
    elif err.errno == keystone.KS_ERR_ASM_INVALIDOPERAND:
        message += " (or an immediate that does not fit the operand)"
    if start != k - 1:
        message += " (in the block starting here)"
    return AsmError(message, line.loc.filename, line.loc.line, line.loc.text)


# ----------------------------------------------------------------------------
# cache

def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "devirt-emu"


def _cache_key(text: str, base: int) -> str:
    h = hashlib.sha256()
    h.update(f"devirt-emu asm v{_CACHE_FORMAT}\0keystone {_KS_VERSION}\0base {base:#x}\0".encode())
    h.update(text.encode())
    return h.hexdigest()


def _cache_load(key: str) -> Optional[tuple[bytes, dict[str, int]]]:
    try:
        blob = json.loads((_cache_dir() / f"{key}.json").read_text())
        return base64.b64decode(blob["data"]), {str(k): int(v) for k, v in blob["symbols"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cache_store(key: str, data: bytes, symbols: dict[str, int]) -> None:
    try:
        d = _cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({"data": base64.b64encode(data).decode(), "symbols": symbols}, f)
        os.replace(tmp, d / f"{key}.json")
    except OSError:
        pass


# ----------------------------------------------------------------------------
# public API

def assemble(source: str, base: int, filename: str = "<source>") -> tuple[bytes, dict[str, int]]:
    """Assemble Intel-syntax ``source`` for loading at ``base``.

    Returns the bytes and the symbol table (label -> address).  ``filename``
    names the source in error messages; ``.include`` paths are relative to
    its directory when it names a real file, then to ``firmware/``.  The
    unit starts in ``.code64`` and ``.text``.  Raises :class:`AsmError`.
    """
    if not isinstance(base, int) or base < 0 or base >= 1 << 64:
        raise ValueError(f"base must be an address (0 <= base < 2**64), not {base!r}")
    directory = Path(filename).resolve().parent if Path(filename).is_file() else None
    lines, names = _preprocess(source, filename, directory)
    laid_out = _layout(lines)
    for marker in ("_rodata_start", "_data_start"):
        if any(ln.text == f"{marker}:" and ln.loc is None for ln in laid_out):
            names = names + [marker]
    names = list(dict.fromkeys(names))
    # no alignment in front of the table: it is exactly the last 8 * len(names) bytes
    tail = [f".quad {n}" for n in names]
    text = "\n".join([ln.text for ln in laid_out] + tail)

    key = _cache_key(text, base)
    cached = _cache_load(key)
    if cached is not None:
        return cached

    out, err, _ = _ks_run(text, base)
    if err is not None:
        raise _locate_error(laid_out, tail, base, err)
    table_size = 8 * len(names)
    if out is None or len(out) < table_size:
        raise AsmError("keystone produced no output for this source", filename)
    body_end = len(out) - table_size
    symbols = {n: int.from_bytes(out[body_end + 8 * i: body_end + 8 * i + 8], "little")
               for i, n in enumerate(names)}
    data = out[:body_end]
    _cache_store(key, data, symbols)
    return data, symbols


def build_image(guest: "str | os.PathLike[str] | None") -> Image:
    """Assemble firmware + guest into the image the machine loads at 0x8000.

    The unit is ``firmware/boot.S``, the guest program, ``firmware/lib.S``,
    each starting on a fresh 4 KiB page.
    ``guest=None`` builds the firmware alone (``firmware/no_guest.S`` takes
    the guest's place): the firmware then calls the ELF entry named in the
    boot-info block.  Raises :class:`AsmError` (also for a missing file).
    """
    parts = [FIRMWARE_DIR / "boot.S"]
    if guest is None:
        parts.append(FIRMWARE_DIR / "no_guest.S")
    else:
        g = Path(os.fspath(guest))
        if not g.is_file():
            raise AsmError(f"no such file: {g}", str(g))
        parts.append(g.resolve())
    parts.append(FIRMWARE_DIR / "lib.S")
    root = []
    for p in parts:
        # each part's code starts on a page of its own: a guest's loop then shares
        # no page with firmware code, so few instruction hooks stay armed while it
        # runs (they slow Unicorn's instruction counting, see platform/core.py)
        root += [".text", ".code64", ".balign 4096, 0", f'.include "{p}"']
    root += [".data", ".balign 4096, 0", "_image_end:"]
    try:
        data, symbols = assemble("\n".join(root) + "\n", IMAGE_BASE, "<image>")
    except AsmError as e:
        if guest is not None and "undefined symbol 'guest_main'" in str(e):
            raise AsmError("the guest program defines no guest_main (see docs/guest-abi.md)",
                           str(guest)) from None
        raise
    for required in ("_start32", "_image_end"):
        if required not in symbols:
            raise AsmError(f"the firmware defines no {required}", str(parts[0]))
    if symbols.get("ap_entry") != IMAGE_BASE:
        raise AsmError("the firmware must start with ap_entry (image offset 0 is the AP entry)",
                       str(parts[0]))
    if IMAGE_BASE + len(data) != symbols["_image_end"]:
        raise AsmError(f"image size {len(data):#x} disagrees with _image_end "
                       f"{symbols['_image_end']:#x}", "<image>")
    data_start = symbols.get("_data_start", symbols["_image_end"])
    return Image(base=IMAGE_BASE, data=data, symbols=symbols, entry32=symbols["_start32"],
                 ap_sipi_vector=IMAGE_BASE >> 12,
                 code_end=symbols.get("_rodata_start", data_start), data_start=data_start)
