"""What VM exits would cost on real hardware: an estimate, beside virtual time.

Virtual time in devirt-emu is exact and simple: one retired instruction is one
nanosecond (a PAUSE 140), and a VM exit costs the guest no virtual time at all.
That keeps runs deterministic, but it also means ``stock`` and ``devirt`` report
the same time for a guest whose exit counts differ by a factor of thirty.  This
module gives the missing number as an *estimate*, never mixed into virtual
time: each VM exit costs the hardware's round trip (VM exit plus VM entry) plus
KVM's handler for its reason, and a guest under EPT pays a two-dimensional page
walk where the native guest pays a one-dimensional one.

The model is a table (:data:`DEFAULT_ROWS`); each row says where its number
comes from.  Rows marked ``assumption`` are round figures of this model, not
measurements: override them (``CostModel.from_json`` / ``--cost-model FILE``
with ``{"rows": {"NAME": {"ns": N, "source": "..."}}, "memory_bound_fraction": F}``)
with numbers measured on the host you care about.

Row names: ``transition`` (the hardware's VM exit plus VM entry, every exit
pays it); ``handler:REASON`` (KVM's work for a basic exit reason, by its Linux
name); ``handler:default`` (a reason with no row of its own); and the three
cache-line latencies KVM-devirt published (``latency:native``,
``latency:devirt``, ``latency:ept``), which give the cost of a memory access that
misses the TLB with and without the second translation stage.

How the memory rows are used: a configuration with EPT on (``stock``, and
``apicv``) is charged ``memory_bound_fraction * instructions * (latency:ept /
latency:native - 1)`` ns; ``devirt`` (no EPT in steady state) ``latency:devirt /
latency:native - 1`` per such instruction.  ``memory_bound_fraction`` is the
share of instructions whose time is a TLB-missing memory access; it is 0 by
default (the bundled guests are not memory-bound) and is a knob, not a fact.

The run's estimate (:meth:`CostModel.estimate`): the exit cost of each core
summed; the estimated run time is virtual time plus the largest per-core exit
cost plus the memory term (cores that wait on each other's exits, as in a
ping-pong, make it a lower bound).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

#: SplitX (Landau, Ben-Yehuda, Gordon, WIOV 2011), section 2: the direct cost of
#: an exit (the world switch both ways) is 2,000 cycles on a Xeon X5570 at 2.93 GHz
#: with KVM (Linux 2.6.34, EPT and VPID on).
_SPLITX = "SplitX (Landau et al., WIOV 2011): direct cost of an exit 2,000 cycles, Xeon X5570 2.93 GHz"
_DEVIRT = "KVM-devirt's published cache-line latency"
_ASSUME = "assumption: round figure of this model, override with a measurement"


@dataclass(frozen=True)
class CostRow:
    """One row of the cost table: a cost in nanoseconds and where it comes from."""

    name: str
    ns: float
    source: str


DEFAULT_ROWS: tuple[CostRow, ...] = (
    CostRow("transition", round(2000 / 2.93), _SPLITX),
    CostRow("handler:default", 200, _ASSUME),
    CostRow("handler:CPUID", 100, _ASSUME + " (KVM's cpuid table lookup)"),
    CostRow("handler:MSR_READ", 150, _ASSUME),
    CostRow("handler:MSR_WRITE", 300, _ASSUME + " (x2APIC ICR: kvm_apic_send_ipi and a kick)"),
    CostRow("handler:EXTERNAL_INTERRUPT", 300, _ASSUME + " (the host's handler, then injection)"),
    CostRow("handler:INTERRUPT_WINDOW", 100, _ASSUME),
    CostRow("handler:HLT", 2000, _ASSUME + " (kvm_vcpu_block: schedule out and back in)"),
    CostRow("handler:IO_INSTRUCTION", 5000, _ASSUME + " (an exit to the user-space VMM)"),
    CostRow("handler:EPT_VIOLATION", 1000, _ASSUME + " (a TDP fault that maps a page)"),
    CostRow("handler:CR_ACCESS", 150, _ASSUME),
    CostRow("handler:APIC_ACCESS", 1500, _ASSUME + " (the instruction emulator)"),
    CostRow("handler:APIC_WRITE", 300, _ASSUME),
    CostRow("handler:EOI_INDUCED", 200, _ASSUME),
    CostRow("latency:native", 9.32, _DEVIRT + ", host"),
    CostRow("latency:devirt", 9.35, _DEVIRT + ", devirtualized guest"),
    CostRow("latency:ept", 14.3, _DEVIRT + ", VM with 4 KiB EPT"),
)

#: Configurations whose steady state runs with EPT on (the two-dimensional walk).
EPT_CONFIGS = frozenset({"stock", "apicv"})


class CostModelError(ValueError):
    """A cost-model file that cannot be used (one line, for the CLI)."""


@dataclass
class Estimate:
    """A run's estimated cost (ns; an estimate, never virtual time)."""

    exit_ns_per_core: list[float]
    exit_ns_by_reason: dict[str, float]
    memory_ns: float
    virtual_ns: int

    @property
    def exit_ns(self) -> float:
        return sum(self.exit_ns_per_core)

    @property
    def estimated_ns(self) -> float:
        """Virtual time plus the busiest core's exit cost plus the memory term."""
        return self.virtual_ns + max(self.exit_ns_per_core, default=0.0) + self.memory_ns

    def to_json(self) -> dict:
        return {"exit_ns": round(self.exit_ns, 1),
                "exit_ns_per_core": [round(x, 1) for x in self.exit_ns_per_core],
                "exit_ns_by_reason": {k: round(v, 1) for k, v in self.exit_ns_by_reason.items()},
                "memory_ns": round(self.memory_ns, 1),
                "estimated_ns": round(self.estimated_ns, 1)}


