"""The benchmark suite's own logic: the CIFAR-100 reader, the epoch-time table, the radius dynamics
run and the step microbenchmark, on tiny settings (their timings are not checked, only what they
compute and write), and the step microbenchmark's report arithmetic on made-up timings."""

import copy
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import baselines
import epoch_time
import models
import numpy as np
import pytest
import radius_dynamics
import report
import test_step_overhead
import torch
from common import CIFAR_MEAN, CIFAR_STD, Batches
from helpers.asserts import assert_close
from helpers.models import SmallConvNet, make_batches, sam_step
from models import param_shapes

import fused_lesam
from fused_lesam import FusedLESAM, FusedSAM, FusedXSAM


@pytest.fixture(autouse=True)
def results_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_LESAM_BENCH_RESULTS", str(tmp_path))
    return tmp_path


def write_fake_cifar(root, n=20):
    folder = root / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    data = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"fine_labels": list(range(n))}
    with open(folder / "train", "wb") as f:
        pickle.dump(data, f)
    return data


def test_cifar_files_are_read_normalised_and_augmented(tmp_path):
    raw = write_fake_cifar(tmp_path)
    batches = Batches(str(tmp_path), batch=8, device=torch.device("cpu"), channels_last=False)
    assert not batches.synthetic and "CIFAR-100 from" in batches.source
    assert batches.size == 20 and batches.steps_per_epoch == 3
    seen = []
    for x, y in batches.epoch():
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
        seen += y.tolist()
    assert sorted(seen) == raw[b"fine_labels"]  # an epoch is a permutation of the training set
    # Normalised per channel: pixels in [0, 1] map into [-mean/std, (1 - mean)/std].
    mean, std = torch.tensor(CIFAR_MEAN).view(3, 1, 1), torch.tensor(CIFAR_STD).view(3, 1, 1)
    assert (x >= -mean / std - 1e-5).all() and (x <= (1 - mean) / std + 1e-5).all()
    assert x.std() > 0.5  # not all padding


