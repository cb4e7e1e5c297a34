"""Options, fixtures and the report of the step microbenchmark (test_step_overhead.py); the
arithmetic and the tables are bench/report.py's."""

from __future__ import annotations

import pytest
import report
import torch
from common import machine, sync, write_json
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

import fused_lesam

# (set, base) -> the group's report (bench/report.py group_report), in the order they ran
_reports: dict[tuple[str, str], dict] = {}


def pytest_addoption(parser):
    parser.addoption("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.addoption("--sets", default="resnet18,vit_s16,many600", help="parameter sets, from bench/models.py")
    parser.addoption("--bases", default="sgd,adamw", help="base optimizers: sgd, adamw")
    parser.addoption(
        "--backends",
        default="all",
        help='kernel backends of the ours-<backend> rows: "all" usable ones, or a list ("auto": the default)',
    )
    parser.addoption("--rounds", type=int, default=7, help="interleaved rounds; the median is reported")
    parser.addoption("--steps", type=int, default=20, help="timed steps per round and row")
    parser.addoption("--warmup", type=int, default=2, help="untimed steps per row before the first round")


def _option_fixture(option):
    @pytest.fixture(scope="session", name=option.lstrip("-"))
    def fixture(request):
        return request.config.getoption(option)

    return fixture


rounds, steps, warmup = (_option_fixture(option) for option in ("--rounds", "--steps", "--warmup"))


@pytest.fixture(scope="session")
def device(request):
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def backends(request, device):
    from test_step_overhead import kernel_backends

    return kernel_backends(device, request.config.getoption("--backends"))


class _PythonCalls(TorchFunctionMode):
    """Counts the torch functions and Tensor methods called from Python (the calls they make inside
    are not seen); reads and writes of Tensor attributes such as ``.grad`` and ``.data`` aside."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") not in ("__get__", "__set__"):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def counted(fn, device) -> dict:
    """One call of fn: on a GPU the kernels it launched (profiler), on a CPU the operators it called
    from Python, the base optimizer's step included (a torch function mode: cheaper than the
    profiler's event tree, which takes seconds for a loop over 600 tensors)."""
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
        return dict(launches=sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))
    with _PythonCalls() as mode:
        fn()
    return dict(dispatches=mode.calls)


@pytest.fixture
def record(device):
    def store(param_set, base, tensors, params, rows, seconds, extras):
        figures = {
            name: {
                **report.spread(seconds[name]),
                **(counted(fn, device) if name != "copy" else {}),
                **extras.get(name, {}),
            }
            for name, fn in rows.items()
        }
        default = resolve_default(device)
        _reports[(param_set, base)] = report.group_report(param_set, base, tensors, params, figures, default)

    return store


def resolve_default(device) -> str:
    from fused_lesam.backends import resolve

    return resolve("auto", device).NAME


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _reports:
        return
    device = torch.device(config.getoption("--device"))
    reports = list(_reports.values())
    write = terminalreporter.write_line
    write("")
    write(
        f"Optimizer step on {device} ({machine(device)['cpu']}, {torch.get_num_threads()} threads), "
        f"fused_lesam from {fused_lesam.__file__}"
    )
    for line in report.format_tables(reports, config.getoption("--rounds"), config.getoption("--steps")):
        write(line)
    write(report.summary_line(reports))
    path = write_json(
        "step_overhead.json",
        dict(
            machine=machine(device),
            fused_lesam_path=fused_lesam.__file__,
            rounds=config.getoption("--rounds"),
            steps=config.getoption("--steps"),
            warmup=config.getoption("--warmup"),
            ideal_bytes_per_param=report.IDEAL_BYTES,
            copy_bytes_per_param=report.COPY_BYTES,
            groups=reports,
            launches_independent_of_tensors=report.launches_independent_of_tensors(reports),
        ),
    )
    write(f"wrote {path}")
