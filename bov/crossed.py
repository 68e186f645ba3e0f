"""A crossed study (two axes as one grid: variant x budget, variant x size, ...) from MLflow to tables and figures.

Runs are grouped by their coordinate tags (`coord.<axis>` columns, bov.tracking.TAG_COORD), never by parsing
level names. `report` writes, under the study's results folder:

* `table.{md,csv,tex}`: at each level of the second axis, every first-axis level against the baseline (and
  each other reference) at that same level, paired by seed; with a budget ladder, the compute multiplier
  of each variant (bov.scaling) as a column, or the one line that says why there is none;
* `compute.png`: the metric against training FLOPs, every seed, with the baseline's fitted ladder;
* `multipliers.png` (a budget axis) and `size_trend.md` / `size_trend_<variant>.png` (a size axis);
* `curves.png`: learning curves of every cell group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from bov import analysis as A
from bov import stats as S
from bov.figures import (
    plot_compute,
    plot_curves,
    plot_multipliers,
    plot_size_trend,
    save,
)
from bov.scaling import ALONG_SIZES, LadderError, along_ladder, format_multiplier, multipliers, size_trend


def report(study: A.Study, out_dir: Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """Tables and figures of a crossed study (see the module docstring)."""
    if study.runs.empty:
        raise ValueError(f"study {study.name!r} has no finished runs yet (run the sweep first)")
    first, second = study.axes
    a, b = f"coord.{first['name']}", f"coord.{second['name']}"
    metric, base = study.metric, study.baseline
    runs = study.runs.assign(compute=study.runs["tokens"] * study.runs["flops_per_token"])
    runs["compute_group"] = runs[b]
    table = S.compare_within(runs, group=b, by=a, baseline=base, metric=metric, order=first["levels"],
                             references=study.references)
    rank = {lv: i for i, lv in enumerate(second["levels"])}
    table = table.sort_values(b, key=lambda s: s.map(rank), kind="stable", ignore_index=True)
    shown = S.format_table(table, by=a, metric=metric, baseline=base)
    shown = shown.rename(columns={a: first["name"]})
    shown.insert(1, second["name"], table[b])
    out: dict[str, Any] = {"multipliers": None, "trends": {}, "fit": None}
    notes, files = [], []
    if second["kind"] == "budget":
        table, notes, files = _budget_section(study, runs, table, shown, out, out_dir)
    if second["kind"] == "size":
        notes, files = _size_section(study, runs, out, out_dir)
        table, worth = _with_worth_per_size(study, runs, table, shown)
        notes.append(worth)
    caption = _caption(study, runs, notes)
    files += A.write_table(table, out_dir, "table", by=a, metric=metric, baseline=base, caption=caption, shown=shown)
    files += save(plot_compute(runs, by=a, fit=out.pop("fit"), baseline=base, metric=metric, order=first["levels"],
                               title=study.name), out_dir, "compute")
    history = A.load_history(study.runs, tracking_uri=tracking_uri)
    files += save(plot_curves(history, metric=metric, order=study.levels, title=study.name), out_dir, "curves")
    return {**out, "table": table, "shown": shown, "caption": caption, "files": files}


def _budget_section(study: A.Study, runs, table, shown, out: dict, out_dir: Path):
    """A budget ladder: each variant's compute multiplier as table columns (added to `shown` in place), its
    figure, and the caption's account of the fit; or the one line that says why there is no multiplier."""
    a, b = (f"coord.{ax['name']}" for ax in study.axes)
    try:
        m = multipliers(runs, by=a, budget=b, baseline=study.baseline, metric=study.metric)
    except LadderError as e:
        return table, [f"No compute multiplier: {e}."], []
    fit = out["fit"] = m.attrs["fit"]
    out["multipliers"] = m
    table = table.merge(m[[a, b, "multiplier", "ci_low", "ci_high", "extrapolated", "note", "interpolated",
                           "interpolated_low", "interpolated_high"]]
                        .rename(columns={"ci_low": "multiplier_low", "ci_high": "multiplier_high",
                                         "note": "multiplier_note"}), on=[a, b], how="left")
    shown["× compute (95% CI)"] = [format_multiplier(*r) for r in zip(
        table["multiplier"], table["multiplier_low"], table["multiplier_high"], table["extrapolated"])]
    shown["× compute, no law (95% CI)"] = [format_multiplier(*r, False) for r in zip(
        table["interpolated"], table["interpolated_low"], table["interpolated_high"])]
    misses = ", ".join(f"{lv} {r:+.4f}" for lv, r in m.attrs["residuals"].items())
    note = (f"× compute: the baseline's compute at which its fitted ladder, {fit}, reaches the level's "
            f"loss, over the level's own compute; 95% interval by bootstrap over seeds ({len(m)} "
            "variant cells). Extrapolated: the loss lies outside the ladder's measured losses. "
            f"The ladder's measured mean minus the law, per budget: {misses}. × compute, no law: the "
            "same read between the two measured budgets that bracket the level's loss (log compute "
            "linear in loss), with the same bootstrap; '-' outside the measured losses.")
    files = save(plot_multipliers(m, by=a, title=f"{study.name}: compute-equivalent multiplier"), out_dir,
                 "multipliers")
    return table, [note], files


