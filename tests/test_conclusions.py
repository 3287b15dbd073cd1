"""The report's conclusions and combined strategy follow the intervals, whatever they
say, in both languages."""

import re

from sa2va_contract.evaluation import EvaluationRow, EvaluationTable, Interval, row_label
from sa2va_tui.report.conclusions import combined_strategy, conclusions
from sa2va_tui.report.i18n import Translator

IDS = ["a", "b", "c", "d"]


def row(name, kind, dice, interval=None, versus=None, **label_args):
    values = {metric: list(dice) for metric in ("dice", "iou", "recall", "precision")}
    return EvaluationRow(name, row_label(name, **label_args), kind, IDS, values, label_args=label_args,
                         interval=interval, versus=versus or {})


def table(chooser_gap: Interval, combined_gap: Interval) -> EvaluationTable:
    out = EvaluationTable("test", IDS)
    out.add(row("baseline", "baseline", [0.5, 0.6, 0.7, 0.8], prompt="the vessels"))
    out.add(row("supervised_chooser", "baseline", [0.6, 0.7, 0.8, 0.9], Interval(0.1, 0.08, 0.12, images=4)))
    out.add(row("prompt_policy", "policy", [0.6, 0.7, 0.8, 0.9], Interval(0.1, 0.07, 0.13, seeds=3, images=4),
                {"supervised_chooser": chooser_gap}))
    out.add(row("postprocess_policy", "policy", [0.52, 0.62, 0.72, 0.82], Interval(0.02, -0.01, 0.05, 3, images=4),
                {"supervised_chooser": Interval(-0.08, -0.1, -0.06)}))
    out.add(row("combined", "policy", [0.62, 0.72, 0.82, 0.92], Interval(0.12, 0.1, 0.14, seeds=3, images=4),
                {"supervised_chooser": Interval(0.02, 0.0, 0.04), "prompt_policy": combined_gap,
                 "postprocess_policy": Interval(0.1, 0.08, 0.12)}))
    out.add(row("oracle_prompt", "upper_bound", [0.7, 0.8, 0.9, 1.0], Interval(0.2, 0.18, 0.22)))
    return out


def test_no_rl_method_beyond_noise_is_said_plainly():
    en = Translator("en")
    lines = conclusions(table(Interval(0.0, -0.02, 0.02), Interval(0.02, 0.0, 0.04)), en, "sa2va-tui evaluate x")
    text = "\n".join(lines)
    assert "On `test`, the best row is prompt policy, then post-processing policy: Dice 0.7700" in text
    assert ("prompt policy: +0.1000 [+0.0700, +0.1300] against the default prompt (better beyond noise); "
            "+0.0000 [-0.0200, +0.0200] against the supervised chooser (within noise).") in text
    assert "+0.0200 [-0.0100, +0.0500] against the default prompt (within noise)" in text
    assert "against the supervised chooser (worse beyond noise)" in text
    # The combination's interval against the chooser starts at 0: that is within noise too.
    assert "No RL method beats the supervised chooser beyond noise on `test`" in text
    assert "the best row takes 60% of its gain" in text and "fold 3 seeds each" in text


def test_a_method_that_clears_the_bar_is_named():
    lines = conclusions(table(Interval(0.03, 0.01, 0.05), Interval(0.02, 0.01, 0.03)), Translator("en"), "x")
    assert "Beyond noise, prompt policy beat the supervised chooser on `test`." in lines


def test_the_combined_strategy_says_whether_combining_adds():
    en = Translator("en")
    adds = combined_strategy(table(Interval(0.0, -0.02, 0.02), Interval(0.02, 0.01, 0.03)), en, "x")
    assert "The combination beats each of its parts beyond noise: the two policies are worth using together." in adds
    assert adds[-1].startswith("The strategy to use on this evidence: prompt policy, then post-processing policy")
    flat = combined_strategy(table(Interval(0.0, -0.02, 0.02), Interval(0.02, -0.01, 0.05)), en, "x")
    assert "The combination does not beat prompt policy beyond noise: the simpler strategy does as well." in flat
    assert flat[-1].startswith("The strategy to use on this evidence: prompt policy (Dice 0.7500")
    # The best mean within noise of the default: the best row that clears it beyond noise.
    data = table(Interval(0.0, -0.02, 0.02), Interval(0.02, -0.01, 0.05))
    data.row("combined").interval = Interval(0.12, -0.01, 0.25)
    assert combined_strategy(data, en, "x")[-1].startswith("The strategy to use on this evidence: supervised chooser")
    for row in data.rows[1:]:
        row.interval = Interval(row.interval.mean, -0.01, 0.3)
    assert combined_strategy(data, en, "x")[-1] == ("Nothing beats the default prompt beyond noise on `test`: keep the "
                                                    "default prompt.")


def test_no_table_and_the_chinese_words():
    en, zh = Translator("en"), Translator("zh")
    assert conclusions(None, en, "sa2va-tui evaluate r") == [
        "Not evaluated yet: `sa2va-tui evaluate r` makes the figures these conclusions come from."]
    data = table(Interval(0.0, -0.02, 0.02), Interval(0.02, -0.01, 0.05))
    data.warning = "val_reports"
    for line in conclusions(data, zh, "x") + combined_strategy(data, zh, "x"):
        leftover = re.sub(r"`[^`]*`", "", line)
        assert not re.findall(r"[A-Za-z]{2,}", leftover.replace("Dice", "")), line
    assert "这些结论基于负责选择的划分：应视为偏乐观。" in conclusions(data, zh, "x")


def test_the_app_s_finished_line_names_the_split_and_says_within_noise():
    """The figures the app shows (an experiment's summary in its event log) say which
    split they are on, their interval, and within noise where it covers 0."""
    from sa2va_contract.events import Finished
    from sa2va_tui.text import describe

    ppo = {"timesteps": 5000, "val_baseline_dice": 0.78, "val_policy_dice": 0.82, "val_dice_gain": 0.04,
           "val_dice_gain_interval": [0.03, 0.05]}
    line, style = describe(Finished("prompt_rl", summary=ppo))
    assert "val Dice 0.7800 -> 0.8200 (+0.0400 [+0.0300, +0.0500]; val chose this checkpoint" in line
    assert "reports on test" in line and "within noise" not in line and style == "green"
    tuned = {"finetune": {"split": "test", "dice_before": 0.78, "dice_after": 0.785, "dice_gain_interval": [-0.001, 0.01]}}
    line, _ = describe(Finished("reward_net", summary=tuned))
    assert "fine-tuned model on test: Dice 0.7800 -> 0.7850 (+0.0050 [-0.0010, +0.0100] within noise)" in line
