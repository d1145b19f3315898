"""The virtualization views of the debugger: one interface, :class:`VirtView`,
that the Session, the REPL and the GDB stub's ``monitor`` use for the control
structure of a core: :class:`VmcsView` for a VMX vCPU, :class:`VmcbView` for
an SVM vCPU (``view_for`` is the one place that picks it).

A view lists fields by name with their decoded value (controls as named
bits), writes a field or a single control bit, explains a field or bit, and
explains the last VM exit (``why``) and the last sensitive event that did not
exit (``why_not``) from the rule's Decision and its cause.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional, Protocol

from ..vmx import controls as C
from ..vmx import exit_reasons as ER
from ..vmx.capabilities import supported_fields
from ..vmx.fields import ALL_FIELDS, FieldType, field_by_name
from . import explain as X


class ViewError(ValueError):
    """Bad input to a view (unknown field, value too wide, read-only field)."""


@dataclass(frozen=True)
class FieldRow:
    name: str
    group: str
    value: int
    decoded: str
    bits: int


@dataclass
class Explanation:
    """What a ``why`` or ``why-not`` found: a headline, the rule, the cause
    as the rule gave it, and the details derived from it (bit addresses,
    masks decoded)."""

    headline: str
    rule: str = ""
    cause: tuple = ()
    details: list = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [self.headline]
        if self.rule:
            out.append(f"  rule: {self.rule}")
        for c in self.cause:
            out.append(f"  cause: {c}")
        for d in self.details:
            out.append(f"  -> {d}")
        return out


class VirtView(Protocol):
    """What the debugger asks of a core's virtualization control structure."""

    kind: str                        # "vmcs" (later "vmcb")

    def groups(self) -> list[str]: ...
    def field_names(self) -> list[str]: ...
    def rows(self, pattern: Optional[str] = None) -> list[FieldRow]: ...
    def set(self, name: str, value: int) -> str: ...
    def explain(self, name: str) -> str: ...
    def why(self) -> Explanation: ...
    def why_not(self) -> Explanation: ...


def view_for(core) -> Optional[VirtView]:
    """The view of ``core``'s virtualization layer, None when it runs natively."""
    virt = core.virt
    if virt is None:
        return None
    if hasattr(virt, "vmcs"):
        return VmcsView(virt)
    if hasattr(virt, "vmcb"):
        return VmcbView(virt)
    return None


#: Control fields -> their bit table (controls.py).
CONTROL_TABLES = {
    "PIN_BASED_VM_EXEC_CONTROL": C.PINBASED,
    "CPU_BASED_VM_EXEC_CONTROL": C.PROCBASED,
    "SECONDARY_VM_EXEC_CONTROL": C.PROCBASED2,
    "TERTIARY_VM_EXEC_CONTROL": C.PROCBASED3,
    "VM_EXIT_CONTROLS": C.EXIT,
    "SECONDARY_VM_EXIT_CONTROLS": C.EXIT2,
    "VM_ENTRY_CONTROLS": C.ENTRY,
    "VM_FUNCTION_CONTROL": C.VMFUNC,
    "GUEST_INTERRUPTIBILITY_INFO": C.GUEST_INTR_STATE,
}
_GROUPS = {FieldType.CONTROL: "control", FieldType.EXIT_INFO: "exit-info",
           FieldType.GUEST: "guest", FieldType.HOST: "host"}
_INTR_INFO_FIELDS = {"VM_EXIT_INTR_INFO", "IDT_VECTORING_INFO_FIELD", "VM_ENTRY_INTR_INFO_FIELD"}
#: Register-image fields decoded with the register's bit table (None: RFLAGS).
_REGISTER_FIELDS = {"GUEST_RFLAGS": None, "GUEST_CR0": "CR0_BITS", "GUEST_CR4": "CR4_BITS",
                    "HOST_CR0": "CR0_BITS", "HOST_CR4": "CR4_BITS", "CR0_READ_SHADOW": "CR0_BITS",
                    "CR4_READ_SHADOW": "CR4_BITS", "GUEST_IA32_EFER": "EFER_BITS",
                    "HOST_IA32_EFER": "EFER_BITS"}
#: control bit name -> (control field, mask)
CONTROL_BITS = {bit: (fname, mask) for fname, table in CONTROL_TABLES.items()
                for bit, mask in table.items()}


