"""The report as Markdown (the terminal shows it with rich)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

from sa2va_contract.evaluation import METRIC_NAMES, breakdown
from sa2va_tui.report.conclusions import combined_strategy, conclusions, interval_words, warning_sentence
from sa2va_tui.report.curves import curve_panels
from sa2va_tui.report.facts import EPISODE_LENGTH, ExperimentReport, ReportData
from sa2va_tui.report.i18n import Translator
from sa2va_tui.report.phrases import code, hint_text, indicator_text, metric_rows, number, problem_text, progress_text
from sa2va_tui.text import format_bytes, format_duration, format_time, place_name


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "") -> list[str]:
    """A Markdown table; `align` gives each column l or r (default l)."""
    marks = [("---:" if (align[i:i + 1] == "r") else "---") for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(marks) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def render_markdown(data: ReportData, lang: str = "en", curves: dict[str, Path] | None = None) -> str:
    """The whole report as Markdown; `curves` are the images written next to it."""
    tr = Translator(lang)
    parts = [
        _header(data, tr),
        _overview(data, tr),
        *(_experiment_section(exp, data, tr) for exp in data.experiments.values()),
        _gpu_section(data, tr),
        _masks_section(data, tr),
        _finish_section(data, tr),
        _comparison(data, tr),
        _problems_section(data, tr),
        _files_section(data, tr),
        _next_steps(data, tr),
        _indicators_section(data, tr),
        _evaluation_section(data, tr),
        _breakdown_section(data, tr),
        _conclusions_section(data, tr),
        _combined_section(data, tr),
        _curves_section(data, tr, curves),
    ]
    return "\n\n".join("\n".join(part) for part in parts) + "\n"


def _header(data: ReportData, tr: Translator) -> list[str]:
    if data.live:
        supervisor = tr("header.live", pid=data.supervisor_pid)
    else:
        supervisor = tr("header.not_live")
    return [
        f"# {tr('header.title', run=code(data.run_id))}",
        "",
        f"- {tr.item(tr('header.folder'), code(data.run_dir))}",
        f"- {tr.item(tr('header.started'), format_time(data.created_at))}",
        f"- {tr.item(tr('header.updated'), format_time(data.updated_at))}",
        f"- {tr.item(tr('header.generated'), format_time(data.generated_at))}",
        f"- {supervisor}",
    ]


def _overview(data: ReportData, tr: Translator) -> list[str]:
    rows = [(code(exp.name), tr.state(exp.shown_state), place_name(exp.state.gpu, exp.state.host), progress_text(exp.state),
             number(exp.state.episode_reward)) for exp in data.experiments.values()]
    headers = [tr("col.experiment"), tr("col.state"), "GPU", tr("col.progress"), tr("col.episode_reward")]
    return [f"## {tr('section.overview')}", "", *_table(headers, rows, "lllrr")]


def _experiment_section(exp: ExperimentReport, data: ReportData, tr: Translator) -> list[str]:
    s = exp.state
    lines = [f"## {tr('section.experiment', name=code(exp.name))}", "", tr.description(s.kind), ""]
    phase = f" ({tr.phase(s.phase)})" if s.phase and not s.terminal else ""
    lines += [
        f"- {tr.item(tr('exp.state'), tr.state(exp.shown_state) + phase)}",
        f"- {tr.item(tr('exp.pid'), exp.pid or '-')}",
        "- " + tr.items((tr("exp.device"), place_name(s.gpu, s.host)), (tr("exp.batch_size"), s.batch_size or "-"),
                        (tr("exp.attempts"), s.attempts)),
        f"- {tr.item(tr('exp.progress'), progress_text(s))}",
    ]
    waited = s.waited_s(data.generated_at if data.live else data.updated_at)
    if waited or s.state == "queued":
        lines.append(f"- {tr.item(tr('exp.queued'), format_duration(waited))}"
                     + (tr("exp.in_line", position=s.queue_position) if s.state == "queued" else ""))
    if s.episode_reward is not None or EPISODE_LENGTH in s.metrics:
        lines.append("- " + tr.items((tr("exp.episode_reward"), number(s.episode_reward)),
                                     (tr("exp.episode_length"), number(s.metrics.get(EPISODE_LENGTH), ".3g"))))
    if s.failure:
        kind = tr.failure_kind(s.failure.kind)
        lines.append("- " + tr.item(tr("exp.failure", kind=kind), code(s.failure.message)))
    rows = [(code(row.key), row.format(s.metrics)) for row in metric_rows(s) if row.key in s.metrics]
    if rows:
        step = tr("exp.at_step", step=s.metrics_step) if s.metrics_step is not None else ""
        lines += ["", tr.item(tr("exp.latest_metrics") + step, ""), "",
                  *_table([tr("col.metric"), tr("col.value")], rows, "lr")]
    lines += ["", tr.item(tr("exp.analysis"), ""), ""]
    lines += [f"- {hint_text(h, exp, tr)}" for h in exp.hints] or [f"- {tr('exp.no_hints')}"]
    lines += ["", tr.item(tr("exp.files"), ""), ""]
    if exp.log:
        lines.append(f"- {tr.items((tr('exp.log'), code(exp.log)), (tr('exp.follow'), code(f'tail -f {exp.log}')))}")
    if exp.tensorboard:
        command = code(f"sa2va-tui tensorboard {data.run_ref}")
        lines.append(f"- {tr.items(('TensorBoard', code(exp.tensorboard)), (tr('exp.open'), command))}")
    if not exp.log and not exp.tensorboard:
        lines.append(f"- {tr('exp.no_files')}")
    return lines


def _gpu_section(data: ReportData, tr: Translator) -> list[str]:
    lines = [f"## {tr('section.gpus')}", ""]
    if data.gpu_available is None:
        return lines + [tr("gpu.no_samples")]
    if not data.gpu_available:
        return lines + [tr("gpu.none", message=code(data.gpu_message))]
    lines += [tr("gpu.as_of", time=format_time(data.gpu_sampled_at)), ""]
    rows = []
    by_host = any(g.host for g in data.gpus)  # a cluster: its GPUs grouped by node
    for g in sorted(data.gpus, key=lambda g: g.host or "") if by_host else data.gpus:
        memory = f"{format_bytes(g.memory_used)} / {format_bytes(g.memory_total)}"
        ours = ", ".join(f"{code(name)} ({format_bytes(used)})" for name, used in g.experiments) or "-"
        steady = (tr("gpu.history", mean=g.util_mean, std=g.util_std, peak=format_bytes(g.memory_peak),
                     n=g.busy_samples)
                  if g.util_std is not None else "-")
        rows.append((*((g.host or "-",) if by_host else ()), g.index, g.name or "N/A",
                     "N/A" if g.utilization is None else f"{g.utilization}%", memory, ours, steady))
    headers = [*((tr("col.host"),) if by_host else ()), "GPU", tr("col.name"), tr("col.utilisation"),
               tr("col.memory"), tr("col.experiments"), tr("col.while_ours")]
    return lines + _table(headers, rows, ("l" if by_host else "") + "rlrrll")


def _masks_section(data: ReportData, tr: Translator) -> list[str]:
    """What the segmenter was asked for, counted: calls, distinct pairs, cache reads."""
    lines = [f"## {tr('section.masks')}", ""]
    counts = data.mask_counts
    if "model_calls" not in counts:
        return lines + [tr("masks.none")]
    distinct = counts.get("distinct_pairs")
    said = [tr("masks.counts", calls=counts["model_calls"], distinct=distinct if distinct is not None else "?",
               hits=counts.get("cache_hits", 0))]
    if distinct is not None and counts["model_calls"] == 0 and distinct:
        said.append(tr("masks.warm"))
    elif distinct is not None and counts["model_calls"] == distinct:
        said.append(tr("masks.once"))
    stage = data.mask_stage
    if stage is None:
        said.append(tr("masks.no_stage"))
    else:
        order = ", ".join(code(n) for n in stage.summary.get("order", stage.pairs_ready)) or "-"
        said.append(tr("masks.stage", state=tr.state(stage.state), done=stage.timesteps, total=stage.total,
                       devices=", ".join(stage.devices) or "-", order=order))
    return lines + [" ".join(said)]


def _finish_section(data: ReportData, tr: Translator) -> list[str]:
    rows = []
    for exp in data.experiments.values():
        s = exp.state
        rate = f"{s.rate:.1f}" if s.rate and data.live and not s.terminal else "-"
        remaining = format_duration(exp.remaining_s) if exp.remaining_s is not None else "-"
        rows.append((code(exp.name), tr.state(exp.shown_state), exp.remaining_timesteps if s.total else "-", rate,
                     remaining, format_time(exp.finish_at)))
    headers = [tr("col.experiment"), tr("col.state"), tr("col.remaining_steps"), tr("col.rate"),
               tr("col.remaining_time"), tr("col.finish")]
    lines = [f"## {tr('section.finish')}", "", *_table(headers, rows, "llrrrl"), ""]
    if data.experiments and all(e.state.state == "finished" for e in data.experiments.values()):
        lines.append(tr("finish.done", time=format_time(data.finish_at)))
    elif data.live and data.finish_at is not None:
        lines.append(tr("finish.expected", time=format_time(data.finish_at),
                        left=format_duration(data.finish_at - data.generated_at)))
    elif data.live:
        lines.append(tr("finish.unknown"))
    else:
        lines.append(tr("finish.not_running", command=code(f"sa2va-tui resume {data.run_ref}")))
    return lines


def _comparison(data: ReportData, tr: Translator) -> list[str]:
    """Side by side; the stability and value-estimate words follow the app's hints."""
    rows = []
    for exp in data.experiments.values():
        metrics = exp.state.metrics
        flagged = {h.key for h in exp.hints}
        kl, ev = metrics.get("train/approx_kl"), metrics.get("train/explained_variance")
        stability = "-" if kl is None else f"{kl:.3g} " + tr(
            "cmp.unstable" if "train/approx_kl" in flagged else "cmp.stable")
        value = "-" if ev is None else f"{ev:.3g} " + tr(
            "cmp.value_learning" if "train/explained_variance" in flagged else "cmp.value_good")
        reward = number(exp.state.episode_reward)
        if exp.trend is not None:
            reward += f" ({tr.trend(exp.trend)})"
        fraction = exp.state.fraction
        rows.append((code(exp.name), "-" if fraction is None else f"{fraction:.0%}", reward, stability, value))
    headers = [tr("col.experiment"), tr("col.progress"), tr("col.episode_reward"), tr("col.stability"),
               tr("col.value_estimate")]
    return [f"## {tr('section.comparison')}", "", *_table(headers, rows, "lrrrr")]


