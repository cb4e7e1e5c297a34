"""Training time per epoch on CIFAR-100, SAM vs LE-SAM: the paper's Table 6 (Appendix C), extended.

The paper times SAM's and LE-SAM's own two-pass training loops (RTX 5090, 5 epochs averaged).
Here each model gets these rows: SGD (one pass, the floor); SAM, LE-SAM and XSAM as per-tensor
loops (the papers' style, bench/baselines.py); FusedSAM, FusedLESAM and FusedXSAM on every backend
available on the device. Columns: time per epoch, the ratio to SAM's loop, and the optimizer's
share of the step. XSAM rows take one ascent step with a fixed alpha (the per-step cost); its
dynamic alpha search, which the paper runs once per epoch, is timed apart (one search, per
FusedXSAM row) and printed under the table.

The throughput modes on the default backend (common.MODES): FusedLESAM with a full step every 2nd
step (sam_interval=2), FusedLESAM LookSAM (look_k=5, look_alpha=0.7) and FusedSAM Momentum-SAM
(momentum_sam=True), each driven by the uniform two-step loop (needs_perturbed_pass decides the second
pass). Their steps differ in cost, so these rows and SGD's time ``--cycle-steps`` steps (a multiple of
every mode's cycle) and their epoch comes from the mean step over those whole cycles. A table under
the main one gives each mode's epoch time over SGD's in the same run, pass/short against the targets
(interval k=2 and Momentum-SAM <= 1.15x, LookSAM k=5 <= 1.3x), and its forward/backward passes per
step over SGD's (1.5, 1.2, 1.0): where that bound exceeds the target, the passes alone rule it out.

Quick default (a few minutes on a 2-core CPU): ResNet-18, batch 32, 3 timed steps after 2
warm-up steps per row (10 for SGD and the modes), the rows taking turns step by step; the epoch is
extrapolated from the median step (the mean over whole cycles for SGD and the modes) and labelled so.
The paper's protocol, on a GPU (whole epochs, the first one excluded as warm-up, the median of
the others; the device synchronised around every timing):

    python bench/epoch_time.py --device cuda --models all --epochs 5 --data ~/data --channels-last

(batch sizes then default to the paper's: 128 for ResNet-18, 256 for the others.)
Writes bench/results/epoch_time.json (every figure, the machine) and epoch_time.png.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import report
import torch
import torch.nn.functional as F
from baselines import PerTensorSAM, PerTensorXSAM
from common import MODES, Batches, Mode, Progress, machine, results_dir, sync, write_json
from models import MODELS, PAPER_NAMES

import fused_lesam
from fused_lesam import FusedLESAM, FusedSAM, FusedXSAM, frozen_bn_stats

# The paper's Table 6: seconds per epoch, RTX 5090, its own training loops.
PAPER_TABLE6 = {
    ("resnet18", "SAM"): 9.06,
    ("resnet18", "LE-SAM"): 9.32,
    ("wrn28_10", "SAM"): 55.83,
    ("wrn28_10", "LE-SAM"): 56.26,
    ("pyramidnet110", "SAM"): 88.82,
    ("pyramidnet110", "LE-SAM"): 89.72,
}
# Table 8 (CIFAR-100): SGD and LE-SAM settings per model; SAM uses rho = 0.1 on CIFAR-100.
HYPER = {
    "resnet18": dict(batch=128, lr=0.05, weight_decay=1e-3, sigma=0.35, rho_max=0.4),
    "wrn28_10": dict(batch=256, lr=0.05, weight_decay=1e-3, sigma=0.3, rho_max=None),
    "pyramidnet110": dict(batch=256, lr=0.1, weight_decay=5e-4, sigma=0.3, rho_max=None),
}
SAM_RHO = 0.1
XSAM = dict(rho=0.15, alpha=0.5)  # the XSAM reference's rho; alpha fixed mid-grid for the per-step rows
SAM_ROW, LESAM_ROW, XSAM_ROW = "SAM (per-tensor loop)", "LE-SAM (per-tensor loop)", "XSAM (per-tensor loop)"
# Row label -> (common.MODES key, mode): the throughput modes' rows, on the default backend.
MODE_ROWS = {f"{mode.optimizer} {mode.label}": (key, mode) for key, mode in MODES.items()}


def optimizer_rows(model_name: str, device: torch.device, fused_sgd: bool) -> dict[str, Callable]:
    """Row label -> (params -> optimizer). One-pass rows are marked by the label "SGD"."""
    h = HYPER[model_name]
    sgd = dict(lr=h["lr"], momentum=0.9, weight_decay=h["weight_decay"], **({"fused": True} if fused_sgd else {}))
    rho_max = h["rho_max"] if h["rho_max"] is not None else float("inf")
    rows = {
        "SGD": lambda ps: torch.optim.SGD(ps, **sgd),
        SAM_ROW: lambda ps: PerTensorSAM(ps, torch.optim.SGD, rho=SAM_RHO, **sgd),
        LESAM_ROW: lambda ps: PerTensorSAM(ps, torch.optim.SGD, sigma=h["sigma"], rho_max=rho_max, **sgd),
        XSAM_ROW: lambda ps: PerTensorXSAM(ps, torch.optim.SGD, **XSAM, **sgd),
    }
    for name, why in fused_lesam.available_backends().items():
        # Triton runs on the CPU only in its interpreter: a test tool, not something to time.
        if why or (device.type == "cpu" and name not in ("torch", "cpp")):
            continue
        rows[f"FusedSAM ({name})"] = lambda ps, b=name: FusedSAM(ps, torch.optim.SGD, rho=SAM_RHO, backend=b, **sgd)
        rows[f"FusedLESAM ({name})"] = lambda ps, b=name: FusedLESAM(
            ps, torch.optim.SGD, sigma=h["sigma"], rho_max=h["rho_max"], backend=b, **sgd
        )
        # dynamic=True only so that the search can be timed apart: without search_alpha, alpha stays.
        rows[f"FusedXSAM ({name})"] = lambda ps, b=name: FusedXSAM(
            ps, torch.optim.SGD, dynamic=True, backend=b, **XSAM, **sgd
        )
    for label, (_, mode) in MODE_ROWS.items():
        if mode.optimizer == "FusedLESAM":
            rows[label] = lambda ps, m=mode: FusedLESAM(
                ps, torch.optim.SGD, sigma=h["sigma"], rho_max=h["rho_max"], **m.kwargs, **sgd
            )
        else:
            rows[label] = lambda ps, m=mode: FusedSAM(ps, torch.optim.SGD, rho=SAM_RHO, **m.kwargs, **sgd)
    return rows


class Timer:
    """Wall time of code blocks, the device synchronised at both ends; sums by key."""

    def __init__(self, device: torch.device):
        self.device, self.total = device, {}

    def __call__(self, key: str):
        timer = self

        class Block:
            def __enter__(self):
                sync(timer.device)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                sync(timer.device)
                timer.total[key] = timer.total.get(key, 0.0) + time.perf_counter() - self.start

        return Block()


def train_step(
    model, opt, x, y, one_pass: bool, amp: bool, timer: Timer, search: bool = False, momentum_sam: bool = False
) -> None:
    """One training step as the papers' loops do it; the optimizer's own time goes to "optimizer".
    ``search``: FusedXSAM's dynamic alpha search in this step (forward passes, BatchNorm frozen).
    ``momentum_sam``: Momentum-SAM's step, first_step() before the only forward/backward, which is
    at the perturbed point and so updates BatchNorm's statistics as SGD's one pass does."""

    def loss():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            return F.cross_entropy(model(x), y)

    def loss_at():
        with frozen_bn_stats(model):
            return loss()

    if momentum_sam:
        with timer("optimizer"):
            opt.first_step(zero_grad=True)
        loss().backward()
        with timer("optimizer"):
            opt.second_step(zero_grad=True)
        return
    loss().backward()
    if one_pass:
        with timer("optimizer"):
            opt.step()
            opt.zero_grad()
        return
    with timer("optimizer"):
        opt.first_step(zero_grad=True)
    # The per-tensor loops and the modes' full steps always need the pass; the modes' one-pass
    # steps do not (needs_perturbed_pass is False there).
    if getattr(opt, "needs_perturbed_pass", True):
        with frozen_bn_stats(model):  # the second forward must not update BatchNorm statistics again
            loss().backward()
    with timer("optimizer"):
        if search:
            opt.second_step(zero_grad=True, search_alpha=loss_at)
        else:
            opt.second_step(zero_grad=True)


def time_search(model, opt, batches: Batches, args) -> float:
    """Seconds one dynamic alpha search adds to a step: a step with it minus a step without (after
    one warm-up step)."""
    seconds = []
    for search in (False, False, True):
        x, y = batches.make(torch.randint(0, batches.size, (batches.batch,), generator=batches.gen))
        timer = Timer(batches.device)
        with timer("step"):
            train_step(model, opt, x, y, False, args.amp, timer, search=search)
        seconds.append(timer.total["step"])
    return seconds[2] - seconds[1]


def build(model_name, make_opt, device, channels_last):
    torch.manual_seed(0)
    model = MODELS[model_name]().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, make_opt(list(model.parameters()))


def time_epochs(row: Row, args, progress: Progress) -> dict:
    """Whole epochs; the first one is warm-up when there are several."""
    model, opt = row.build(args.channels_last)
    batches = row.batches
    epoch_times, opt_times = [], []
    for _ in range(args.epochs):
        timer = Timer(batches.device)
        with timer("epoch"):
            for x, y in batches.epoch():
                row.step(model, opt, x, y, args, timer)
                progress.advance()
        epoch_times.append(timer.total["epoch"])
        opt_times.append(timer.total["optimizer"])
    kept = slice(1, None) if args.epochs > 1 else slice(None)
    return dict(
        epoch_s=statistics.median(epoch_times[kept]),
        epochs_s=epoch_times,
        extrapolated=False,
        optimizer_share=sum(opt_times[kept]) / sum(epoch_times[kept]),
    )


@dataclass
class Row:
    """One row of the table: an optimizer (``label``, built by ``make_opt``) training ``model`` on ``batches``."""

    model: str
    batches: Batches
    label: str
    make_opt: Callable
    mode: Mode | None = None

    def build(self, channels_last: bool):
        return build(self.model, self.make_opt, self.batches.device, channels_last)

    @property
    def times_cycles(self) -> bool:
        """SGD and the modes time whole cycles (``--cycle-steps``), the others ``--steps``."""
        return self.mode is not None or self.label == "SGD"

    def timed_steps(self, args) -> int:
        return args.cycle_steps if self.times_cycles else args.steps

    def step(self, model, opt, x, y, args, timer: Timer) -> None:
        momentum_sam = self.mode is not None and self.mode.momentum_sam
        train_step(model, opt, x, y, self.label == "SGD", args.amp, timer, momentum_sam=momentum_sam)


def time_steps(plan: list[Row], args, progress: Progress) -> list[dict]:
    """Steps of every row in turn (row 1 step 1, row 2 step 1, ...), so that a machine getting
    slower or faster during the run affects every row alike; a row with fewer timed steps drops out
    when it has them. The epoch is extrapolated: from the median step, or, for the rows that time
    whole cycles (SGD, the modes), from the mean step over them, since a mode's steps differ in cost."""
    built = [row.build(args.channels_last) for row in plan]
    step_times = [[] for _ in plan]
    opt_times = [[] for _ in plan]
    for i in range(args.warmup + max(row.timed_steps(args) for row in plan)):
        for k, (row, (model, opt)) in enumerate(zip(plan, built)):
            if i >= args.warmup + row.timed_steps(args):
                continue
            batches = row.batches
            x, y = batches.make(torch.randint(0, batches.size, (batches.batch,), generator=batches.gen))
            timer = Timer(batches.device)
            with timer("step"):
                row.step(model, opt, x, y, args, timer)
            if i >= args.warmup:
                step_times[k].append(timer.total["step"])
                opt_times[k].append(timer.total["optimizer"])
            progress.advance()
    results = []
    for steps, opts, row in zip(step_times, opt_times, plan):
        step_s = statistics.fmean(steps) if row.times_cycles else statistics.median(steps)
        results.append(
            dict(
                step_s=step_s,
                step_is="mean over whole cycles" if row.times_cycles else "median",
                steps_s=steps,
                extrapolated=True,
                epoch_s=step_s * row.batches.steps_per_epoch,
                optimizer_share=sum(opts) / sum(steps),
            )
        )
    return results


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18", help="comma-separated, or 'all': " + ", ".join(HYPER))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, help="default: 32 on the CPU, else the paper's per model")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per row (without --epochs)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row first (without --epochs)")
    parser.add_argument(
        "--cycle-steps",
        type=int,
        default=10,
        help="timed steps of SGD and the mode rows (without --epochs): a multiple of every mode's cycle",
    )
    parser.add_argument("--epochs", type=int, default=0, help="time whole epochs instead (the paper: 5)")
    parser.add_argument("--rows", default="", help="comma-separated row labels to keep, e.g. 'SGD,FusedLESAM (cpp)'")
    parser.add_argument("--data", help="folder with CIFAR-100's python files (cifar-100-python/); else synthetic")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for the forward passes")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--fused-sgd", action="store_true", help="SGD(fused=True) as the base in every row")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    names = list(HYPER) if args.models == "all" else args.models.split(",")
    plan = []
    for name in names:
        batch = args.batch or (32 if device.type == "cpu" else HYPER[name]["batch"])
        batches = Batches(args.data, batch, device, args.channels_last)
        rows = optimizer_rows(name, device, args.fused_sgd)
        wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
        unknown = set(wanted) - set(rows)
        if unknown:
            parser.error(f"unknown rows {sorted(unknown)}; the rows here are {list(rows)}")
        keep = [r for r in rows if not wanted or r in wanted]
        plan += [Row(name, batches, label, rows[label], MODE_ROWS.get(label, (None, None))[1]) for label in keep]
    uneven = [row.label for row in plan if row.mode is not None and args.cycle_steps % row.mode.cycle]
    if args.cycle_steps < 1 or uneven:
        parser.error(f"--cycle-steps {args.cycle_steps} is not a positive multiple of the cycle of {uneven}")
    units = sum(
        (args.epochs * row.batches.steps_per_epoch) if args.epochs else (args.warmup + row.timed_steps(args))
        for row in plan
    )
    progress = Progress(units, "epoch_time")
    if args.epochs:
        results = [time_epochs(row, args, progress) for row in plan]
    else:
        results = time_steps(plan, args, progress)
    for r, row in zip(results, plan):
        if row.label.startswith("FusedXSAM"):
            model, opt = row.build(args.channels_last)
            r["alpha_search_s"] = time_search(model, opt, row.batches, args)
            r["alpha_search_points"] = len(opt.alpha_grid)
    for r, row in zip(results, plan):
        r.update(model=row.model, row=row.label, batch=row.batches.batch, data=row.batches.source)
        if row.mode is not None:
            r.update(mode=MODE_ROWS[row.label][0], pass_bound=row.mode.passes)
    for r in results:
        sam = (
            next(s for s in results if s["model"] == r["model"] and s["row"] == SAM_ROW)
            if any(s["row"] == SAM_ROW for s in results)
            else r
        )
        r["vs_sam"] = r["epoch_s"] / sam["epoch_s"]
        paper_row = {SAM_ROW: "SAM", LESAM_ROW: "LE-SAM"}.get(r["row"])  # Table 6 has no XSAM
        r["paper_epoch_s"] = PAPER_TABLE6.get((r["model"], paper_row))
    info = machine(device)
    where = f"{info.get('gpu', info['cpu'])}, torch {info['torch']}"
    sources = sorted({r["data"] for r in results})
    print(
        f"\nTraining time per epoch on {where}; data: {'; '.join(sources)}; "
        f"{'AMP bf16, ' if args.amp else ''}{'channels_last, ' if args.channels_last else ''}"
        f"batch {', '.join(sorted({str(r['batch']) for r in results}))}"
    )
    print(report.epoch_table(results))
    modes = report.mode_verdicts(results)
    if modes:
        print("\nThe throughput modes (default backend): time per epoch over SGD's in this run, against the targets")
        print(report.mode_table(modes))
    shares = report.share_verdicts(results)
    if shares:
        print(report.share_lines(shares))
    for r in results:
        if "alpha_search_s" in r:
            print(
                f"{PAPER_NAMES[r['model']]}, {r['row']}: one dynamic alpha search "
                f"({r['alpha_search_points']} forward passes) "
                f"adds {r['alpha_search_s']:.2f} s (one measurement); the paper searches once per epoch"
            )
    write_json(
        "epoch_time.json",
        dict(
            machine=info,
            config=vars(args),
            results=results,
            modes=modes,
            optimizer_share=shares,
            paper_table6={f"{m}/{o}": s for (m, o), s in PAPER_TABLE6.items()},
        ),
    )
    report.plot_epoch_times(results, f"time per epoch, {where}", results_dir() / "epoch_time.png")
    print(f"wrote {results_dir() / 'epoch_time.json'} and {results_dir() / 'epoch_time.png'}")
    return results


if __name__ == "__main__":
    main()
