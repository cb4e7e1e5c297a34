"""The benchmarks of the throughput modes (interval, LookSAM, Momentum-SAM): the epoch table's mode
rows and their report against the targets, the fidelity bench (bench/fidelity.py) and the
accuracy table on scikit-learn's digits (bench/accuracy.py), on tiny settings and made-up numbers.

scikit-learn is installed by ./dev with the rest of the test extra; an existing interpreter
(FUSED_LESAM_PYTHON, e.g. the GPU machine's, which reaches no package registry) is taken as it is,
and the accuracy table's tests are skipped there, and only there, when it lacks scikit-learn.
"""

import json
import os
import statistics

import epoch_time
import fidelity
import pytest
import report
import run as suite
import torch
import torch.nn.functional as F
from common import MODES

import fused_lesam


@pytest.fixture(autouse=True)
def results_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSED_LESAM_BENCH_RESULTS", str(tmp_path))
    return tmp_path


@pytest.fixture
def accuracy():
    if os.environ.get("FUSED_LESAM_PYTHON"):
        pytest.importorskip("sklearn", reason="scikit-learn is not in FUSED_LESAM_PYTHON's interpreter")
    import accuracy

    return accuracy


# ---------------------------------------------------------------------- the modes and their verdicts
def test_pass_count_bounds_of_the_modes():
    assert {key: mode.passes for key, mode in MODES.items()} == {"interval": 1.5, "looksam": 1.2, "msam": 1.0}
    assert (MODES["interval"].cycle, MODES["looksam"].cycle, MODES["msam"].cycle) == (2, 5, 1)


def made_up_epoch_rows(sgd_s, **mode_s):
    rows = [dict(model="resnet18", row="SGD", epoch_s=sgd_s)]
    for key, seconds in mode_s.items():
        rows.append(dict(model="resnet18", row=f"row {key}", epoch_s=seconds, mode=key, pass_bound=MODES[key].passes))
    return rows


def test_mode_verdicts_against_sgd_of_the_same_run():
    verdicts = report.mode_verdicts(made_up_epoch_rows(100.0, interval=112.0, looksam=131.0, msam=115.0))
    by_mode = {v["mode"]: v for v in verdicts}
    assert by_mode["interval"]["vs_sgd"] == pytest.approx(1.12) and by_mode["interval"]["ok"]
    assert by_mode["looksam"]["vs_sgd"] == pytest.approx(1.31) and not by_mode["looksam"]["ok"]
    assert by_mode["msam"]["ok"]  # 1.15x is within "<= 1.15x"
    assert {m: v["target"] for m, v in by_mode.items()} == {"interval": 1.15, "looksam": 1.3, "msam": 1.15}
    # k=2 runs 1.5 passes per step, so its 1.15x target is out of reach when the passes dominate.
    assert {m: v["bound_rules_out"] for m, v in by_mode.items()} == {"interval": True, "looksam": False, "msam": False}
    table = report.mode_table(verdicts)
    assert "| row interval | 1.50x | 1.120x | <= 1.15x | pass (the pass count alone exceeds it) |" in table
    assert "| row looksam | 1.20x | 1.310x | <= 1.30x | SHORT |" in table


def test_mode_verdicts_need_an_sgd_row_of_the_same_model():
    rows = made_up_epoch_rows(100.0, interval=110.0)
    rows[1]["model"] = "wrn28_10"
    assert report.mode_verdicts(rows) == []


class Recorder:
    """A stand-in optimizer that records, at each half of a step, whether a gradient was in place."""

    def __init__(self, params, needs_perturbed_pass=True):
        self.params, self.needs_perturbed_pass, self.calls = list(params), needs_perturbed_pass, []

    def _half(self, name, zero_grad):
        self.calls.append((name, self.params[0].grad is not None))
        if zero_grad:
            for p in self.params:
                p.grad = None

    def first_step(self, zero_grad=False):
        self._half("first_step", zero_grad)

    def second_step(self, zero_grad=False):
        self._half("second_step", zero_grad)