def _problems_section(data: ReportData, tr: Translator) -> list[str]:
    lines = [f"## {tr('section.problems')}", ""]
    if not data.problems:
        return lines + [tr("problems.none")]
    for p in data.problems:
        lines.append(f"- {format_time(p.time)} {tr.item(code(p.experiment), problem_text(p, tr))}")
    return lines


def _files_section(data: ReportData, tr: Translator) -> list[str]:
    return [f"## {tr('section.files')}", "", "```", *data.files, "```"]


def _next_steps(data: ReportData, tr: Translator) -> list[str]:
    """Exact commands, as they work from the current folder."""
    ref = data.run_ref
    lines = [f"## {tr('section.next')}", ""]
    finished = [e.name for e in data.experiments.values() if e.state.state == "finished"]
    if finished:
        what = tr("next.evaluate", names=tr.names(code(n) for n in finished))
        lines.append("- " + tr.item(what, code(f"sa2va-tui evaluate {ref}")))
    unfinished = [e.name for e in data.experiments.values() if e.shown_state in ("interrupted", "failed", "stopped")]
    if unfinished and not data.live:
        what = tr("next.resume", names=tr.names(code(n) for n in unfinished))
        lines.append("- " + tr.item(what, code(f"sa2va-tui resume {ref}")))
    if data.live:
        lines.append(f"- {tr.item(tr('next.status'), code(f'sa2va-tui status {ref}'))}")
    lines.append(f"- {tr.item(tr('next.report'), code(f'sa2va-tui report {ref} -o report.md'))}")
    lines.append(f"- {tr.item(tr('next.tensorboard'), code(f'sa2va-tui tensorboard {ref}'))}")
    return lines