def _size_section(study: A.Study, runs, out: dict, out_dir: Path):
    """A size ladder: per variant, the gain and multiplier at each size, the fitted trend (`size_trend.md`) and
    its figure; the caption gets each trend's verdict line."""
    first, _ = study.axes
    a, b = (f"coord.{ax['name']}" for ax in study.axes)
    lines, files = [], []
    for variant in [lv for lv in first["levels"] if lv != study.baseline and lv in set(runs[a])]:
        try:
            sizes, trend = size_trend(runs, by=a, size=b, baseline=study.baseline, variant=variant,
                                      metric=study.metric)
        except LadderError as e:
            lines.append(f"No size trend for {variant}: {e}.")
            continue
        out["trends"][variant] = (sizes, trend)
        lines += [trend["text"], "", _size_rows(sizes).to_markdown(index=False, floatfmt=".4g"), "",
                  f"{trend['worth'][0].upper()}{trend['worth'][1:]}.", ""]
        files += save(plot_size_trend(sizes, trend, title=f"{study.name}: {variant}", metric=study.metric),
                      out_dir, f"size_trend_{variant}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "size_trend.md").write_text(f"# {study.name}: the gain against model size\n\n" + "\n".join(lines) + "\n")
    files.append(out_dir / "size_trend.md")
    return [ln for ln in lines if ln.startswith(("The gain", "No size"))], files


def _size_rows(sizes):
    """A size table as `size_trend.md` shows it: the axis by its name, the multiplier and its interval as one
    column."""
    sizes = sizes.rename(columns=lambda c: c.removeprefix("coord."))
    if "multiplier" not in sizes:
        return sizes
    shown = sizes.drop(columns=["multiplier", "multiplier_low", "multiplier_high"])
    shown["× compute (95% CI)"] = [format_multiplier(*r, False) for r in zip(
        sizes["multiplier"], sizes["multiplier_low"], sizes["multiplier_high"])]
    return shown


def _with_worth_per_size(study: A.Study, runs, table, shown):
    """The study table with every variant's multiplier per size (`along_ladder`, as in `size_trend.md` and the
    sweep's summary) as columns, and the same formatted in `shown` (in place); with the caption's line saying
    what it is, or why there is none."""
    a, b = (f"coord.{ax['name']}" for ax in study.axes)
    try:
        m = along_ladder(runs, by=a, rung=b, baseline=study.baseline, metric=study.metric)
    except LadderError as e:
        return table, f"No multiplier along sizes: {e}."
    table = table.merge(m.rename(columns={"ci_low": "multiplier_low", "ci_high": "multiplier_high"}), on=[a, b],
                        how="left")
    shown["× compute along sizes (95% CI)"] = [format_multiplier(*r, False) for r in zip(
        table["multiplier"], table["multiplier_low"], table["multiplier_high"])]
    return table, f"{ALONG_SIZES}."


def _caption(study: A.Study, runs, notes: list[str]) -> str:
    """The table's caption: what is compared, over how many seeds, the sections' notes and the run time."""
    first, second = study.axes
    seeds = sorted(set(runs["seed"].dropna()))
    caption = (f"{study.name}: {study.metric} by {first['name']} at each {second['name']}; mean ± std over seeds "
               f"({len(seeds)} seed(s)); Δ against {', '.join(study.references)} at the same {second['name']}, "
               "paired by seed. " + " ".join(notes))
    if "wall_s" in runs and runs["wall_s"].notna().any():
        caption += (f" Run time: {len(runs)} runs, {runs['wall_s'].sum() / 3600:.1f} h from each MLflow run's start "
                    "to its end (a run stopped and resumed counts its stop).")
    if len(seeds) < 2:
        caption += " One seed: an anecdote, not a finding."
    return caption
