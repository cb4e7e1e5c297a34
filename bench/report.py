"""The step microbenchmark's arithmetic (bench/test_step_overhead.py): from the per-round times of
its rows to the byte-limit fraction, the speed-ups, the pass/short decisions against issue 14's
targets, and the printed tables. No timing here, so the tests can feed it made-up figures.

Byte model (fp32, per parameter and step; README "byte model", docs/design.md §3): the ideal whole step
reads g for the norm (4), reads w, g and writes w, w_bak to perturb (16), and in one pass reads
w_bak, the final gradient and the base's state and writes w and the state: 20 for SGD with
momentum (w_bak, g, m in; w, m out), 28 for AdamW (w_bak, g, m, v in; w, m, v out). A copy_ moves
8 (read the source, write the destination), so the copy measured in the same run gives the
machine's bandwidth, and (ideal bytes / copy bandwidth) / measured time is the fraction of the limit.
"""

from __future__ import annotations

import statistics

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