@pytest.mark.parametrize(
    "needs, momentum_sam, expected",
    [
        (True, False, [("first_step", True), ("second_step", True)]),  # a full step: a backward before each half
        (False, False, [("first_step", True), ("second_step", False)]),  # one pass, at w
        (True, True, [("first_step", False), ("second_step", True)]),  # Momentum-SAM: one pass, after first_step
    ],
)
def test_the_epoch_table_drives_each_kind_of_step(needs, momentum_sam, expected):
    model = torch.nn.Linear(3, 2)
    opt = Recorder(model.parameters(), needs)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    timer = epoch_time.Timer(torch.device("cpu"))
    epoch_time.train_step(model, opt, x, y, False, False, timer, momentum_sam=momentum_sam)
    assert opt.calls == expected


def tiny_cifar_net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 100),
    )


def test_mode_rows_time_whole_cycles_and_report_against_sgd(monkeypatch, results_in_tmp, capsys):
    # A tiny net in ResNet-18's place keeps the test fast; the timing and the report are what it checks.
    monkeypatch.setitem(epoch_time.MODELS, "resnet18", tiny_cifar_net)
    argv = ["--steps", "1", "--warmup", "0", "--batch", "2", "--rows", "SGD,FusedLESAM interval k=2"]
    with pytest.raises(SystemExit):  # 3 steps are not whole cycles of 2
        epoch_time.main(argv + ["--cycle-steps", "3"])
    sgd, mode = epoch_time.main(argv + ["--cycle-steps", "4"])
    for r in (sgd, mode):
        assert len(r["steps_s"]) == 4 and r["step_is"] == "mean over whole cycles"
        assert r["step_s"] == pytest.approx(statistics.fmean(r["steps_s"]))
        assert r["epoch_s"] == pytest.approx(r["step_s"] * 25000)  # 50,000 images in batches of 2
    assert mode["mode"] == "interval" and mode["pass_bound"] == 1.5
    saved = json.loads((results_in_tmp / "epoch_time.json").read_text())
    (verdict,) = saved["modes"]
    assert verdict["vs_sgd"] == pytest.approx(mode["epoch_s"] / sgd["epoch_s"])
    assert verdict["ok"] == (verdict["vs_sgd"] <= 1.15) and verdict["bound_rules_out"]
    assert "| ResNet-18 | FusedLESAM interval k=2 | 1.50x |" in capsys.readouterr().out


def test_the_mode_rows_are_in_the_default_table():
    rows = epoch_time.optimizer_rows("resnet18", torch.device("cpu"), fused_sgd=False)
    assert {"FusedLESAM interval k=2", "FusedLESAM LookSAM k=5", "FusedSAM Momentum-SAM"} <= set(rows)


# ---------------------------------------------------------------------- fidelity
def test_looksam_direction_and_gradient_on_made_up_vectors():
    g = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64)
    g_hat = torch.tensor([2.0, 1.0, -2.0], dtype=torch.float64)
    g_v = fidelity.looksam_direction(g, g_hat)
    assert g_v.tolist() == [0.0, 1.0, -2.0]  # g_hat less its part along g
    reused = fidelity.looksam_gradient(g, g_v, 0.7)
    assert torch.allclose(reused, g + 0.7 * 3 / 5**0.5 * g_v, rtol=1e-15, atol=0)
    assert (reused - g).norm().item() == pytest.approx(0.7 * 3.0, rel=1e-14)


def test_agreement_is_the_cosine_and_the_relative_error():
    cosine, rel_error = fidelity.agreement(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0]))
    assert cosine == pytest.approx(24 / 25, rel=1e-12) and rel_error == pytest.approx(2**0.5 / 5, rel=1e-12)
    assert fidelity.agreement(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))[1] == 0.0