_MARKS = {"pass": "✓", "fail": "✗", "unknown": "?"}


def _indicators_section(data: ReportData, tr: Translator) -> list[str]:
    lines = [f"## {tr('section.indicators')}", ""]
    for ind in data.indicators:
        lines.append(f"- {_MARKS[ind.status]} {tr(f'ind.{ind.name}')} — "
                     f"{tr.item(tr.status(ind.status), indicator_text(ind, tr))}")
    return lines


def _evaluation_section(data: ReportData, tr: Translator) -> list[str]:
    lines = [f"## {tr('section.evaluation')}", ""]
    table = data.evaluation
    if table is None:
        return lines + [tr("eval.none", command=code(f"sa2va-tui evaluate {data.run_ref}"))]
    lines += [tr("eval.intro", split=code(table.split), chosen=code(table.chosen_on), n=len(table.sample_ids),
                 time=format_time(table.created)), ""]
    warning = warning_sentence(table, tr)
    if warning:
        lines += [f"**{warning}**", ""]
    rows = []
    for row in table.rows:
        cells = [f"{row.mean(m):.4f} ± {row.std(m):.3f}" for m in METRIC_NAMES]
        deltas = ["", ""] if row.name == table.baseline else [interval_words(row.interval, tr),
                                                               f"{table.delta(row, 'iou'):+.4f}"]
        rows.append((tr.row_label(row), *cells, *deltas, len(row.seeds) or ""))
    headers = [tr("col.row"), "Dice", "IoU", "Recall", "Precision", tr("col.delta_interval"), "Δ IoU", tr("col.seeds")]
    lines += _table(headers, rows, "lrrrrrrr")
    lines += ["", tr("eval.interval_note")]
    seeded = [(row, run) for row in table.rows for run in row.seeds]
    if seeded:
        base = table.row(table.baseline).values["dice"]
        seed_rows = [(tr.row_label(row), code(run.experiment), run.seed, f"{run.mean('dice'):.4f}",
                      f"{sum(a - b for a, b in zip(run.values['dice'], base)) / len(base):+.4f}")
                     for row, run in seeded]
        lines += ["", tr("eval.per_seed"), "",
                  *_table([tr("col.row"), tr("col.experiment"), tr("col.seed"), "Dice", "Δ Dice"], seed_rows, "llrrr")]
    if table.missing:
        lines += ["", tr("eval.missing", names=tr.names(code(n) for n in table.missing))]
    return lines