def test_without_cifar_files_the_data_are_synthetic_and_say_so(tmp_path):
    batches = Batches(str(tmp_path), batch=8, device=torch.device("cpu"), channels_last=True)
    assert batches.synthetic and "synthetic" in batches.source
    x, y = next(batches.epoch())
    assert x.shape == (8, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert y.max() < 100


def test_epoch_table(results_in_tmp, capsys):
    results = epoch_time.main(
        ["--steps", "2", "--cycle-steps", "2", "--warmup", "0", "--batch", "4"]
        + ["--rows", "SGD,SAM (per-tensor loop),FusedLESAM (cpp)"]
    )
    assert [r["row"] for r in results] == ["SGD", "SAM (per-tensor loop)", "FusedLESAM (cpp)"]
    for r in results:
        assert r["extrapolated"] and len(r["steps_s"]) == 2
        assert r["epoch_s"] == pytest.approx(r["step_s"] * 12500)  # 50,000 images in batches of 4
        assert 0 < r["optimizer_share"] < 1
    sam = results[1]
    assert sam["vs_sam"] == 1.0 and sam["paper_epoch_s"] == 9.06
    saved = json.loads((results_in_tmp / "epoch_time.json").read_text())
    assert saved["results"][2]["row"] == "FusedLESAM (cpp)" and "torch" in saved["machine"]
    assert (results_in_tmp / "epoch_time.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "| ResNet-18 | SAM (per-tensor loop) |" in table and "(extrapolated)" in table and "synthetic" in table
    [share] = saved["optimizer_share"]  # the FusedLESAM row's share against the 1% target, with its batch
    assert share["row"] == "FusedLESAM (cpp)" and share["batch"] == 4
    assert share["share"] == results[2]["optimizer_share"] and share["ok"] == (share["share"] <= 0.01)
    assert f"ResNet-18, FusedLESAM (cpp), batch 4: optimizer share {100 * share['share']:.2f}%" in table


def test_radius_dynamics_logs_the_telemetry(results_in_tmp):
    runs = radius_dynamics.main(["--steps", "24", "--batch", "8", "--sigma", "0.15"])
    sam, lesam = runs.values()
    assert all(rho == pytest.approx(0.05) for rho in sam["rho"])
    for g, rho, sigma in zip(lesam["grad_norm"], lesam["rho"], lesam["sigma"]):
        assert rho == pytest.approx(min(sigma / g, 0.4), rel=1e-4, abs=1e-7)  # the back-solve, clipped
    assert lesam["sigma"][0] == pytest.approx(0.15) and lesam["sigma"][-1] == 0.0  # annealed to 0
    assert json.loads((results_in_tmp / "radius_dynamics.json").read_text())["config"]["steps"] == 24


def rows_of(copy_s, loop_s, loop_fused_s, ours, **extra):
    """Made-up rows of one set x base, one round each."""
    rows = {
        "copy": report.spread([copy_s]),
        "loop": report.spread([loop_s]),
        "loop-fused": report.spread([loop_fused_s]),
    }
    for backend, seconds in ours.items():
        rows[f"ours-{backend}"] = {**report.spread([seconds]), "base_update": "fused", **extra}
    return rows


def test_spread_is_median_min_max_of_the_rounds():
    assert report.spread([3.0, 1.0, 2.0, 10.0]) == dict(
        median_s=2.5, min_s=1.0, max_s=10.0, rounds_s=[3.0, 1.0, 2.0, 10.0]
    )


def test_byte_limit_fraction_and_speedups_from_made_up_timings():
    # The copy moves 8 B/param in 2 ms, so the SGD step's ideal 40 B/param takes 10 ms: 12 ms is 83%.
    r = report.group_report(
        "resnet18", "sgd", 62, 1000, rows_of(2e-3, 48e-3, 26e-3, {"cpp": 12e-3, "torch": 20e-3}), default_backend="cpp"
    )
    assert r["copy_bandwidth_gbps"] == pytest.approx(8 * 1000 / 2e-3 / 1e9)
    cpp, torch_row = r["ours"]
    assert (cpp["backend"], cpp["default"], torch_row["default"]) == ("cpp", True, False)
    assert cpp["byte_limit"] == pytest.approx(10 / 12) and torch_row["byte_limit"] == pytest.approx(0.5)
    assert cpp["vs_loop_fused"] == pytest.approx(26 / 12) and cpp["vs_loop"] == pytest.approx(4.0)
    assert cpp["verdicts"] == {"byte_limit": True, "vs_loop_fused": True}
    assert torch_row["verdicts"] == {"byte_limit": False, "vs_loop_fused": True}  # 50% of the limit, 1.3x
    # AdamW's ideal step is 48 B/param: the same times are 100% of its limit.
    adamw = report.group_report("resnet18", "adamw", 62, 1000, rows_of(2e-3, 48e-3, 26e-3, {"cpp": 12e-3}), "cpp")
    assert adamw["ours"][0]["byte_limit"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "param_set, base, loop_fused_ms, expected",
    [
        ("vit_s16", "sgd", 12.0, {"byte_limit": True, "vs_loop_fused": False}),  # 1.2x < 1.25x
        ("vit_s16", "adamw", 12.0, {"byte_limit": True, "vs_loop_fused": True}),  # 1.2x >= 1.1x
        ("resnet18", "adamw", 10.5, {"byte_limit": True, "vs_loop_fused": False}),  # 1.05x
        ("many600", "sgd", 39.0, {"vs_loop_fused": False}),  # 3.9x < 4x; no byte target
        ("many600", "adamw", 41.0, {"vs_loop_fused": True}),
        ("wrn28_10", "sgd", 1.0, {}),  # no target for this set
    ],
)
def test_pass_short_decisions(param_set, base, loop_fused_ms, expected):
    r = report.group_report(
        param_set, base, 10, 1000, rows_of(1.8e-3, 100e-3, loop_fused_ms * 1e-3, {"cpp": 10e-3}), "cpp"
    )
    assert r["ours"][0]["verdicts"] == expected


def test_gpu_launches_per_bucket_and_their_independence_of_the_tensor_count():
    few = report.group_report(
        "resnet18", "sgd", 62, 1000, rows_of(1e-3, 9e-3, 8e-3, {"cuda": 5e-3}, launches=10, buckets=2), "cuda"
    )
    many = report.group_report(
        "many600", "sgd", 600, 1000, rows_of(1e-3, 9e-3, 8e-3, {"cuda": 5e-3}, launches=7, buckets=1), "cuda"
    )
    assert few["ours"][0]["launches_per_bucket"] == 5 and few["ours"][0]["verdicts"]["launches_per_bucket"]
    assert many["ours"][0]["launches_per_bucket"] == 7 and not many["ours"][0]["verdicts"]["launches_per_bucket"]
    assert report.launches_independent_of_tensors([few, many]) == {"cuda/sgd": False}
    assert report.launches_independent_of_tensors([few, few]) == {"cuda/sgd": True}
    on_target = report.group_report(
        "many600", "sgd", 600, 1000, rows_of(1e-3, 9e-3, 8e-3, {"cuda": 5e-3}, launches=12, buckets=2), "cuda"
    )
    assert on_target["ours"][0]["verdicts"]["launches_per_bucket"]  # 6 per bucket is within the target
    assert (
        "launches_per_bucket"
        not in report.group_report("resnet18", "sgd", 62, 1000, rows_of(1e-3, 9e-3, 8e-3, {"cpp": 5e-3}), "cpp")[
            "ours"
        ][0]
    )
    lines = report.format_tables([few, many], rounds=1, steps=1)
    assert "| 5.0 pass |" in lines[-4] + lines[-3] and "7.0 SHORT" in "\n".join(lines)
    # resnet18 passes its three; many600 is 1.6x < 4x and 7 launches; and the launches differ per set
    assert report.summary_line([few, many]).endswith("(cuda): 3 pass, 3 short")


def test_report_tables_print_the_spread_and_the_verdicts():
    rows = rows_of(2e-3, 50e-3, 26e-3, {"cpp": 12e-3})
    rows["loop"] = report.spread([40e-3, 48e-3, 60e-3])
    r = report.group_report("resnet18", "sgd", 62, 11220132, rows, "cpp")
    text = "\n".join(report.format_tables([r], rounds=3, steps=20))
    assert "3 interleaved rounds of 20 timed steps" in text
    assert (
        "| resnet18 | 62 | 11.22M | SGD | 2.00 [2.00..2.00] | 48.00 [40.00..60.00] | 26.00 [26.00..26.00] "
        "| 12.00 [12.00..12.00] |" in text
    )
    assert "| resnet18 | SGD | cpp* | fused | 44.9 | 83% pass | 2.17x pass | 4.00x |" in text
    assert report.summary_line([r]) == "targets met by the default backend (cpp): 2 pass, 0 short"


def test_rounds_are_interleaved_and_rotate(monkeypatch):
    calls, clock = [], iter(range(1000))
    monkeypatch.setattr(test_step_overhead.time, "perf_counter", lambda: float(next(clock)))
    rows = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    seconds = test_step_overhead.time_interleaved(rows, torch.device("cpu"), rounds=3, steps=2, warmup=1)
    assert calls == list("abc") + list("aabbcc") + list("bbccaa") + list("ccaabb")
    assert seconds == {name: [0.5, 0.5, 0.5] for name in "abc"}  # 2 steps between two ticks: 1 tick / 2


def test_backends_to_time():
    cpu = torch.device("cpu")
    usable = [name for name, why in fused_lesam.available_backends().items() if not why and name != "triton"]
    default = fused_lesam.backends.resolve("auto", cpu).NAME
    assert test_step_overhead.kernel_backends(cpu) == usable  # Triton's interpreter is not timed
    assert test_step_overhead.kernel_backends(cpu, "auto") == [default]
    assert test_step_overhead.kernel_backends(cpu, f"torch,auto,{default}") == list(dict.fromkeys(["torch", default]))
    with pytest.raises(pytest.UsageError, match="usable here"):
        test_step_overhead.kernel_backends(cpu, "cuda")


def test_step_microbenchmark_smoke(results_in_tmp):
    bench = Path(__file__).resolve().parent.parent / "bench"
    # One thread: the run checks what the benchmark computes and writes, not its speed, and a shared
    # machine's oversubscribed OpenMP threads can make a single step take seconds.
    # The package under test, not whichever an editable install elsewhere would give a run from bench/.
    package_root = str(Path(fused_lesam.__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "FUSED_LESAM_BENCH_RESULTS": str(results_in_tmp),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([package_root, *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(bench / "test_step_overhead.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            "--sets",
            "many600",
            "--bases",
            "sgd,adamw",
            "--rounds",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=bench,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| many600 | 600 | 1.25M | SGD |" in run.stdout and "| many600 | AdamW | cpp* |" in run.stdout
    saved = json.loads((results_in_tmp / "step_overhead.json").read_text())
    assert saved["machine"]["cpu"] and saved["rounds"] == 2 and saved["fused_lesam_path"] == fused_lesam.__file__
    for group, base in zip(saved["groups"], ("sgd", "adamw")):
        assert (group["set"], group["base"], group["tensors"], group["params"]) == ("many600", base, 600, 1249800)
        rows = group["rows"]
        assert {"copy", "loop", "loop-fused", "ours-torch", "ours-cpp"} <= set(rows)
        assert all(
            len(row["rounds_s"]) == 2 and row["min_s"] <= row["median_s"] <= row["max_s"] for row in rows.values()
        )
        assert rows["ours-torch"]["base_update"] == "fused"  # the torch backend has the fused ops
        for ours in group["ours"]:
            row = rows[ours["row"]]
            assert ours["byte_limit"] == pytest.approx(
                report.IDEAL_BYTES[base] / 8 * rows["copy"]["median_s"] / row["median_s"]
            )
            assert ours["vs_loop_fused"] == pytest.approx(rows["loop-fused"]["median_s"] / row["median_s"])
            assert set(ours["verdicts"]) == {"vs_loop_fused"}
            assert row["dispatches"] > 0
        # The counter sees the loops' calls per tensor (whether ours stays O(buckets) is for the
        # optimizer's own tests to check).
        assert rows["loop"]["dispatches"] > rows["loop-fused"]["dispatches"] > 5 * 600
    assert {o["backend"] for o in saved["groups"][0]["ops"]} == {"torch", "cpp"} and not saved["groups"][1]["ops"]


def vit_s16_count(dim=384, depth=12, patch=16, image=224, classes=100):
    block = 12 * dim * dim + 13 * dim  # qkv 3d^2 + 3d, proj d^2 + d, mlp 8d^2 + 5d, two LayerNorms 4d
    tokens = (image // patch) ** 2 + 1
    return depth * block + 3 * patch * patch * dim + dim + dim + tokens * dim + 2 * dim + dim * classes + classes


@pytest.mark.parametrize(
    "name, tensors, count, millions",
    [
        ("vit_s16", 152, vit_s16_count(), 21.7),  # issue 14's ViT-S/16: 152 tensors, 21.7M
        ("many600", 600, 600 * 2083, 1.25),
    ],
)
def test_microbenchmark_parameter_sets(name, tensors, count, millions):
    shapes = param_shapes(name)
    assert len(shapes) == tensors and sum(math.prod(s) for s in shapes) == count
    assert abs(count / 1e6 - millions) / millions < 0.005


def test_vit_s16_takes_224px_images():
    with torch.device("meta"):
        assert models.ViTS16()(torch.empty(2, 3, 224, 224)).shape == (2, 100)


BASELINES = {  # bench/baselines.py row -> the fused optimizer computing the same maths (torch backend)
    "sam": (
        lambda ps: baselines.PerTensorSAM(ps, torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9),
        lambda ps: FusedSAM(ps, rho=0.1, lr=0.05, momentum=0.9, backend="torch"),
    ),
    "lesam": (
        lambda ps: baselines.PerTensorSAM(ps, torch.optim.SGD, sigma=0.35, rho_max=0.4, lr=0.05, momentum=0.9),
        lambda ps: FusedLESAM(ps, sigma=0.35, rho_max=0.4, lr=0.05, momentum=0.9, backend="torch"),
    ),
    "xsam": (
        lambda ps: baselines.PerTensorXSAM(ps, torch.optim.SGD, rho=0.15, alpha=0.5, lr=0.05, momentum=0.9),
        lambda ps: FusedXSAM(ps, rho=0.15, alpha=0.5, lr=0.05, momentum=0.9, backend="torch"),
    ),
}


@pytest.mark.parametrize("kind", list(BASELINES))
def test_benchmark_baselines_compute_the_optimizers_maths(kind):
    """The per-tensor loops the benchmarks time against do the same step as the fused optimizers
    (which tests/test_equivalence.py and tests/test_xsam.py check against tests/reference/)."""
    make_baseline, make_fused = BASELINES[kind]
    torch.manual_seed(0)
    model = SmallConvNet()
    other = copy.deepcopy(model)
    baseline, fused = make_baseline(list(model.parameters())), make_fused(list(other.parameters()))
    for x, y in make_batches(4):
        sam_step(model, baseline, x, y)
        sam_step(other, fused, x, y)
    for p, q in zip(model.parameters(), other.parameters()):
        assert_close(p, q)