@dataclass
class CostModel:
    """The cost table (see the module docstring); ``rows`` by name."""

    rows: dict[str, CostRow] = field(
        default_factory=lambda: {r.name: r for r in DEFAULT_ROWS})
    memory_bound_fraction: float = 0.0

    @classmethod
    def from_json(cls, path: str | Path) -> "CostModel":
        """The default table with a JSON file's rows and knob laid over it."""
        try:
            data = json.loads(Path(path).read_text())
        except OSError as e:
            raise CostModelError(f"cannot read cost model {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise CostModelError(f"cost model {path} is not JSON: {e.msg} (line {e.lineno})") \
                from None
        if not isinstance(data, dict):
            raise CostModelError(f"cost model {path}: expected an object")
        model = cls()
        for name, row in (data.get("rows") or {}).items():
            if not isinstance(row, dict) or not isinstance(row.get("ns"), (int, float)) \
                    or row["ns"] < 0:
                raise CostModelError(f"cost model {path}: row {name!r} needs a non-negative "
                                     "number 'ns'")
            model.rows[name] = CostRow(name, float(row["ns"]), str(row.get("source", "user")))
        f = data.get("memory_bound_fraction", 0.0)
        if not isinstance(f, (int, float)) or not 0 <= f <= 1:
            raise CostModelError(f"cost model {path}: memory_bound_fraction must be in [0, 1]")
        model.memory_bound_fraction = float(f)
        return model

    def ns(self, name: str) -> float:
        return self.rows[name].ns

    def exit_cost(self, reason: str) -> float:
        """One VM exit of basic reason ``reason`` (a Linux name): transition plus handler."""
        row = self.rows.get(f"handler:{reason}") or self.rows["handler:default"]
        return self.ns("transition") + row.ns

    def latency_factor(self, config: str | None) -> float:
        """A TLB-missing access's cost in ``config`` over its cost natively."""
        if config is None or config == "native":
            return 1.0
        key = "latency:ept" if config in EPT_CONFIGS else "latency:devirt"
        return self.ns(key) / self.ns("latency:native")

    def estimate(self, result, exits_per_core: list[dict[str, int]] | None = None) -> Estimate:
        """The estimate for a RunResult.  ``exits_per_core`` (reason -> count per
        core; default the result's ``exit_counts_per_core``) splits the exit cost
        by core; with neither, it is spread over the cores evenly."""
        counts = result.exit_counts
        by_reason = {k: n * self.exit_cost(k) for k, n in counts.items()}
        cores = max(1, result.cores)
        if exits_per_core is None:
            exits_per_core = getattr(result, "exit_counts_per_core", None) or None
        if exits_per_core is None:
            total = sum(by_reason.values())
            per_core = [total / cores] * cores
        else:
            per_core = [sum(n * self.exit_cost(k) for k, n in c.items()) for c in exits_per_core]
        config = result.config if result.arch != "none" else None
        memory = self.memory_bound_fraction * sum(result.instructions) \
            * (self.latency_factor(config) - 1.0)
        return Estimate(per_core, by_reason, memory, result.virtual_ns)

    def table(self) -> list[dict]:
        """The rows, for --json and the docs."""
        return [{"name": r.name, "ns": r.ns, "source": r.source} for r in self.rows.values()]