def _breakdown_section(data: ReportData, tr: Translator) -> list[str]:
    """Each row's gain by the dataset's condition, else by quarter of the baseline's Dice."""
    table = data.evaluation
    lines = [f"## {tr('section.breakdown')}", ""]
    if table is None:
        return lines + [tr("eval.none", command=code(f"sa2va-tui evaluate {data.run_ref}"))]
    by = "condition" if table.conditions is not None else "difficulty"
    groups = breakdown(table, by)
    others = [row for row in table.rows if row.name != table.baseline]
    rows = []
    for group in groups:
        name = code(group.name) if by == "condition" else tr(
            "breakdown.quarter", name=group.name, low=group.bounds[0], high=group.bounds[1])
        cells = [f"{group.deltas[row.name]:+.3f}" + (f" ({share:.0%})" if (share := group.shares[row.name]) is not None
                                                      else "") for row in others]
        rows.append((name, group.samples, f"{group.baseline_dice:.3f}", *cells))
    headers = [tr(f"col.{by}"), tr("col.images"), tr("col.baseline_dice"), *(code(row.name) for row in others)]
    return lines + [tr(f"breakdown.{by}"), "", *_table(headers, rows, "l" + "r" * (len(headers) - 1))]


def _conclusions_section(data: ReportData, tr: Translator) -> list[str]:
    command = f"sa2va-tui evaluate {data.run_ref}"
    return [f"## {tr('section.conclusions')}", "", *(f"- {s}" for s in conclusions(data.evaluation, tr, command))]


def _combined_section(data: ReportData, tr: Translator) -> list[str]:
    command = f"sa2va-tui evaluate {data.run_ref}"
    return [f"## {tr('section.combined')}", "", *(f"- {s}" for s in combined_strategy(data.evaluation, tr, command))]


def _curves_section(data: ReportData, tr: Translator, curves: dict[str, Path] | None) -> list[str]:
    lines = [f"## {tr('section.curves')}", ""]
    if curves is None:
        lines += [tr("curves.not_written"), ""]
    elif not curves:
        lines += [tr("curves.no_data"), ""]
    for curve, path in (curves or {}).items():
        lines += [f"![{tr(f'curve.{curve}')}]({path.name})", ""]
    panels = curve_panels(data)
    keys = [*panels.get("episode_reward", []), *panels.get("reward_net", [])]
    rows = [(code(name), code(key), len(points), number(points[0][1]), number(points[-1][1]))
            for name, exp in data.experiments.items() for key in keys for points in [exp.series.get(key)] if points]
    if rows:
        headers = [tr("col.experiment"), tr("col.metric"), tr("col.readings"), tr("col.first"), tr("col.last")]
        lines += _table(headers, rows, "llrrr")
    return lines
