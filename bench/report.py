"""The benchmarks' reports: what is printed, written and drawn from their figures. No timing here,
so the tests can feed it made-up figures. The JSON files are written by common.write_json.

The step microbenchmark (bench/test_step_overhead.py): from the per-round times of its rows to the
byte-limit fraction, the speed-ups, the pass/short decisions against issue 14's targets, and the
printed tables. The time per epoch (bench/epoch_time.py): its table and chart. The radius
dynamics (bench/radius_dynamics.py): its chart.

Byte model (fp32, per parameter and step; README "byte model", docs/design.md §3): the ideal whole step
reads g for the norm (4), reads w, g and writes w, w_bak to perturb (16), and in one pass reads
w_bak, the final gradient and the base's state and writes w and the state: 20 for SGD with
momentum (w_bak, g, m in; w, m out), 28 for AdamW (w_bak, g, m, v in; w, m, v out). A copy_ moves
8 (read the source, write the destination), so the copy measured in the same run gives the
machine's bandwidth, and (ideal bytes / copy bandwidth) / measured time is the fraction of the limit.
"""

from __future__ import annotations

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
