"""CPUID of the modelled CPU: the selected CPU model's table.

The leaves are data in each model (``devirt_emu/cpumodels/``, e.g.
``skylake_server.py``); :func:`cpuid` answers for one core of a machine,
filling in the per-core fields (APIC ID, logical-processor count, the x2APIC
topology of leaf 0xB: one thread per core, ``ncores`` cores).  What a model
advertises is trimmed to what the platform implements: x2APIC and the
TSC-deadline timer (on parts that have them), 4-MiB pages (PSE) and PSE-36,
which Unicorn's walker and the platform's (:mod:`devirt_emu.platform.paging`)
both implement, MONITOR/MWAIT (:mod:`devirt_emu.platform.monitor`, leaf 5),
PCID and INVPCID (:mod:`devirt_emu.platform.pcid`) on the parts that have
them; not VMX (natively the VMX instructions raise #UD until guest
hypervisors land), nor XSAVE or performance counters, whose instructions
raise #UD/#GP here.
"""
from __future__ import annotations

from devirt_emu.cpumodels import get_model

_DEFAULT = get_model(None)

#: The default model's physical- and linear-address widths (CPUID 0x80000008
#: EAX[7:0] and [15:8]); a machine's are ``machine.cpu.maxphyaddr`` / ``.linear_bits``.
MAXPHYADDR = _DEFAULT.maxphyaddr
LINEAR_BITS = _DEFAULT.linear_bits


def cpuid(leaf: int, subleaf: int, apic_id: int, ncores: int, model=None) -> tuple[int, int, int, int]:
    """(EAX, EBX, ECX, EDX) for CPUID.leaf.subleaf on the core with ``apic_id``
    of a machine with ``ncores`` cores, on ``model`` (a CpuModel, a spec string
    or None for the default model)."""
    return get_model(model).cpuid_for(leaf, subleaf, apic_id, ncores)
