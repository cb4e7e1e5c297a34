"""The benchmarks' reports: what is printed, written and drawn from their figures. No timing here,
so the tests can feed it made-up figures. The JSON files are written by common.write_json.

The step microbenchmark (bench/test_step_overhead.py): from the per-round times of its rows to the
byte-limit fraction, the speed-ups, the pass/short decisions against issue 14's targets, and the
printed tables. The time per epoch (bench/epoch_time.py): its table and chart, and the throughput
modes' epoch time over SGD's against their targets. The radius dynamics (bench/radius_dynamics.py):
its chart. The fidelity of the modes (bench/fidelity.py) and the accuracy table (bench/accuracy.py):
their summaries, tables and charts.

Byte model (fp32, per parameter and step; README "byte model", docs/design.md §3): the ideal whole step
reads g for the norm (4), reads w, g and writes w, w_bak to perturb (16), and in one pass reads
w_bak, the final gradient and the base's state and writes w and the state: 20 for SGD with
momentum (w_bak, g, m in; w, m out), 28 for AdamW (w_bak, g, m, v in; w, m, v out). A copy_ moves
8 (read the source, write the destination), so the copy measured in the same run gives the
machine's bandwidth, and (ideal bytes / copy bandwidth) / measured time is the fraction of the limit.
"""

from __future__ import annotations

import math
import statistics

from models import PAPER_NAMES

COPY_BYTES = 8
IDEAL_BYTES = {"sgd": 4 + 16 + 20, "adamw": 4 + 16 + 28}
OPS_BYTES = 28  # the three bucket ops alone: norm 4 + perturb 16 + restore (read w_bak, write w) 8
BASE_NAMES = {"sgd": "SGD", "adamw": "AdamW"}

# Issue 14's targets, for FusedLESAM built with default arguments (backend "auto").
TARGET_BYTE_LIMIT = 0.80
TARGET_VS_LOOP_FUSED = {"sgd": 1.25, "adamw": 1.1}
BYTE_LIMIT_SETS = ("resnet18", "vit_s16")  # the sets held to the byte limit and the two speed-ups above
MANY_TENSORS_SET, TARGET_MANY_TENSORS = "many600", 4.0
TARGET_LAUNCHES_PER_BUCKET = 6  # GPU only: kernel launches per whole step and bucket


def spread(round_seconds: list[float]) -> dict:
    """Median, min and max over the rounds (each round's value is the mean step of that round)."""
    return dict(
        median_s=statistics.median(round_seconds),
        min_s=min(round_seconds),
        max_s=max(round_seconds),
        rounds_s=list(round_seconds),
    )


def byte_limit_fraction(ideal_bytes: float, copy_s: float, step_s: float) -> float:
    """(ideal bytes / copy bandwidth) / step time; the parameter count cancels: the copy moved
    COPY_BYTES per parameter in copy_s."""
    return ideal_bytes / COPY_BYTES * copy_s / step_s


def targets_for(param_set: str, base: str) -> dict[str, float]:
    """The figure -> threshold pairs issue 14 sets for this set and base (empty: no target)."""
    if param_set in BYTE_LIMIT_SETS:
        return {"byte_limit": TARGET_BYTE_LIMIT, "vs_loop_fused": TARGET_VS_LOOP_FUSED[base]}
    if param_set == MANY_TENSORS_SET:
        return {"vs_loop_fused": TARGET_MANY_TENSORS}
    return {}


