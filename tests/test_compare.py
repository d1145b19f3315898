"""`devirt-emu compare`, the cost model and `--timeline`.

compare runs each configuration as `run` does, so its numbers must be the
individual runs' numbers; the timeline must be trace-event JSON (the Trace Event
Format: a `traceEvents` list of objects with `ph`, `pid`, `tid`, `ts` in
microseconds, `dur` for complete events, `M` metadata naming the tracks, `b`/`e`
async pairs) with one thread track per core."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from devirt_emu.compare import configurations
from devirt_emu.costmodel import DEFAULT_ROWS, CostModel, CostModelError
from devirt_emu.machine import RunResult

ROOT = Path(__file__).resolve().parent.parent
IPI = ROOT / "guest_tests" / "ipi_pingpong.S"
HELLO = ROOT / "guest_tests" / "hello.S"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "devirt_emu", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    p = cli("compare", IPI, "--cores", "2", "--json", "--plot", d / "plot.png",
            "--timeline", d / "tl.json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout), d


def test_compare_numbers_are_the_individual_runs(compared):
    data, _ = compared
    assert list(data["configs"])[:1] == ["native"]
    assert {"stock", "devirt"} <= set(data["configs"])
    for name, got in data["configs"].items():
        args = ["run", IPI, "--cores", "2", "--json", "--exit-records", "0"]
        if name != "native":
            args += ["--arch", "vmx", "--config", name]
        p = cli(*args)
        assert p.returncode == 0, p.stderr
        one = json.loads(p.stdout)
        for key in ("verdict", "serial", "instructions", "virtual_ns", "exit_counts",
                    "window_exit_counts", "markers", "events"):
            assert got[key] == one[key], (name, key)
        exits = sum(one["exit_counts"].values())
        assert got["exits_per_minsn"] == pytest.approx(exits * 1e6 / sum(one["instructions"]))


def test_compare_estimate_follows_the_cost_table(compared):
    data, _ = compared
    rows = {r["name"]: r["ns"] for r in data["cost_model"]}
    native = data["configs"]["native"]
    assert native["estimate"]["exit_ns"] == 0
    assert native["estimate"]["estimated_ns"] == native["virtual_ns"]
    for name in ("stock", "devirt"):
        c = data["configs"][name]
        want = sum(n * (rows["transition"] + rows.get(f"handler:{k}", rows["handler:default"]))
                   for k, n in c["exit_counts"].items())
        assert c["estimate"]["exit_ns"] == pytest.approx(want, abs=1)
        # estimated time: virtual time plus the busiest core's exit cost (no memory term)
        win = sum(n * (rows["transition"] + rows.get(f"handler:{k}", rows["handler:default"]))
                  for k, n in c["window_exit_counts"].items())
        assert c["estimate"]["window_exit_ns"] == pytest.approx(win, abs=1)
        busiest = max(c["estimate"]["exit_ns_per_core"])
        assert c["estimate"]["estimated_ns"] == pytest.approx(c["virtual_ns"] + busiest, abs=1)
    # the devirt set removes the ping-pong's exits from the steady state
    assert sum(data["configs"]["devirt"]["window_exit_counts"].values()) == 0
    assert sum(data["configs"]["stock"]["window_exit_counts"].values()) > 1000
    assert data["configs"]["stock"]["estimated_overhead"] \
        > data["configs"]["devirt"]["estimated_overhead"] > 0


def test_compare_writes_png_and_svg(compared):
    _, d = compared
    png, svg = d / "plot.png", d / "plot.svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in svg.read_bytes()[:2000]


def check_trace_events(doc, cores_per_pid):
    """The Trace Event Format's rules this file uses."""
    events = doc["traceEvents"]
    assert isinstance(events, list) and events
    tracks = {}
    open_spans = {}
    for e in events:
        assert e["ph"] in ("X", "i", "b", "e", "M"), e
        assert isinstance(e["pid"], int) and isinstance(e["name"], str)
        if e["ph"] == "M":
            if e["name"] == "thread_name":
                tracks.setdefault(e["pid"], set()).add(e["tid"])
            continue
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        assert e["tid"] in range(cores_per_pid[e["pid"]])
        if e["ph"] == "X":
            assert e["dur"] > 0
        if e["ph"] == "i":
            assert e["s"] in ("t", "p", "g")
        if e["ph"] == "b":
            open_spans[(e["pid"], e["cat"], e["id"])] = e["ts"]
        if e["ph"] == "e":
            assert open_spans.pop((e["pid"], e["cat"], e["id"])) <= e["ts"]
    for pid, n in cores_per_pid.items():
        assert tracks[pid] == set(range(n))
    # slices on one track never overlap (timestamps are estimated time)
    for pid in cores_per_pid:
        for tid in range(cores_per_pid[pid]):
            xs = sorted((e["ts"], e["dur"]) for e in events
                        if e["ph"] == "X" and e["pid"] == pid and e.get("tid") == tid)
            for (t0, d0), (t1, _) in zip(xs, xs[1:]):
                assert t0 + d0 <= t1 + 1e-6