def _intr_info_text(v: int) -> str:
    if not v & C.INTR_INFO_VALID_MASK:
        return "not valid"
    t = C.INTR_TYPES.get(v & C.INTR_INFO_INTR_TYPE_MASK, "?")
    return (f"valid vector={v & 0xFF:#x} {t}" + (" error-code" if v & C.INTR_INFO_DELIVER_CODE_MASK
                                                  else "")
            + (" NMI-unblocking" if v & C.INTR_INFO_UNBLOCK_NMI else ""))


def decode_field(name: str, value: int) -> str:
    """The value of VMCS field ``name`` for people."""
    table = CONTROL_TABLES.get(name)
    if table is not None:
        return " ".join(C.decode_bits(table, value)) or "-"
    if name == "VM_EXIT_REASON":
        basic = value & ER.BASIC_REASON_MASK
        row = ER.BY_NUMBER.get(basic)
        flags = " ENTRY_FAILURE" if value & ER.EXIT_REASON_FAILED_VMENTRY else ""
        return (row.name if row else f"reason {basic}") + flags
    if name == "GUEST_ACTIVITY_STATE":
        return C.GUEST_ACTIVITY_STATES.get(value, "reserved")
    if name in _INTR_INFO_FIELDS:
        return _intr_info_text(value)
    if name in _REGISTER_FIELDS:
        from . import state as S
        table = _REGISTER_FIELDS[name]
        return S.rflags_text(value) if table is None else S.bits_text(getattr(S, table), value)
    if name == "EXCEPTION_BITMAP":
        return " ".join(X.VECTOR_NAMES.get(v, str(v)) for v in range(32) if value >> v & 1) or "-"
    return ""


class VmcsView:
    """:class:`VirtView` of a :class:`~devirt_emu.vmx.vcpu.VmxVcpu`'s current VMCS."""

    kind = "vmcs"

    def __init__(self, vcpu):
        self.vcpu = vcpu
        #: the fields of the vCPU's CPU model (SDM Appendix B footnotes: a field exists
        #: when the processor supports a control that uses it)
        self.supported = supported_fields(getattr(vcpu, "model", None))
        self._fields = [f for f in ALL_FIELDS if not f.high and f.encoding in self.supported]

    def groups(self) -> list[str]:
        return list(_GROUPS.values())

    def field_names(self) -> list[str]:
        return [f.name for f in self._fields] + list(CONTROL_BITS)

    def rows(self, pattern: Optional[str] = None) -> list[FieldRow]:
        """Every supported field, or those of a group ("control", "exit-info",
        "guest", "host") or whose name contains ``pattern`` (case-insensitive)."""
        vmcs = self.vcpu.vmcs
        out = []
        pat = pattern.lower() if pattern else None
        for f in self._fields:
            group = _GROUPS[f.type]
            if pat and pat != group and pat not in f.name.lower():
                continue
            value = vmcs.get(f.encoding)
            out.append(FieldRow(f.name, group, value, decode_field(f.name, value), f.bits))
        if pat and not out:
            raise ViewError(f"no VMCS field or group matches {pattern!r} "
                            f"(groups: {', '.join(self.groups())})")
        return out

    def _field(self, name: str):
        try:
            info = field_by_name(name.upper())
        except KeyError:
            raise ViewError(f"no VMCS field or control bit is named {name!r}") from None
        if info.encoding not in self.supported:
            raise ViewError(f"{info.name} does not exist on the modelled processor")
        return info

    def get(self, name: str) -> int:
        return self.vcpu.vmcs.get(self._field(name).encoding)

    def set(self, name: str, value: int) -> str:
        """Write a field, or one control bit by its name (value 0 or 1).  The
        processor uses what is written at the next VM entry (the entry checks
        run then)."""
        vmcs = self.vcpu.vmcs
        key = name.upper()
        if key in CONTROL_BITS:
            if value not in (0, 1):
                raise ViewError(f"{key} is one bit: set it to 0 or 1, not {value:#x}")
            fname, mask = CONTROL_BITS[key]
            info = self._field(fname)
            old = vmcs.get(info.encoding)
            new = old | mask if value else old & ~mask
            vmcs.set(info.encoding, new)
            return f"{fname} {old:#x} -> {new:#x} ({key}={value})"
        info = self._field(key)
        if info.read_only:
            raise ViewError(f"{info.name} is a read-only VM-exit information field")
        if not 0 <= value < 1 << info.bits:
            raise ViewError(f"{value:#x} does not fit {info.name} ({info.bits} bits)")
        old = vmcs.get(info.encoding)
        vmcs.set(info.encoding, value)
        return f"{info.name} {old:#x} -> {value:#x}"

    def explain(self, name: str) -> str:
        key = name.upper()
        if key in CONTROL_BITS:
            fname, mask = CONTROL_BITS[key]
            bit = mask.bit_length() - 1
            doc = X.CONTROL_DOCS.get(key, "(no description in the debugger's table yet)")
            now = self.vcpu.vmcs.get(self._field(fname).encoding) >> bit & 1
            return f"{key}: bit {bit} of {fname} (now {now}). {doc}"
        if key in ER.BY_NAME:
            row = ER.BY_NAME[key]
            return (f"exit reason {row.number} {row.name}: {row.description} "
                    f"(timing {row.timing.value})")
        info = self._field(key)
        doc = X.FIELD_DOCS.get(info.name, "")
        return (f"{info.name}: {info.description}; encoding {info.encoding:#06x}, "
                f"{_GROUPS[info.type]} field, {info.bits} bits"
                + (", read-only" if info.read_only else "") + (f". {doc}" if doc else ""))

    def why(self) -> Explanation:
        d = self.vcpu.last_exit
        if d is None:
            return Explanation("no VM exit yet on this core")
        return X.explain_exit(d, self.vcpu.last_exit_event, self.vcpu.vmcs)

    def why_not(self) -> Explanation:
        last = self.vcpu.last_no_exit
        if last is None:
            return Explanation("no sensitive event has gone through the rules without an exit "
                               "on this core yet")
        event, d = last
        return X.explain_no_exit(d, event, self.vcpu.vmcs)