def group_report(
    param_set: str, base: str, tensors: int, params: int, rows: dict[str, dict], default_backend: str
) -> dict:
    """One set x base: ``rows`` maps each row name (copy, loop, loop-fused, ours-<backend>, ops-<backend>,
    ...) to spread() plus what was recorded with it (dispatches, launches, buckets, base_update).
    Adds, per ours-<backend> row, the byte-limit fraction, the speed-ups and their verdicts."""
    copy_s = rows["copy"]["median_s"]
    report = dict(
        set=param_set,
        base=base,
        tensors=tensors,
        params=params,
        ideal_bytes_per_param=IDEAL_BYTES[base],
        copy_bandwidth_gbps=COPY_BYTES * params / copy_s / 1e9,
        default_backend=default_backend,
        rows=rows,
        ours=[],
        ops=[],
    )
    targets = targets_for(param_set, base)
    for name, row in rows.items():
        if name.startswith("ours-"):
            backend = name[len("ours-") :]
            ours_s = row["median_s"]
            figures = dict(
                byte_limit=byte_limit_fraction(IDEAL_BYTES[base], copy_s, ours_s),
                vs_loop_fused=rows["loop-fused"]["median_s"] / ours_s,
                vs_loop=rows["loop"]["median_s"] / ours_s,
            )
            verdicts = {what: figures[what] >= threshold for what, threshold in targets.items()}
            launches = row.get("launches")
            if launches is not None:  # on a GPU
                figures["launches_per_bucket"] = launches / row["buckets"]
                verdicts["launches_per_bucket"] = figures["launches_per_bucket"] <= TARGET_LAUNCHES_PER_BUCKET
            report["ours"].append(
                dict(
                    backend=backend,
                    row=name,
                    default=backend == default_backend,
                    base_update=row.get("base_update"),
                    step_s=ours_s,
                    **figures,
                    verdicts=verdicts,
                )
            )
        elif name.startswith("ops-"):
            report["ops"].append(
                dict(
                    backend=name[len("ops-") :],
                    row=name,
                    ops_s=row["median_s"],
                    copy_bandwidth_fraction=byte_limit_fraction(OPS_BYTES, copy_s, row["median_s"]),
                )
            )
    return report


def launches_independent_of_tensors(reports: list[dict]) -> dict[str, bool]:
    """Per backend and base: whether the launches per bucket are the same on every set (GPU runs only)."""
    seen: dict[str, set] = {}
    for report in reports:
        for ours in report["ours"]:
            if "launches_per_bucket" in ours:
                seen.setdefault(f"{ours['backend']}/{report['base']}", set()).add(ours["launches_per_bucket"])
    return {key: len(values) == 1 for key, values in seen.items()}


def verdict(ok: bool | None) -> str:
    return "" if ok is None else " pass" if ok else " SHORT"


def _ms(row: dict | None) -> str:
    if row is None:
        return "-"
    return f"{row['median_s'] * 1e3:.2f} [{row['min_s'] * 1e3:.2f}..{row['max_s'] * 1e3:.2f}]"


def _count(row: dict) -> str:
    value = row.get("launches", row.get("dispatches"))
    return "-" if value is None else str(value)


