"""The benchmark suite's own logic: the CIFAR-100 reader, the epoch-time table and the radius
dynamics run, on tiny settings (their timings are not checked, only what they compute and write)."""

import copy
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import baselines
import epoch_time
import radius_dynamics
from common import CIFAR_MEAN, CIFAR_STD, Batches
from conftest import SmallConvNet, assert_close, make_batches, sam_step
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
    results = epoch_time.main(["--steps", "2", "--warmup", "0", "--batch", "4",
                               "--rows", "SGD,SAM (per-tensor loop),FusedLESAM (cpp)"])
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


def test_radius_dynamics_logs_the_telemetry(results_in_tmp):
    runs = radius_dynamics.main(["--steps", "24", "--batch", "8", "--sigma", "0.15"])
    sam, lesam = runs.values()
    assert all(rho == pytest.approx(0.05) for rho in sam["rho"])
    for g, rho, sigma in zip(lesam["grad_norm"], lesam["rho"], lesam["sigma"]):
        assert rho == pytest.approx(min(sigma / g, 0.4), rel=1e-4, abs=1e-7)  # the back-solve, clipped
    assert lesam["sigma"][0] == pytest.approx(0.15) and lesam["sigma"][-1] == 0.0  # annealed to 0
    assert json.loads((results_in_tmp / "radius_dynamics.json").read_text())["config"]["steps"] == 24


def test_step_microbenchmarks_report(results_in_tmp):
    bench = Path(__file__).resolve().parent.parent / "bench"
    env = {**os.environ, "FUSED_LESAM_BENCH_RESULTS": str(results_in_tmp)}
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "pytest", str(bench / "test_step_overhead.py"), "-q", "-p",
                          "no:cacheprovider", "--sets", "resnet18", "--rounds", "1", "--benchmark-disable-gc"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=bench)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "| resnet18 | 62 | 11.2M | cpp |" in run.stdout
    rows = json.loads((results_in_tmp / "step_overhead.json").read_text())["rows"]
    cpp = next(r for r in rows if r["backend"] == "cpp")
    assert cpp["params"] == 11220132
    assert cpp["step_speedup"] == pytest.approx(cpp["loop_step_s"] / cpp["fused_step_s"])
    assert cpp["fused_dispatches"] < cpp["loop_dispatches"]  # O(buckets) ops, not O(tensors)


BASELINES = {  # bench/baselines.py row -> the fused optimizer computing the same maths (torch backend)
    "sam": (lambda ps: baselines.PerTensorSAM(ps, torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9),
            lambda ps: FusedSAM(ps, rho=0.1, lr=0.05, momentum=0.9, backend="torch")),
    "lesam": (lambda ps: baselines.PerTensorSAM(ps, torch.optim.SGD, sigma=0.35, rho_max=0.4, lr=0.05, momentum=0.9),
              lambda ps: FusedLESAM(ps, sigma=0.35, rho_max=0.4, lr=0.05, momentum=0.9, backend="torch")),
    "xsam": (lambda ps: baselines.PerTensorXSAM(ps, torch.optim.SGD, rho=0.15, alpha=0.5, lr=0.05, momentum=0.9),
             lambda ps: FusedXSAM(ps, rho=0.15, alpha=0.5, lr=0.05, momentum=0.9, backend="torch")),
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