def parse_bitmap_cause(text: str) -> Optional[tuple[str, int, int]]:
    """("read-low" etc., MSR offset, bit value) from an MSR-bitmap cause line."""
    m = re.search(r"MSR bitmap (\S+) bit (0x[0-9a-f]+|\d+)=(\d)", text)
    if m is None:
        return None
    return m.group(1), int(m.group(2), 0), int(m.group(3))


# ---------------------------------------------------------------------- SVM
class VmcbView:
    """:class:`VirtView` of an :class:`~devirt_emu.svm.vcpu.SvmVcpu`'s VMCB
    (AMD APM Vol. 2 Appendix B; names are Linux's ``struct vmcb``): the
    control and state-save areas by field name, the intercept vectors as
    named bits (settable one by one), EXITCODE by name.  ``why`` explains
    the last #VMEXIT from the SVM rule's cause; the SVM vCPU does not record
    the events it let through, so ``why_not`` says so."""

    kind = "vmcb"

    def __init__(self, vcpu):
        from ..svm import intercepts as I
        from ..svm import vmcb as V
        self.vcpu = vcpu
        self._I, self._V = I, V

    def groups(self) -> list[str]:
        return ["control", "save"]

    def field_names(self) -> list[str]:
        return [f.name for f in self._V.TABLE] + list(self._I.TABLE)

    def _value(self, name: str) -> int:
        v = self.vcpu.vmcb.get(name)
        return int.from_bytes(v, "little") if isinstance(v, (bytes, bytearray)) else v

    def decode(self, name: str, value: int) -> str:
        I, V = self._I, self._V
        if name in V.INTERCEPT_WORDS:
            word = V.INTERCEPT_WORDS.index(name)
            return " ".join(I.BY_BIT.get(32 * word + b, f"bit {b}") for b in range(32)
                            if value >> b & 1) or "-"
        if name == "exit_code":
            from ..svm import exit_codes as XC
            return XC.name_of(self.vcpu.vmcb.exitcode)
        if name in ("event_inj", "exit_int_info"):
            if not value & V.SVM_EVTINJ_VALID:
                return "not valid"
            return (f"valid vector={value & 0xFF:#x} type={(value >> 8) & 7}"
                    + (" error-code" if value & V.SVM_EVTINJ_VALID_ERR else ""))
        from . import state as S
        table = {"cr0": S.CR0_BITS, "cr4": S.CR4_BITS, "efer": S.EFER_BITS}.get(name)
        if table is not None:
            return S.bits_text(table, value)
        if name == "rflags":
            return S.rflags_text(value)
        return ""

    def rows(self, pattern: Optional[str] = None) -> list[FieldRow]:
        pat = pattern.lower() if pattern else None
        out = []
        for f in self._V.TABLE:
            if pat and pat != f.area and pat not in f.name.lower():
                continue
            value = self._value(f.name)
            out.append(FieldRow(f.name, f.area, value, self.decode(f.name, value), 8 * f.size))
        if pat and not out:
            raise ViewError(f"no VMCB field or area matches {pattern!r} (areas: control, save)")
        return out

    def get(self, name: str) -> int:
        try:
            self._V.field(name.lower())
        except KeyError:
            raise ViewError(f"no VMCB field is named {name!r}") from None
        return self._value(name.lower())

    def set(self, name: str, value: int) -> str:
        I, V = self._I, self._V
        vmcb = self.vcpu.vmcb
        if name.upper() in I.TABLE or name in I.TABLE:
            key = name if name in I.TABLE else name.upper()
            if value not in (0, 1):
                raise ViewError(f"{key} is one bit: set it to 0 or 1, not {value:#x}")
            bit = I.TABLE[key]
            word_name = V.INTERCEPT_WORDS[bit // 32]
            old = vmcb.get(word_name)
            new = old | 1 << (bit % 32) if value else old & ~(1 << (bit % 32))
            vmcb.set(word_name, new)
            return f"{word_name} {old:#x} -> {new:#x} ({key}={value})"
        key = name.lower()
        try:
            V.field(key)
        except KeyError:
            raise ViewError(f"no VMCB field or intercept bit is named {name!r}") from None
        old = self._value(key)
        try:
            vmcb.set(key, value)
        except ValueError as e:
            raise ViewError(str(e)) from None
        return f"{key} {old:#x} -> {value:#x}"

    def explain(self, name: str) -> str:
        I, V = self._I, self._V
        key = name if name in I.TABLE else name.upper()
        if key in I.TABLE:
            bit = I.TABLE[key]
            word_name = V.INTERCEPT_WORDS[bit // 32]
            f = V.field(word_name)
            now = self.vcpu.vmcb.get(word_name) >> (bit % 32) & 1
            return (f"{key}: bit {bit % 32} of {word_name} (intercepts[{bit // 32}] at offset "
                    f"{f.offset:#05x}; now {now})")
        from ..svm import exit_codes as XC
        if key in XC.TABLE:
            return f"exit code {XC.TABLE[key]:#x} {key}"
        try:
            f = V.field(name.lower())
        except KeyError:
            raise ViewError(f"no VMCB field, intercept bit or exit code is named {name!r}") from None
        return f"{f.name}: {f.area} area, offset {f.offset:#05x}, {f.size} bytes"

    def why(self) -> Explanation:
        d = self.vcpu.last_exit
        if d is None:
            return Explanation("no #VMEXIT yet on this core")
        event = self.vcpu.last_exit_event if hasattr(type(self.vcpu), "last_exit_event") else None
        head = (f"#VMEXIT {d.name} (exit code {d.code:#x}), EXITINFO1 {d.exit_info_1:#x}, "
                f"EXITINFO2 {d.exit_info_2:#x}")
        rule = "devirt_emu.svm.rules" + (f" for a {event.kind.value} event" if event else "")
        details = []
        for line in d.cause:
            d2 = self._intercept_detail(line)
            if d2:
                details.append(d2)
        return Explanation(head, rule, tuple(d.cause), details)

    def _intercept_detail(self, line: str) -> Optional[str]:
        m = re.search(r"(MSRPM|IOPM) bit (0x[0-9a-f]+|\d+)", line)
        if m is not None:
            base_name = "msrpm_base_pa" if m.group(1) == "MSRPM" else "iopm_base_pa"
            base = self.vcpu.vmcb.get(base_name)
            n = int(m.group(2), 0)
            return (f"{m.group(1)} bit {n:#x} is byte {base + (n >> 3):#x} ({base_name} "
                    f"{base:#x} + {n >> 3:#x}), bit {n & 7}")
        m = re.match(r"([A-Za-z0-9_]+)=([01])\b", line)
        if m is None or m.group(1) not in self._I.TABLE:
            return None
        return self.explain(m.group(1))

    def why_not(self) -> Explanation:
        return Explanation("why-not: the SVM vCPU does not record the events it let through yet")