def test_gradient_at_a_shifted_point_against_fp64_and_w_restored():
    torch.manual_seed(0)
    model = fidelity.make_model()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 3, 7, 9])
    shift = 0.1 * torch.randn(sum(p.numel() for p in params))
    got = fidelity.gradient_at(model, params, x, y, shift)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # w bit-exactly as it was
    truth_model = fidelity.make_model().double()
    with torch.no_grad():
        for q, p, s in zip(truth_model.parameters(), params, fidelity.unflatten(shift, params)):
            q.copy_(p.double() + s.double())
    loss = F.cross_entropy(truth_model(x.double()), y)
    truth = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(truth_model.parameters()))])
    assert ((got.double() - truth).norm() / truth.norm()).item() < 1e-5  # fp32 rounding of a small net


def test_fidelity_smoke(results_in_tmp):
    out = fidelity.main(["--steps", "6", "--batch", "16"])
    interval, looksam, msam = (out["per_step"][MODES[key].label] for key in ("interval", "looksam", "msam"))
    assert all(len(figures[name]) == 6 for figures in (interval, looksam, msam) for name in ("cosine", "rel_error"))
    # Full steps are g_hat itself; the others differ from it.
    assert [interval["rel_error"][t] == 0.0 for t in range(6)] == [True, False] * 3
    assert [looksam["rel_error"][t] == 0.0 for t in range(6)] == [True, False, False, False, False, True]
    assert all(0 < e for e in msam["rel_error"]) and all(-1 <= c <= 1 + 1e-12 for c in msam["cosine"])
    summary = out["summary"][MODES["interval"].label]
    assert summary["cosine_min"] == min(interval["cosine"]) and summary["rel_error_max"] == max(interval["rel_error"])
    saved = json.loads((results_in_tmp / "fidelity.json").read_text())
    assert saved["config"]["steps"] == 6 and set(saved["summary"]) == {m.label for m in MODES.values()}
    assert (results_in_tmp / "fidelity.png").stat().st_size > 0


def test_fidelity_summary_on_made_up_figures():
    summary = report.fidelity_summary({"m": dict(cosine=[1.0, 0.8, 0.9], rel_error=[0.0, 0.5, 0.1])})
    expected = dict(cosine_mean=0.9, cosine_min=0.8, rel_error_mean=0.2, rel_error_max=0.5)
    assert summary == {"m": pytest.approx(expected, rel=1e-15)}
    assert "| m | 0.9000 | 0.8000 | 0.2000 | 0.5000 |" in report.fidelity_table(summary)


# ---------------------------------------------------------------------- the accuracy table
def test_mean_and_sample_std():
    mean, std = report.mean_std([0.90, 0.92, 0.94])
    assert mean == pytest.approx(0.92) and std == pytest.approx(0.02)
    assert report.mean_std([0.5]) == (0.5, 0.0)


def test_accuracy_summary_and_table_on_made_up_runs():
    runs = [
        dict(condition="clean", optimizer="SGD", seed=0, test_accuracy=0.90, wall_s=1.0),
        dict(condition="clean", optimizer="SGD", seed=1, test_accuracy=0.94, wall_s=3.0),
        dict(condition="clean", optimizer="SAM", seed=0, test_accuracy=0.96, wall_s=4.0),
        dict(condition="noisy", optimizer="SGD", seed=0, test_accuracy=0.80, wall_s=2.0),
    ]
    summary = report.accuracy_summary(runs)
    assert [(s["condition"], s["optimizer"], s["seeds"]) for s in summary] == [
        ("clean", "SGD", 2),
        ("clean", "SAM", 1),
        ("noisy", "SGD", 1),
    ]
    sgd = summary[0]
    assert sgd["accuracy_mean"] == pytest.approx(0.92) and sgd["accuracy_std"] == pytest.approx(0.02 * 2**0.5)
    assert sgd["wall_s_mean"] == 2.0
    table = report.accuracy_table(summary)
    assert "| SGD | 92.00 ± 2.83 | 2.0 | 80.00 ± 0.00 | 2.0 |" in table
    assert "| SAM | 96.00 ± 0.00 | 4.0 | - | - |" in table  # no noisy run of SAM


