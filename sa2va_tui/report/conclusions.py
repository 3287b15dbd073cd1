"""What the evaluation table says, in sentences: the report's evaluation notes, its
"preliminary conclusions" and its "combined strategy". Each sentence follows the
intervals the engine stored (beyond noise only where an interval excludes 0),
whatever the truth is; the Markdown and the JSON report say the same words."""

from __future__ import annotations

from sa2va_contract.evaluation import PARTS, EvaluationRow, EvaluationTable, Interval
from sa2va_tui.report.i18n import Translator
from sa2va_tui.report.phrases import code

CHOOSER = "supervised_chooser"
OWN_EXPRESSION = "own_expression"


def interval_words(interval: Interval | None, tr: Translator, mark: bool = True) -> str:
    """`+0.0412 [+0.0301, +0.0519]`, with "within noise" where the interval covers 0
    (unless `mark` is off: a sentence gives its verdict itself)."""
    if interval is None:
        return ""
    text = f"{interval.mean:+.4f} [{interval.low:+.4f}, {interval.high:+.4f}]"
    return f"{text} {tr('eval.within_noise')}" if mark and interval.within_noise else text


def _bare(interval: Interval | None, tr: Translator) -> str:
    return interval_words(interval, tr, mark=False)


def verdict(interval: Interval, tr: Translator) -> str:
    if interval.low > 0:
        return tr("verdict.above")
    if interval.high < 0:
        return tr("verdict.below")
    return tr("verdict.noise")


def warning_sentence(table: EvaluationTable, tr: Translator) -> str | None:
    return tr.optional(f"eval.warning.{table.warning}") if table.warning else None


def conclusions(table: EvaluationTable | None, tr: Translator, evaluate_command: str) -> list[str]:
    """The preliminary conclusions: the best row on the reported split, each method
    against the default prompt and the supervised chooser (and the image's own
    expression where the dataset has one), and how much of the oracle's gain is taken."""
    if table is None:
        return [tr("concl.not_evaluated", command=code(evaluate_command))]
    split = code(table.split)
    out = []
    best = table.best()
    if best is not None:
        delta = interval_words(best.interval, tr) if best.interval else f"{table.delta(best, 'dice'):+.4f}"
        out.append(tr("concl.best", split=split, row=tr.row_label(best), dice=best.mean("dice"), delta=delta))
        if best.name == table.baseline:
            out.append(tr("concl.best_is_default"))
        elif not best.is_method:
            out.append(tr("concl.best_is_baseline"))
    methods = [row for row in table.rows if row.is_method and row.interval is not None]
    for row in methods:
        bar = row.versus.get(CHOOSER)
        words = {"row": tr.row_label(row), "against_default": _bare(row.interval, tr),
                 "verdict_default": verdict(row.interval, tr)}
        if bar is None:
            out.append(tr("concl.method_alone", **words))
        else:
            out.append(tr("concl.method", **words, against_bar=_bare(bar, tr), verdict_bar=verdict(bar, tr)))
        own = row.versus.get(OWN_EXPRESSION)
        if own is not None:
            out.append(tr("concl.own_expression", row=tr.row_label(row), delta=_bare(own, tr),
                          verdict=verdict(own, tr)))
    judged = [row for row in methods if CHOOSER in row.versus]
    if judged:
        winners = [tr.row_label(row) for row in judged if row.versus[CHOOSER].low > 0]
        out.append(tr("concl.rl_some", names=tr.names(winners), split=split) if winners
                   else tr("concl.rl_none", split=split))
    if table.has("oracle_prompt") and best is not None:
        oracle = table.row("oracle_prompt")
        headroom = table.delta(oracle, "dice")
        share = table.delta(best, "dice") / headroom if headroom > 1e-12 else 0.0
        out.append(tr("concl.oracle", dice=oracle.mean("dice"), share=max(0.0, share)))
    seeds = max((row.interval.seeds for row in methods), default=0)
    if methods:
        out.append(tr("concl.seeds", seeds=seeds) if seeds > 1 else tr("concl.one_seed"))
    if table.warning in ("no_test_split", "val_reports", "train_reports"):
        out.append(tr("concl.optimistic"))
    return out


def combined_strategy(table: EvaluationTable | None, tr: Translator, evaluate_command: str) -> list[str]:
    """The prompt policy then the post-processing policy: what it gains, whether it
    adds to each part alone, and which strategy the evidence favours."""
    if table is None:
        return [tr("concl.not_evaluated", command=code(evaluate_command))]
    out = []
    if table.has("combined") and table.row("combined").interval is not None:
        row = table.row("combined")
        out.append(tr("comb.result", dice=row.mean("dice"), delta=_bare(row.interval, tr),
                      verdict=verdict(row.interval, tr)))
        parts = [(table.row(part), row.versus[part]) for part in PARTS["combined"]
                 if part in row.versus and table.has(part)]
        for part, against in parts:
            out.append(tr("comb.part", part=tr.row_label(part), delta=_bare(against, tr),
                          verdict=verdict(against, tr)))
        not_beaten = [tr.row_label(part) for part, against in parts if against.low <= 0]
        if parts:
            out.append(tr("comb.no_gain", names=tr.names(not_beaten)) if not_beaten else tr("comb.adds"))
    else:
        out.append(tr("comb.missing"))
    best = _best_strategy(table)
    if best is not None and best.name == table.baseline:
        out.append(tr("comb.keep_default", split=code(table.split)))
    elif best is not None:
        out.append(tr("comb.best", row=tr.row_label(best), dice=best.mean("dice"), split=code(table.split)))
    return out


def _best_strategy(table: EvaluationTable) -> EvaluationRow | None:
    """The row to use on this evidence: of the rows that beat the default prompt beyond
    noise, the best; the default prompt when none does; and of a combination that does
    not beat one of its parts beyond noise, that simpler part."""
    if not table.has(table.baseline):
        return None
    ahead = [row for row in table.rows if row.kind != "upper_bound" and row.interval is not None
             and row.interval.low > 0]
    if not ahead:
        return table.row(table.baseline)
    best = max(ahead, key=lambda row: row.mean("dice"))
    if best.name not in PARTS:
        return best
    parts = [table.row(part) for part in PARTS[best.name] if table.has(part) and part in best.versus]
    equal = [part for part in parts if best.versus[part.name].low <= 0]
    return max(equal, key=lambda row: row.mean("dice")) if equal else best