def format_tables(reports: list[dict], rounds: int, steps: int) -> list[str]:
    """The printed report: step times per row, then ours against the byte limit and the loops."""
    ours_rows = list(dict.fromkeys(f"ours-{o['backend']}" for r in reports for o in r["ours"]))
    lines = [
        f"Step times in ms, median [min..max] of {rounds} interleaved rounds of {steps} timed steps "
        "(first_step + second_step, gradients in place)",
        "| set | tensors | params | base | copy | loop | loop-fused | " + " | ".join(ours_rows) + " |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: |" + " ---: |" * len(ours_rows),
    ]
    for r in reports:
        rows = r["rows"]
        lines.append(
            f"| {r['set']} | {r['tensors']} | {r['params'] / 1e6:.2f}M | {BASE_NAMES[r['base']]} | "
            + " | ".join(_ms(rows.get(name)) for name in ["copy", "loop", "loop-fused", *ours_rows])
            + " |"
        )
    count = "launches" if any("launches" in row for r in reports for row in r["rows"].values()) else "dispatches"
    lines += [
        "",
        f"Ours against the byte limit (ideal {IDEAL_BYTES['sgd']} B/param SGD, {IDEAL_BYTES['adamw']} B/param "
        f"AdamW, over the copy's bandwidth in the same run) and the loops; targets: ResNet-18 and ViT-S "
        f">= {TARGET_BYTE_LIMIT:.0%} of the limit and >= {TARGET_VS_LOOP_FUSED['sgd']}x (SGD) / "
        f">= {TARGET_VS_LOOP_FUSED['adamw']}x (AdamW) the loop with fused=True; 600 tensors "
        f">= {TARGET_MANY_TENSORS}x it; GPU <= {TARGET_LAUNCHES_PER_BUCKET} launches per bucket. "
        "* = the backend FusedLESAM picks by default",
        f"| set | base | ours | base update | copy GB/s | byte limit | vs loop-fused | vs loop "
        f"| {count} / step (loop, loop-fused) | launches / bucket |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in reports:
        rows = r["rows"]
        for ours in r["ours"]:
            got = ours["verdicts"].get
            launches = (
                f"{ours['launches_per_bucket']:.1f}{verdict(got('launches_per_bucket'))}"
                if "launches_per_bucket" in ours
                else "-"
            )
            lines.append(
                f"| {r['set']} | {BASE_NAMES[r['base']]} | {ours['backend']}{'*' if ours['default'] else ''} "
                f"| {ours['base_update']} | {r['copy_bandwidth_gbps']:.1f} "
                f"| {ours['byte_limit']:.0%}{verdict(got('byte_limit'))} "
                f"| {ours['vs_loop_fused']:.2f}x{verdict(got('vs_loop_fused'))} "
                f"| {ours['vs_loop']:.2f}x "
                f"| {_count(rows[ours['row']])} ({_count(rows['loop'])}, "
                f"{_count(rows['loop-fused'])}) | {launches} |"
            )
    ops = [(r, o) for r in reports for o in r["ops"]]
    if ops:
        lines += [
            "",
            f"The three bucket ops alone (sq_norm + perturb_ + restore_, {OPS_BYTES} B/param) against the copy",
            "| set | backend | ops ms | fraction of copy bandwidth |",
            "| --- | --- | ---: | ---: |",
        ]
        lines += [
            f"| {r['set']} | {o['backend']} | {_ms(r['rows'][o['row']])} | {o['copy_bandwidth_fraction']:.0%} |"
            for r, o in ops
        ]
    same = launches_independent_of_tensors(reports)
    if same:
        lines.append(
            "launches per bucket the same on every set: " + ", ".join(f"{key}{verdict(ok)}" for key, ok in same.items())
        )
    return lines


def summary_line(reports: list[dict]) -> str:
    """How many of the targets the default backend meets (GPU: with the launches' independence of the tensor count)."""
    default = reports[0]["default_backend"]
    decided = [ok for r in reports for ours in r["ours"] if ours["default"] for ok in ours["verdicts"].values()]
    decided += [ok for key, ok in launches_independent_of_tensors(reports).items() if key.split("/")[0] == default]
    return f"targets met by the default backend ({default}): {sum(decided)} pass, {len(decided) - sum(decided)} short"


# ---------------------------------------------------------------------- time per epoch (epoch_time.py)
def epoch_table(results: list[dict]) -> str:
    lines = [
        "| Architecture | Optimizer | Time / Epoch (s) | vs SAM loop | optimizer share | paper (RTX 5090) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        mark = " (extrapolated)" if r["extrapolated"] else ""
        paper = r.get("paper_epoch_s")
        lines.append(
            f"| {PAPER_NAMES[r['model']]} | {r['row']} | {r['epoch_s']:.2f}{mark} | {r['vs_sam']:.3f}x "
            f"| {r['optimizer_share']:.1%} | {'' if paper is None else f'{paper:.2f}'} |"
        )
    return "\n".join(lines)


def plot_epoch_times(results: list[dict], title: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in results))
    fig, axes = plt.subplots(len(models), 1, figsize=(8, 0.45 * len(results) + 1.5 * len(models)), squeeze=False)
    for ax, model in zip(axes[:, 0], models):
        rows = [r for r in results if r["model"] == model]
        colors = ["tab:gray" if r["row"] == "SGD" else "tab:orange" if "loop" in r["row"] else "tab:blue" for r in rows]
        ax.barh([r["row"] for r in rows], [r["epoch_s"] for r in rows], color=colors)
        ax.invert_yaxis()
        extrapolated = any(r["extrapolated"] for r in rows)
        ax.set_title(PAPER_NAMES[model])
        ax.set_xlabel("seconds per epoch" + (" (extrapolated from steps)" if extrapolated else ""))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The throughput modes' targets: epoch time over SGD's in the same run (common.MODES' keys).
TARGET_MODE_VS_SGD = {"interval": 1.15, "looksam": 1.3, "msam": 1.15}


def mode_verdicts(results: list[dict]) -> list[dict]:
    """Per mode row (one with a "mode" key) of each model: its epoch time over the SGD row's of the
    same model and run, the target, pass/short, and the pass-count bound (passes per step over SGD's):
    a bound above the target means the passes alone rule the target out."""
    sgd = {r["model"]: r["epoch_s"] for r in results if r["row"] == "SGD"}
    verdicts = []
    for r in results:
        if "mode" not in r or r["model"] not in sgd:
            continue
        target = TARGET_MODE_VS_SGD[r["mode"]]
        vs_sgd = r["epoch_s"] / sgd[r["model"]]
        verdicts.append(
            dict(
                model=r["model"],
                row=r["row"],
                mode=r["mode"],
                vs_sgd=vs_sgd,
                target=target,
                ok=vs_sgd <= target,
                pass_bound=r["pass_bound"],
                bound_rules_out=r["pass_bound"] > target,
            )
        )
    return verdicts


# A FusedLESAM step's optimizer work (norm, perturb, restore, base update) as a share of the whole
# training step on ResNet-18 (issue 14). The passes grow with the batch and the optimizer's work does
# not, so the share is printed with the batch it was measured at.
TARGET_OPTIMIZER_SHARE = 0.01


def share_verdicts(results: list[dict]) -> list[dict]:
    """Each FusedLESAM backend row of ResNet-18: its optimizer share against the target."""
    return [
        dict(
            row=r["row"],
            batch=r["batch"],
            share=r["optimizer_share"],
            target=TARGET_OPTIMIZER_SHARE,
            ok=r["optimizer_share"] <= TARGET_OPTIMIZER_SHARE,
        )
        for r in results
        if r["model"] == "resnet18" and r["row"].startswith("FusedLESAM (")
    ]


def share_lines(verdicts: list[dict]) -> str:
    return "\n".join(
        f"{PAPER_NAMES['resnet18']}, {v['row']}, batch {v['batch']}: optimizer share {100 * v['share']:.2f}% "
        f"(target <= {100 * v['target']:.0f}%){verdict(v['ok'])}"
        for v in verdicts
    )


def mode_table(verdicts: list[dict]) -> str:
    lines = [
        "| Architecture | Mode | passes / step vs SGD | Time / Epoch vs SGD | target | |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for v in verdicts:
        ruled_out = " (the pass count alone exceeds it)" if v["bound_rules_out"] else ""
        lines.append(
            f"| {PAPER_NAMES[v['model']]} | {v['row']} | {v['pass_bound']:.2f}x | {v['vs_sgd']:.3f}x "
            f"| <= {v['target']:.2f}x |{verdict(v['ok'])}{ruled_out} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------- fidelity (fidelity.py)
def fidelity_summary(per_step: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Mode -> mean and min over the steps of the cosine to g_hat, mean and max of the relative error."""
    return {
        mode: dict(
            cosine_mean=statistics.fmean(figures["cosine"]),
            cosine_min=min(figures["cosine"]),
            rel_error_mean=statistics.fmean(figures["rel_error"]),
            rel_error_max=max(figures["rel_error"]),
        )
        for mode, figures in per_step.items()
    }


def fidelity_table(summary: dict[str, dict[str, float]]) -> str:
    lines = [
        "| Mode | cosine to g_hat, mean | min | ‖g_mode − g_hat‖ / ‖g_hat‖, mean | max |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for mode, s in summary.items():
        lines.append(
            f"| {mode} | {s['cosine_mean']:.4f} | {s['cosine_min']:.4f} | {s['rel_error_mean']:.4f} "
            f"| {s['rel_error_max']:.4f} |"
        )
    return "\n".join(lines)


def plot_fidelity(per_step: dict[str, dict[str, list[float]]], title: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for mode, figures in per_step.items():
        axes[0].plot(figures["cosine"], label=mode, lw=1)
        axes[1].plot(figures["rel_error"], label=mode, lw=1)
    axes[0].set_title("cosine(g_mode, g_hat)", fontsize=10)
    axes[1].set_title("||g_mode - g_hat|| / ||g_hat||", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- accuracy table (accuracy.py)
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def accuracy_summary(runs: list[dict]) -> list[dict]:
    """Per (condition, optimizer), in the order first run: test accuracy mean and std over the seeds,
    the mean wall time of a run, and the number of seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["condition"], run["optimizer"]), []).append(run)
    summary = []
    for (condition, optimizer), group in groups.items():
        mean, std = mean_std([run["test_accuracy"] for run in group])
        summary.append(
            dict(
                condition=condition,
                optimizer=optimizer,
                seeds=len(group),
                accuracy_mean=mean,
                accuracy_std=std,
                wall_s_mean=statistics.fmean(run["wall_s"] for run in group),
            )
        )
    return summary


def accuracy_table(summary: list[dict]) -> str:
    conditions = list(dict.fromkeys(s["condition"] for s in summary))
    optimizers = list(dict.fromkeys(s["optimizer"] for s in summary))
    cell = {(s["condition"], s["optimizer"]): s for s in summary}
    lines = [
        "| Optimizer | " + " | ".join(f"{c}: test acc. (%) | s / run" for c in conditions) + " |",
        "| --- |" + " ---: | ---: |" * len(conditions),
    ]
    for optimizer in optimizers:
        cells = []
        for condition in conditions:
            s = cell.get((condition, optimizer))
            cells += (
                ["-", "-"]
                if s is None
                else [f"{100 * s['accuracy_mean']:.2f} ± {100 * s['accuracy_std']:.2f}", f"{s['wall_s_mean']:.1f}"]
            )
        lines.append(f"| {optimizer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_accuracy(summary: list[dict], title: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(dict.fromkeys(s["condition"] for s in summary))
    optimizers = list(dict.fromkeys(s["optimizer"] for s in summary))
    cell = {(s["condition"], s["optimizer"]): s for s in summary}
    width = 0.8 / len(optimizers)
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(optimizers) * len(conditions)), 4))
    for i, optimizer in enumerate(optimizers):
        xs, means, stds = [], [], []
        for c, condition in enumerate(conditions):
            s = cell.get((condition, optimizer))
            if s is not None:
                xs.append(c + (i - (len(optimizers) - 1) / 2) * width)
                means.append(100 * s["accuracy_mean"])
                stds.append(100 * s["accuracy_std"])
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=optimizer)
    low = min(100 * (s["accuracy_mean"] - s["accuracy_std"]) for s in summary)
    ax.set_ylim(max(0, math.floor(low) - 2), 100)
    ax.set_xticks(range(len(conditions)), conditions)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- radius dynamics (radius_dynamics.py)
def plot_radius_dynamics(runs: dict[str, dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for label, run in runs.items():
        steps = range(len(run["loss"]))
        increase = [r * g for r, g in zip(run["rho"], run["grad_norm"])]
        axes[0].plot(steps, run["grad_norm"], label=label)
        axes[1].plot(steps, run["rho"], label=label)
        axes[2].plot(steps, increase, label=label)
        if "LE-SAM" in label:
            axes[3].plot(steps, run["sigma"], label=label, color="tab:orange")
    titles = ["gradient norm ||g||", "radius rho_t", "first-order loss increase rho_t ||g||", "loss budget sigma_t"]
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=9)
    fig.suptitle("synthetic data, small conv net: LE-SAM fixes the loss increase, SAM the radius", fontsize=10)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
