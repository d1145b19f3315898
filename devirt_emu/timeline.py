"""A run as a Chrome trace-event file (``--timeline FILE``), for Perfetto or chrome://tracing.

One process per run (named by its configuration), one thread track per core
(``tid`` = core index).  On a core's track:

* every VM exit is a complete slice (``ph: "X"``) named by its basic exit reason,
  as long as the cost model says that exit costs (:mod:`devirt_emu.costmodel`);
* every interrupt the core takes through its IDT without an exit is an instant
  event (``ph: "i"``) ``interrupt 0xNN``; every IPI it sends to another core an
  instant ``IPI -> core N`` (an interrupt the L0 injects is inside its exits'
  slices, not an instant of its own);
* its steady-state windows are async spans (``ph: "b"``/``"e"``, category
  ``steady-state``) of the process.

Timestamps are *estimated* time in microseconds: a core's virtual time (one
instruction per ns) plus the estimated cost of the exits it took before, so
that the slices do not overlap.  Each event's ``args.virtual_ns`` holds its
virtual time itself.
"""
from __future__ import annotations

import json

from .costmodel import CostModel
from .events import Kind

_VM_EXIT, _INTERRUPT = Kind.VM_EXIT, Kind.INTERRUPT
_BEGIN, _END = Kind.MARKER_BEGIN, Kind.MARKER_END


class Timeline:
    """Collects one run's trace events: install :meth:`trace` as the machine's
    trace callback, then :meth:`attach` the machine before it runs."""

    def __init__(self, cost: CostModel | None = None, label: str = "native", pid: int = 1):
        self.cost = cost or CostModel()
        self.label, self.pid = label, pid
        self.events: list[dict] = []
        self._offset: dict[int, float] = {}        # core -> estimated ns of its exits so far

    def attach(self, machine) -> None:
        """Name the tracks and watch the APIC bus for IPIs between cores."""
        self.events.append({"ph": "M", "name": "process_name", "pid": self.pid,
                            "args": {"name": self.label}})
        for c in machine.cores:
            self._offset[c.index] = 0.0
            self.events.append({"ph": "M", "name": "thread_name", "pid": self.pid,
                                "tid": c.index, "args": {"name": f"core {c.index}"}})
        previous = machine.bus.on_deliver

        def on_deliver(apic_id: int) -> None:
            src = machine.current
            if src is not None and apic_id < len(machine.cores):
                self._ipi(src, apic_id)
            if previous is not None:
                previous(apic_id)
        machine.bus.on_deliver = on_deliver

    def _ts(self, core, ns: int) -> float:
        return (ns + self._offset.get(core.index, 0.0)) / 1000.0

    def _ipi(self, src, target: int) -> None:
        ns = src.now()
        self.events.append({"ph": "i", "s": "t", "pid": self.pid, "tid": src.index,
                            "ts": self._ts(src, ns), "name": f"IPI -> core {target}",
                            "cat": "ipi", "args": {"virtual_ns": ns, "target": target}})

    def trace(self, core, event) -> None:
        """The machine's trace callback (see Machine's ``trace``)."""
        kind = event.kind
        if kind is _VM_EXIT:
            ns = core.now()
            name = event.extra.get("name", "VM_EXIT")
            dur = self.cost.exit_cost(name)
            self.events.append({"ph": "X", "pid": self.pid, "tid": core.index,
                                "ts": self._ts(core, ns), "dur": dur / 1000.0, "name": name,
                                "cat": "vm-exit",
                                "args": {"virtual_ns": ns,
                                         "qualification": event.extra.get("qualification", 0),
                                         "estimated_ns": dur}})
            self._offset[core.index] = self._offset.get(core.index, 0.0) + dur
        elif kind is _INTERRUPT:
            ns = core.now()
            vec = event.vector if event.vector is not None else 0
            self.events.append({"ph": "i", "s": "t", "pid": self.pid, "tid": core.index,
                                "ts": self._ts(core, ns), "name": f"interrupt {vec:#x}",
                                "cat": "interrupt", "args": {"virtual_ns": ns, "vector": vec}})
        elif kind is _BEGIN or kind is _END:
            ns = core.now()
            self.events.append({"ph": "b" if kind is _BEGIN else "e", "pid": self.pid,
                                "tid": core.index, "ts": self._ts(core, ns),
                                "id": f"{self.pid}.{core.index}", "cat": "steady-state",
                                "name": f"steady state core {core.index}",
                                "args": {"virtual_ns": ns}})


def write(path, timelines: list[Timeline]) -> None:
    """Write the runs as one trace-event JSON object file."""
    events = [e for t in timelines for e in t.events]
    doc = {"traceEvents": events, "displayTimeUnit": "ns",
           "otherData": {"generator": "devirt-emu",
                         "time": "estimated: virtual time plus the cost model's exit costs"}}
    with open(path, "w") as f:
        json.dump(doc, f)
