"""Properties of the SVM rules against independent references written here.

The references build the MSRPM and IOPM from sets of intercepted MSRs and
ports the way the APM describes the maps (byte = range start + MSR / 4, the
pair of bits at 2 * (MSR % 4); one bit per port, ports past FFFFh continuing
into the third page), and answer from the sets, not from the bytes."""
from hypothesis import given, settings, strategies as st

from devirt_emu.events import Event, Insn, Kind
from devirt_emu.svm import rules as R
from devirt_emu.svm.intercepts import TABLE as BITS
from devirt_emu.svm.vmcb import INTERCEPT_WORDS

MSRPM, IOPM = 0x0, 0x4000
RANGES = ((0x0, 0x0000), (0xC0000000, 0x800), (0xC0010000, 0x1000))   # (first MSR, byte offset)

msrs = st.one_of(st.integers(0, 0x1FFF), st.integers(0xC0000000, 0xC0001FFF),
                 st.integers(0xC0010000, 0xC0011FFF), st.integers(0, 0xFFFFFFFF))


class Vmcb(dict):
    def get(self, name):
        return dict.get(self, name, 0)


def reference_msrpm(reads, writes) -> bytes:
    pm = bytearray(8192)
    for msr, is_write in [(m, False) for m in reads] + [(m, True) for m in writes]:
        for first, byte0 in RANGES:
            if first <= msr < first + 0x2000:
                n = msr - first
                pm[byte0 + n // 4] |= (2 if is_write else 1) << (2 * (n % 4))
    return bytes(pm)


def _regs(**kw):
    r = dict(rax=0, rcx=0, rdx=0, rflags=0x2, cr0=0x80000011, cr4=0x20, efer=0x1D00, cpl=0,
             mode=64)
    r.update(kw)
    return r


@settings(max_examples=150, deadline=None)
@given(reads=st.sets(msrs, max_size=20), writes=st.sets(msrs, max_size=20), query=msrs,
       write=st.booleans())
def test_msrpm_matches_the_reference(reads, writes, query, write):
    pm = reference_msrpm(reads, writes)
    mem = bytes(pm)
    read_mem = lambda pa, n: mem[pa:pa + n]      # noqa: E731
    v = Vmcb(msrpm_base_pa=MSRPM, intercept_word3=1 << 28)
    kind = Kind.WRMSR if write else Kind.RDMSR
    d = R.decide(Event(kind, 0, 0x1000, Insn(kind, 2, "msr"), regs=_regs(rcx=query)), v, read_mem)
    covered = any(first <= query < first + 0x2000 for first, _ in RANGES)
    expect = (not covered) or query in (writes if write else reads)
    assert d.exit == expect
    if d.exit:
        assert d.code == 0x7C and d.exit_info_1 == (1 if write else 0)


@settings(max_examples=150, deadline=None)
@given(ports=st.sets(st.integers(0, 0x10002), max_size=30),
       port=st.one_of(st.integers(0, 0xFFFF), st.integers(0xFFF0, 0xFFFF)),
       size=st.sampled_from([1, 2, 4]))
def test_iopm_matches_the_reference(ports, port, size):
    iopm = bytearray(12 << 10)
    for p in ports:
        iopm[p // 8] |= 1 << (p % 8)
    mem = bytes(IOPM) + bytes(iopm)
    read_mem = lambda pa, n: mem[pa:pa + n]      # noqa: E731
    v = Vmcb(iopm_base_pa=IOPM, intercept_word3=1 << 27)
    d = R.decide(Event(Kind.IN, 0, 0x1000, Insn(Kind.IN, 1, "in", io_size=size), port=port,
                       regs=_regs()), v, read_mem)
    touched = set(range(port, port + size))          # past 0xFFFF: no wrap
    assert d.exit == bool(touched & ports)


SIMPLE = {Kind.CPUID: "INTERCEPT_CPUID", Kind.HLT: "INTERCEPT_HLT", Kind.INVD: "INTERCEPT_INVD",
          Kind.RDPMC: "INTERCEPT_RDPMC", Kind.WBINVD: "INTERCEPT_WBINVD",
          Kind.XSETBV: "INTERCEPT_XSETBV", Kind.LGDT: "INTERCEPT_LOAD_GDTR",
          Kind.SIDT: "INTERCEPT_STORE_IDTR", Kind.IRET: "INTERCEPT_IRET",
          Kind.VMLOAD: "INTERCEPT_VMLOAD", Kind.STGI: "INTERCEPT_STGI"}


@settings(max_examples=100, deadline=None)
@given(words=st.lists(st.integers(0, 0xFFFFFFFF), min_size=6, max_size=6),
       kind=st.sampled_from(sorted(SIMPLE, key=lambda k: k.value)))
def test_an_instruction_exits_exactly_when_its_bit_is_set(words, kind):
    v = Vmcb(zip(INTERCEPT_WORDS, words))
    bit = BITS[SIMPLE[kind]]
    d = R.decide(Event(kind, 0, 0x1000, Insn(kind, 3, "x"), regs=_regs(cr4=0x40020)), v,
                 lambda pa, n: bytes(n))
    assert d.exit == bool(words[bit // 32] >> (bit % 32) & 1)