def test_compare_timeline_is_trace_event_json(compared):
    data, d = compared
    doc = json.loads((d / "tl.json").read_text())
    check_trace_events(doc, {n + 1: 2 for n in range(len(data["configs"]))})
    names = {e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == set(data["configs"])
    # one slice per VM exit, named by reason, per configuration
    for n, (name, c) in enumerate(data["configs"].items()):
        got = {}
        for e in doc["traceEvents"]:
            if e["ph"] == "X" and e["pid"] == n + 1:
                got[e["name"]] = got.get(e["name"], 0) + 1
        assert got == c["exit_counts"], name


def test_run_timeline_one_track_per_core(tmp_path):
    out = tmp_path / "run.json"
    p = cli("run", IPI, "--cores", "3", "--arch", "vmx", "--config", "stock", "--timeline", out)
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    check_trace_events(doc, {1: 3})
    evs = doc["traceEvents"]
    # the native IPIs of the ping-pong: every core sends and every core takes interrupts
    p = cli("run", IPI, "--cores", "3", "--timeline", out)
    assert p.returncode == 0, p.stderr
    evs = json.loads(out.read_text())["traceEvents"]
    assert {e["tid"] for e in evs if e["ph"] == "i" and e["cat"] == "ipi"} == {0, 1, 2}
    assert {e["tid"] for e in evs if e["ph"] == "i" and e["cat"] == "interrupt"} == {0, 1, 2}
    assert [e["ph"] for e in evs if e["ph"] in "be" and e["tid"] == 0] == ["b", "e"]


def test_cost_model_rows_have_sources():
    for r in DEFAULT_ROWS:
        assert r.ns >= 0 and r.source
    m = CostModel()
    # KVM-devirt's published latencies: host 9.32 ns, devirtualized guest 9.35, 4 KiB EPT 14.3
    assert m.latency_factor("native") == 1.0
    assert m.latency_factor("devirt") == pytest.approx(9.35 / 9.32)
    assert m.latency_factor("stock") == pytest.approx(14.3 / 9.32)
    assert m.exit_cost("CPUID") == m.ns("transition") + m.ns("handler:CPUID")
    assert m.exit_cost("NO_SUCH_REASON") == m.ns("transition") + m.ns("handler:default")


def test_cost_model_file_and_memory_term(tmp_path):
    f = tmp_path / "cost.json"
    f.write_text(json.dumps({"rows": {"transition": {"ns": 1000, "source": "mine"},
                                      "handler:CPUID": {"ns": 0}},
                             "memory_bound_fraction": 0.5}))
    m = CostModel.from_json(f)
    assert m.exit_cost("CPUID") == 1000
    res = RunResult(verdict="pass", serial="", cores=1, instructions=[1000], virtual_ns=1000,
                    events={}, wall_s=1, exit_status=0, arch="vmx", config="stock",
                    exit_counts={"CPUID": 2}, exit_counts_per_core=[{"CPUID": 2}])
    est = m.estimate(res)
    assert est.exit_ns == 2000
    assert est.memory_ns == pytest.approx(0.5 * 1000 * (14.3 / 9.32 - 1))
    assert est.estimated_ns == pytest.approx(1000 + 2000 + est.memory_ns)
    f.write_text(json.dumps({"rows": {"transition": {"ns": -1}}}))
    with pytest.raises(CostModelError):
        CostModel.from_json(f)


def test_compare_bad_input_is_one_line(tmp_path):
    for args in (("compare", tmp_path / "none.S"),
                 ("compare", HELLO, "--arch", "svm", "--cpu", "skylake-server"),  # no SVM
                 ("compare", HELLO, "--cost-model", tmp_path / "missing.json"),
                 ("compare", HELLO, "--plot", tmp_path / "no" / "dir.png")):
        p = cli(*args)
        assert p.returncode == 2, args
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("devirt-emu: error: "), p.stderr


def test_compare_text_table():
    p = cli("compare", HELLO)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split()[:2] == ["config", "verdict"]
    names = [label for label, _ in configurations()]
    assert names[0] == "native" and {"stock", "devirt"} <= set(names)
    assert [ln.split()[0] for ln in lines[2:2 + len(names)]] == names
    assert all(ln.split()[1] == "pass" for ln in lines[2:2 + len(names)])
    assert "estimated by the cost model" in p.stdout


@pytest.mark.parametrize("arch, want", [
    ("svm", ["native", "stock", "devirt"]),
    ("both", ["native", "vmx stock", "vmx apicv", "vmx devirt", "svm stock", "svm devirt"]),
])
def test_compare_svm_and_both(arch, want):
    p = cli("compare", HELLO, "--arch", arch, "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert list(d["configs"]) == want and d["arch"] == arch
    svm = [n for n in want if n in ("stock", "devirt") and arch == "svm" or n.startswith("svm ")]
    for n in want:
        c = d["configs"][n]
        assert c["verdict"] == "pass"
        if n in svm:
            assert c["arch"] == "svm" and c["cpu"] == "epyc-rome"
        elif n != "native":
            assert c["arch"] == "vmx" and c["cpu"] == "skylake-server"
    # each SVM configuration's numbers are those of its own run
    run = cli("run", HELLO, "--arch", "svm", "--config", "devirt", "--json")
    one = json.loads(run.stdout)
    name = "devirt" if arch == "svm" else "svm devirt"
    assert d["configs"][name]["exit_counts"] == one["exit_counts"]
    assert d["configs"][name]["instructions"] == one["instructions"]