def test_digits_split_is_fixed_stratified_and_standardised(accuracy):
    split = accuracy.load_split()
    assert (len(split.train_y), len(split.eval_y)) == (1437, 360)
    assert split.train_x.shape[1:] == (1, 8, 8)
    again = accuracy.load_split()
    assert torch.equal(split.eval_x, again.eval_x) and torch.equal(split.train_y, again.train_y)  # fixed
    assert (torch.bincount(split.eval_y, minlength=10) >= 35).all()  # 10 classes of ~180 images, 20% each
    assert split.train_x.mean().abs() < 1e-5 and split.train_x.std() == pytest.approx(1, abs=1e-5)
    validation = accuracy.load_split(validation=True)
    assert (len(validation.train_y), len(validation.eval_y)) == (1149, 288)  # TRAIN alone, split again


def test_symmetric_label_noise(accuracy):
    labels = torch.arange(10).repeat(2000)
    noisy = accuracy.noisy_labels(labels, 0.2, torch.Generator().manual_seed(0))
    flipped = noisy != labels
    assert flipped.float().mean().item() == pytest.approx(0.2, abs=0.01)
    # A flipped label goes to each of the 9 other classes alike: its offset is uniform on 1..9.
    offsets = torch.bincount((noisy - labels)[flipped] % 10, minlength=10)
    assert offsets[0] == 0 and (offsets[1:].float() / flipped.sum()).sub(1 / 9).abs().max() < 0.015


def test_accuracy_smoke(accuracy, results_in_tmp):
    threads = torch.get_num_threads()
    out = accuracy.main(["--seeds", "1", "--epochs", "1", "--optimizers", "SGD,SAM"])
    assert torch.get_num_threads() == threads  # the runs' one thread is the table's alone
    assert [(s["condition"], s["optimizer"]) for s in out["summary"]] == [
        ("clean", "SGD"),
        ("clean", "SAM"),
        ("noisy", "SGD"),
        ("noisy", "SAM"),
    ]
    for run in out["runs"]:
        assert run["test_accuracy"] > 0.25 and run["wall_s"] > 0  # one epoch on the digits: well above chance (0.1)
        assert (run["flipped_fraction"] == 0) == (run["condition"] == "clean")
    saved = json.loads((results_in_tmp / "accuracy.json").read_text())
    assert saved["hyperparameters"]["sam_rho"] == accuracy.CHOSEN["sam_rho"] and len(saved["runs"]) == 4
    assert (results_in_tmp / "accuracy.png").stat().st_size > 0


def test_without_scikit_learn_the_suite_says_so_and_skips_the_accuracy_table(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(suite.accuracy, "main", lambda argv: ran.append(argv))
    monkeypatch.setattr(suite.importlib.util, "find_spec", lambda name: None)
    assert suite.accuracy_table() is False and ran == []
    assert "scikit-learn is missing" in capsys.readouterr().out
    monkeypatch.undo()
    monkeypatch.setattr(suite.accuracy, "main", lambda argv: ran.append(argv))
    if os.environ.get("FUSED_LESAM_PYTHON"):
        pytest.importorskip("sklearn", reason="scikit-learn is not in FUSED_LESAM_PYTHON's interpreter")
    assert suite.accuracy_table() is True and ran == [[]]


def test_accuracy_table_has_every_optimizer_and_mode(accuracy):
    table = accuracy.optimizers(accuracy.CHOSEN)
    assert list(table) == [
        "SGD",
        "SAM",
        "LE-SAM",
        "LE-SAM+",
        "XSAM",
        "LE-SAM interval k=2",
        "LE-SAM LookSAM k=5",
        "Momentum-SAM",
    ]
    lesam_plus = table["LE-SAM+"]([torch.nn.Parameter(torch.zeros(3))])
    assert isinstance(lesam_plus, fused_lesam.FusedLESAM)
    assert lesam_plus.param_groups[0]["alpha"] == accuracy.CHOSEN["lesam_alpha"]
    assert lesam_plus.param_groups[0]["sigma"] == accuracy.CHOSEN["lesam_sigma"]
