"""Options, fixtures and the pass/short report of the microbenchmarks (test_step_overhead.py)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from common import machine, write_json

COPY_BYTES = 8  # per parameter: read + write
OPS_BYTES = 28  # norm: read g; perturb: read w, g, write w, backup; restore: read backup, write w
TARGET_BANDWIDTH = 0.70
TARGET_SPEEDUP = 1.5

_results: dict[tuple[str, str], dict] = {}


def pytest_addoption(parser):
    parser.addoption("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.addoption("--sets", default="resnet18,wrn28_10,vit", help="parameter sets, from bench/models.py")
    parser.addoption("--rounds", type=int, default=10, help="timed rounds per benchmark")
    parser.addoption("--fused-sgd", action="store_true", help="SGD(fused=True) as the base everywhere")


@pytest.fixture(scope="session")
def device(request):
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def rounds(request):
    return request.config.getoption("--rounds")


@pytest.fixture(scope="session")
def sgd(request):
    """The base SGD's arguments (momentum and weight decay, as in training)."""
    return dict(lr=0.05, momentum=0.9, weight_decay=5e-4, **({"fused": True} if request.config.getoption("--fused-sgd") else {}))


def dispatches(fn, device) -> int:
    """Kernels launched (GPU) or operators dispatched from Python (CPU) by one call of fn."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if e.cpu_parent is None and "::" in e.name)


@pytest.fixture
def record(device):
    def store(param_set, impl, seconds, fn):
        _results[(param_set, impl)] = dict(seconds=seconds, dispatches=dispatches(fn, device))

    return store


def verdict(ok: bool) -> str:
    return "pass" if ok else "SHORT"


def xsam_table(write, sets) -> list[dict]:
    """FusedXSAM's step against the per-tensor XSAM loop, as the LE-SAM table does for FusedLESAM."""
    rows = []
    for param_set in sets:
        sgd, loop = _results.get((param_set, "sgd")), _results.get((param_set, "xsam-loop"))
        backends = [impl[len("xsam-"):] for s, impl in _results if s == param_set and impl.startswith("xsam-")
                    and impl != "xsam-loop"]
        for backend in backends:
            fused = _results[(param_set, f"xsam-{backend}")]
            if not (sgd and loop):
                continue
            speedup = loop["seconds"] / fused["seconds"]
            overhead = (loop["seconds"] - sgd["seconds"]) / (fused["seconds"] - sgd["seconds"])
            rows.append(dict(set=param_set, backend=backend, loop_step_s=loop["seconds"], fused_step_s=fused["seconds"],
                             step_speedup=speedup, overhead_speedup=overhead, fused_dispatches=fused["dispatches"],
                             loop_dispatches=loop["dispatches"]))
    if rows:
        write("")
        write(f"FusedXSAM (one ascent step, fixed alpha) against the per-tensor XSAM loop; target >= {TARGET_SPEEDUP}x")
        write("| set | backend | step ms (loop) | step vs loop | overhead vs loop | dispatches / step (loop) |")
        write("| --- | --- | ---: | ---: | ---: | ---: |")
        for r in rows:
            write(f"| {r['set']} | {r['backend']} | {r['fused_step_s'] * 1e3:.2f} ({r['loop_step_s'] * 1e3:.2f}) "
                  f"| {r['step_speedup']:.2f}x {verdict(r['step_speedup'] >= TARGET_SPEEDUP)} "
                  f"| {r['overhead_speedup']:.2f}x {verdict(r['overhead_speedup'] >= TARGET_SPEEDUP)} "
                  f"| {r['fused_dispatches']} ({r['loop_dispatches']}) |")
    return rows


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _results:
        return
    device = torch.device(config.getoption("--device"))
    from models import param_shapes

    write = terminalreporter.write_line
    write("")
    base = "SGD(fused=True)" if config.getoption("--fused-sgd") else "SGD"
    write(f"Optimizer step on {device}, base {base} (median of {config.getoption('--rounds')} rounds); targets: ops >= "
          f"{TARGET_BANDWIDTH:.0%} of copy bandwidth, FusedLESAM >= {TARGET_SPEEDUP}x the per-tensor loop")
    write("| set | tensors | params | backend | ops ms | ops / copy bandwidth | step ms (loop) | step vs loop "
          "| overhead vs loop | dispatches / step (loop) |")
    write("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    report = []
    sets = list(dict.fromkeys(s for s, _ in _results))
    for param_set in sets:
        shapes = param_shapes(param_set)
        n = sum(torch.Size(s).numel() for s in shapes)
        get = lambda impl: _results.get((param_set, impl))  # noqa: E731
        copy, sgd, loop = get("copy"), get("sgd"), get("loop")
        backends = [impl[len("fused-"):] for s, impl in _results if s == param_set and impl.startswith("fused-")]
        for backend in backends:
            ops, fused = get(f"ops-{backend}"), get(f"fused-{backend}")
            if not (copy and sgd and loop and ops and fused):
                continue
            bandwidth = COPY_BYTES * n / copy["seconds"]
            fraction = OPS_BYTES * n / bandwidth / ops["seconds"]
            speedup = loop["seconds"] / fused["seconds"]
            overhead = (loop["seconds"] - sgd["seconds"]) / (fused["seconds"] - sgd["seconds"])
            row = dict(set=param_set, tensors=len(shapes), params=n, backend=backend, copy_s=copy["seconds"],
                       ops_s=ops["seconds"], ops_bandwidth_fraction=fraction, sgd_s=sgd["seconds"],
                       loop_step_s=loop["seconds"], fused_step_s=fused["seconds"], step_speedup=speedup,
                       overhead_speedup=overhead, fused_dispatches=fused["dispatches"],
                       loop_dispatches=loop["dispatches"])
            report.append(row)
            write(f"| {param_set} | {len(shapes)} | {n / 1e6:.1f}M | {backend} | {ops['seconds'] * 1e3:.2f} "
                  f"| {fraction:.0%} {verdict(fraction >= TARGET_BANDWIDTH)} "
                  f"| {fused['seconds'] * 1e3:.2f} ({loop['seconds'] * 1e3:.2f}) "
                  f"| {speedup:.2f}x {verdict(speedup >= TARGET_SPEEDUP)} "
                  f"| {overhead:.2f}x {verdict(overhead >= TARGET_SPEEDUP)} "
                  f"| {fused['dispatches']} ({loop['dispatches']}) |")
    write("(overhead = step - SGD step alone: the sharpness-aware part. dispatches: on the CPU the operators "
          "called from Python outside the base optimizer's step, on the GPU the kernels the whole step launches)")
    xsam_report = xsam_table(write, sets)
    path = write_json("step_overhead.json", dict(machine=machine(device), rows=report, xsam_rows=xsam_report,
                                                 raw={f"{s}/{i}": r for (s, i), r in _results.items()}))
    write(f"wrote {path}")
