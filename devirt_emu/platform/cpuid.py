"""CPUID of the modelled CPU (one table of leaves).

A Skylake-server-like Intel core, trimmed to what the platform really
implements: x2APIC and the TSC-deadline timer are advertised, and so are
4-MiB pages (PSE) and PSE-36, which Unicorn's walker and the platform's
(:mod:`devirt_emu.platform.paging`) both implement; VMX is not
(natively the VMX instructions raise #UD until guest hypervisors land),
nor XSAVE, MONITOR/MWAIT, PCID/INVPCID or performance counters, whose
instructions raise #UD/#GP here.  Leaf 0xB reports the x2APIC topology
(one thread per core, ``ncores`` cores).
"""
from __future__ import annotations


from .lapic import MAXPHYADDR  # physical-address width, one value for the whole platform

#: Linear-address width (CPUID 0x80000008 EAX[15:8]): 4-level paging.
LINEAR_BITS = 48

_VENDOR = (0x756E6547, 0x6C65746E, 0x49656E69)  # "Genu", "ntel", "ineI" as EBX, ECX, EDX

# leaf 1
_EAX1 = 0x00050654                      # family 6, model 0x55, stepping 4
_ECX1 = ((1 << 0) | (1 << 9) | (1 << 13) | (1 << 19) | (1 << 20) | (1 << 21)
         | (1 << 23) | (1 << 24))       # SSE3 SSSE3 CX16 SSE4.1 SSE4.2 x2APIC POPCNT TSC-DEADLINE
_EDX1 = ((1 << 0) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 8) | (1 << 9) | (1 << 11)
         | (1 << 13) | (1 << 15) | (1 << 16) | (1 << 17) | (1 << 19) | (1 << 23) | (1 << 24)
         | (1 << 25) | (1 << 26) | (1 << 28))  # FPU PSE TSC MSR PAE CX8 APIC SEP PGE CMOV PAT PSE-36 CLFSH MMX FXSR SSE SSE2 HTT
_EDX_EXT = (1 << 11) | (1 << 20) | (1 << 26) | (1 << 27) | (1 << 29)  # SYSCALL NX 1GB RDTSCP LM


def cpuid(leaf: int, subleaf: int, apic_id: int, ncores: int) -> tuple[int, int, int, int]:
    """(EAX, EBX, ECX, EDX) for CPUID.leaf.subleaf on the core with ``apic_id``."""
    leaf &= 0xFFFFFFFF
    if leaf == 0:
        return (0xB, *_VENDOR)
    if leaf == 1:
        ebx = (apic_id & 0xFF) << 24 | (min(ncores, 255) << 16) | (8 << 8)
        return (_EAX1, ebx, _ECX1, _EDX1)
    if leaf == 0xB:
        shift = max(1, (ncores - 1).bit_length())
        if subleaf == 0:
            return (0, 1, 0x100, apic_id)
        if subleaf == 1:
            return (shift, ncores, 0x201, apic_id)
        return (0, 0, subleaf & 0xFF, apic_id)
    if leaf == 0x80000000:
        return (0x80000008, 0, 0, 0)
    if leaf == 0x80000001:
        return (0, 0, 1, _EDX_EXT)
    if leaf == 0x80000008:
        return (LINEAR_BITS << 8 | MAXPHYADDR, 0, 0, 0)
    return (0, 0, 0, 0)
