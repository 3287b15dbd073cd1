"""Every sentence and heading of the status report, in English and Chinese.

One table of messages, one entry per key, both languages side by side, so that a
sentence is never added in one language only (a test renders real reports in both
and checks that no English sentence is left in the Chinese one). Identifiers, paths,
commands and metric names stay as they are: the report puts them in code spans.
"""

from __future__ import annotations

from typing import Any, Iterable

LANGUAGES = ("en", "zh")

#: key -> (English, Chinese); placeholders in str.format syntax.
MESSAGES: dict[str, tuple[str, str]] = {
    # header
    "header.title": ("Status report of run {run}", "运行 {run} 的状态报告"),
    "header.folder": ("Run folder", "运行目录"),
    "header.started": ("Started", "开始时间"),
    "header.updated": ("Last update", "最近更新"),
    "header.generated": ("Report written", "报告生成时间"),
    "header.live": ("Running: supervisor pid {pid}", "正在运行：监督进程号 {pid}"),
    "header.not_live": ("Not running: no supervisor is running this run", "未在运行：没有监督进程在运行此实验组"),
    # sections
    "section.overview": ("Overview", "概览"),
    "section.experiment": ("Experiment {name}", "实验 {name}"),
    "section.gpus": ("GPU usage", "GPU 使用情况"),
    "section.masks": ("Masks", "掩码"),
    "section.finish": ("Expected finish", "预计完成时间"),
    "section.comparison": ("Comparison of the experiments", "实验对比"),
    "section.problems": ("Problems and how they were resolved", "问题及处理方式"),
    "section.files": ("Output files", "输出文件"),
    "section.next": ("Next steps", "后续步骤"),
    "section.indicators": ("Success indicators", "成功指标"),
    "section.evaluation": ("Evaluation", "评估结果"),
    "section.curves": ("Learning curves", "学习曲线"),
    # table columns
    "col.experiment": ("experiment", "实验"),
    "col.state": ("state", "状态"),
    "col.host": ("host", "主机"),
    "col.progress": ("progress", "进度"),
    "col.episode_reward": ("episode reward", "回合奖励"),
    "col.metric": ("metric", "指标"),
    "col.value": ("value", "数值"),
    "col.name": ("name", "名称"),
    "col.utilisation": ("utilisation", "利用率"),
    "col.memory": ("memory", "显存"),
    "col.experiments": ("experiments on it", "其上的实验"),
    "col.while_ours": ("while ours ran", "我们的实验运行期间"),
    "col.remaining_steps": ("timesteps left", "剩余时间步"),
    "col.rate": ("steps/s", "步/秒"),
    "col.remaining_time": ("time left", "剩余时间"),
    "col.finish": ("finish", "完成时间"),
    "col.stability": ("policy stability (`approx_kl`)", "策略稳定性（`approx_kl`）"),
    "col.value_estimate": ("value estimate (`explained_variance`)", "价值估计（`explained_variance`）"),
    "col.row": ("row", "行"),
    "col.readings": ("readings", "记录数"),
    "col.first": ("first", "首个值"),
    "col.last": ("last", "最新值"),
    # one experiment
    "exp.state": ("State", "状态"),
    "exp.pid": ("Process id", "进程号"),
    "exp.device": ("Device", "设备"),
    "exp.progress": ("Progress", "进度"),
    "exp.episode_reward": ("Episode reward", "回合奖励"),
    "exp.batch_size": ("batch size", "批大小"),
    "exp.attempts": ("attempts", "尝试次数"),
    "exp.queued": ("Waited in line for a device", "排队等待设备"),
    "exp.in_line": (", still waiting: #{position} in line", "，仍在等待：排第 {position} 位"),
    "exp.episode_length": ("episode length", "回合长度"),
    "exp.failure": ("Last failure ({kind})", "最近一次失败（{kind}）"),
    "exp.at_step": (" (at step {step})", "（第 {step} 步）"),
    "exp.latest_metrics": ("Latest metrics", "最新指标"),
    "exp.analysis": ("Analysis", "分析"),
    "exp.no_hints": ("Nothing to remark yet.", "暂无需要注意的情况。"),
    "exp.files": ("Files", "文件"),
    "exp.log": ("Log", "日志"),
    "exp.follow": ("follow it with", "实时查看"),
    "exp.open": ("open it with", "打开方式"),
    "exp.no_files": ("No log or TensorBoard file yet.", "尚无日志或 TensorBoard 文件。"),
    # what each experiment does
    "desc.prompt_rl": (
        "A PPO agent picks which candidate text prompt to send to the segmenter; its reward is the Dice gain each "
        "choice brings over the previous mask.",
        "PPO 智能体选择发送给分割模型的候选文本提示；奖励是每次选择相对上一个掩码带来的 Dice 增益。"),
    "desc.postprocess_rl": (
        "A PPO agent edits the segmenter's mask with a sequence of operations (dilate, erode, fill holes, ...) "
        "until it stops; its reward is the change in Dice of each step.",
        "PPO 智能体用一系列操作（膨胀、腐蚀、填洞等）修改分割模型的掩码直到停止；奖励是每一步带来的 Dice 变化。"),
    "desc.reward_net": (
        "A small CNN learns to predict a mask's Dice, then guides fine-tuning of the segmenter on images without "
        "their labels.",
        "一个小型 CNN 学习预测掩码的 Dice，然后在不使用标注的图像上引导分割模型微调。"),
    "desc.other": ("An experiment of kind {kind}.", "类型为 {kind} 的实验。"),
    # states, phases, trends, statuses
    "state.pending": ("pending", "等待中"),
    "state.queued": ("queued", "排队中"),
    "state.running": ("running", "运行中"),
    "state.stalled": ("stalled", "停滞"),
    "state.paused": ("paused", "已暂停"),
    "state.restarting": ("restarting", "重启中"),
    "state.failed": ("failed", "失败"),
    "state.finished": ("finished", "已完成"),
    "state.stopped": ("stopped", "已停止"),
    "state.interrupted": ("interrupted", "已中断"),
    "phase.loading_model": ("loading the model", "加载模型"),
    "phase.caching_masks": ("caching masks", "缓存掩码"),
    "phase.training": ("training", "训练中"),
    "phase.evaluating": ("evaluating", "评估中"),
    "phase.saving": ("saving", "保存中"),
    "trend.rising": ("rising", "上升"),
    "trend.flat": ("flat", "持平"),
    "trend.falling": ("falling", "下降"),
    "status.pass": ("passed", "通过"),
    "status.fail": ("not met", "未通过"),
    "status.unknown": ("cannot tell", "无法判断"),
    "failure.oom": ("out of memory", "显存不足"),
    "failure.error": ("error", "错误"),
    "failure.startup": ("failed at start-up", "启动失败"),
    "failure.killed": ("killed", "被终止"),
    "failure.disk_full": ("disk full", "磁盘已满"),
    "restart.oom": ("automatically after running out of memory", "因显存不足自动重启"),
    "restart.manual": ("by hand", "手动重启"),
    "restart.error": ("automatically after a crash (`recovery.retry_errors`)", "崩溃后自动重启（`recovery.retry_errors`）"),
    "restart.resume": ("when the run was resumed", "继续运行时重启"),
    # hints (the same remarks as sa2va_tui.analysis, which words them in English)
    "hint.train/explained_variance": (
        "value function still learning (explained_variance {value:.2g} < {limit:g})",
        "价值函数仍在学习（`explained_variance` {value:.2g} < {limit:g}）"),
    "hint.train/approx_kl": (
        "large policy updates (approx_kl {value:.3g} > {limit:g}): a lower learning rate or clip range steadies them",
        "策略更新幅度过大（`approx_kl` {value:.3g} > {limit:g}）：降低学习率或裁剪范围可使其平稳"),
    "hint.train/clip_fraction": (
        "most updates clipped (clip_fraction {value:.3f} > {limit:g})",
        "大部分更新被裁剪（`clip_fraction` {value:.3f} > {limit:g}）"),
    "hint.trend": ("reward {trend}", "奖励{trend}"),
    # GPUs
    "gpu.no_samples": ("This run recorded no GPU information.", "此运行没有记录 GPU 信息。"),
    "gpu.none": ("No NVIDIA GPU ({message}): every experiment ran on the CPU.",
                 "没有 NVIDIA GPU（{message}）：所有实验都在 CPU 上运行。"),
    "gpu.as_of": ("Latest sample: {time}.", "最近一次采样：{time}。"),
    "gpu.history": ("mean {mean:.0f}%, spread {std:.1f} points, memory up to {peak}, over {n} samples",
                    "平均 {mean:.0f}%，波动 {std:.1f} 个百分点，显存最高 {peak}（{n} 次采样）"),
    # masks
    "masks.none": ("This run recorded no count of its mask work.", "此运行没有记录掩码计算的次数。"),
    "masks.counts": ("The model was called for {calls} (image, prompt) pairs; the run's experiments need {distinct} "
                     "distinct pairs; {hits} reads were answered by the mask cache.",
                     "模型共计算了 {calls} 个（图像，提示）对；本次运行的实验需要 {distinct} 个不同的对；"
                     "掩码缓存回答了 {hits} 次读取。"),
    "masks.once": ("Each distinct pair was computed once.", "每个不同的对只计算了一次。"),
    "masks.warm": ("Every pair was already in the cache: no model call.", "所有的对都已在缓存中：没有调用模型。"),
    "masks.stage": ("The mask stage ({state}) computed {done} of {total} pairs on {devices}, for {order} in that "
                    "order.", "掩码阶段（{state}）在 {devices} 上计算了 {total} 个对中的 {done} 个，依次为 {order}。"),
    "masks.no_stage": ("This run had no mask stage: each experiment filled the cache itself.",
                       "此运行没有掩码阶段：每个实验各自填充缓存。"),
    # finish
    "finish.done": ("The whole run finished at {time}.", "整个运行已于 {time} 完成。"),
    "finish.expected": ("The whole run should finish at {time} (in {left}).", "整个运行预计于 {time} 完成（还需 {left}）。"),
    "finish.unknown": ("The whole run's finish time is not known yet.", "整个运行的完成时间尚无法估计。"),
    "finish.not_running": ("Nothing runs now; {command} continues what is unfinished.",
                           "当前没有任何实验在运行；{command} 可继续未完成的实验。"),
    # comparison
    "cmp.stable": ("steady", "平稳"),
    "cmp.unstable": ("large updates", "更新过大"),
    "cmp.value_learning": ("still learning", "仍在学习"),
    "cmp.value_good": ("explains the returns", "能解释回报"),
    # problems
    "problems.none": ("No problem: no failure and no restart was recorded.", "没有问题：未记录任何失败或重启。"),
    "problem.failed": ("failed ({kind}) at step {step}, batch size {batch}, on {gpu}",
                       "在第 {step} 步失败（{kind}），批大小 {batch}，位于 {gpu}"),
    "problem.exit_code": (", exit code {code}", "，退出码 {code}"),
    "problem.restart": ("restarted", "被重启"),
    "problem.unresolved": ("Not restarted", "未重启"),
    "problem.restarted": ("Restarted {reason} (attempt {attempt}): {changes}",
                          "{reason}（第 {attempt} 次尝试）：{changes}"),
    "problem.changed": ("{what} {old} → {new}", "{what} {old} → {new}"),
    "problem.from_checkpoint": ("resumed from checkpoint {path}", "从检查点 {path} 继续"),
    "problem.from_start": ("started over from the beginning", "从头开始"),
    "problem.outcome": ("Now: {state}", "当前：{state}"),
    "problem.interrupted": ("left unfinished at step {step}: its supervisor is gone.",
                            "在第 {step} 步时中断：其监督进程已不在运行。"),
    "problem.sentence": ("{what}. {resolution}. {outcome}.", "{what}。{resolution}。{outcome}。"),
    "change.batch_size": ("batch size", "批大小"),
    "change.gpu": ("device", "设备"),
    # next steps
    "next.evaluate": ("Evaluate the finished experiments ({names}) on the held-out split (val chose, test reports)",
                      "在留出的划分上评估已完成的实验（{names}）（由验证划分选择，在测试划分上报告）"),
    "next.resume": ("Continue the unfinished experiments ({names}) from their last checkpoints",
                    "从最近的检查点继续未完成的实验（{names}）"),
    "next.status": ("Follow the run", "查看运行状态"),
    "next.report": ("Write this report to a file, with its curves", "将本报告连同曲线写入文件"),
    "next.tensorboard": ("Look at every curve in one TensorBoard", "在同一个 TensorBoard 中查看所有曲线"),
    # indicators
    "ind.reward_rising": ("Episode reward rising", "回合奖励上升"),
    "ind.no_crash": ("No crash", "没有崩溃"),
    "ind.checkpoints_saved": ("Checkpoints saved", "检查点已保存"),
    "ind.tensorboard_written": ("TensorBoard curves written", "TensorBoard 曲线已写入"),
    "ind.gpu_steady": ("GPU use steady", "GPU 使用平稳"),
    "ind.trend": ("{name} {trend}", "{name} {trend}"),
    "ind.too_few": ("{name} has {n} readings, too few to judge", "{name} 只有 {n} 条记录，不足以判断"),
    "ind.no_rewards": ("no episode reward recorded yet", "尚未记录回合奖励"),
    "ind.crashed": ("crashed: {names}", "崩溃：{names}"),
    "ind.failed": ("failed for good: {names}", "最终失败：{names}"),
    "ind.oom": ("out-of-memory failures: {n}, restarted: {restarted}", "显存不足失败 {n} 次，已重启 {restarted} 次"),
    "ind.no_failure": ("no failure recorded", "未记录任何失败"),
    "ind.checkpoint": ("{name} at step {step}", "{name} 于第 {step} 步"),
    "ind.no_checkpoint": ("{name} has none on disk", "{name} 磁盘上没有检查点"),
    "ind.nothing_trained": ("no experiment has trained yet", "尚无实验开始训练"),
    "ind.records": ("{name}: {n} records", "{name}：{n} 条记录"),
    "ind.gpu_std": ("GPU {gpu} utilisation spread {std:.1f} points (limit {limit:g})",
                    "GPU {gpu} 利用率波动 {std:.1f} 个百分点（上限 {limit:g}）"),
    "ind.gpu_no_samples": ("the run recorded no GPU information", "此运行没有记录 GPU 信息"),
    "ind.gpu_no_gpu": ("no NVIDIA GPU ({message}): the experiments ran on the CPU",
                       "没有 NVIDIA GPU（{message}）：实验在 CPU 上运行"),
    "ind.gpu_too_few": ("too few GPU samples with our experiments running", "我们的实验运行期间 GPU 采样太少"),
    # evaluation
    "eval.none": ("Not evaluated yet: {command} evaluates every finished experiment.",
                  "尚未评估：{command} 会评估所有已完成的实验。"),
    "eval.intro": ("Reported on the {split} split, {n} images, every row on the same images; the {chosen} split chose "
                   "the checkpoints, hyperparameters and the reward network's epoch (evaluated {time}).",
                   "在 {split} 划分上报告，共 {n} 张图像，每一行使用相同的图像；检查点、超参数和奖励网络的轮次由 {chosen} "
                   "划分选择（评估于 {time}）。"),
    "eval.warning.no_test_split": (
        "Warning: the dataset has no test split, so these figures are on val, the split that chose: they are "
        "optimistic.",
        "警告：数据集没有测试划分，这些数值来自负责选择的验证划分，因此偏乐观。"),
    "eval.warning.val_reports": ("Warning: reported on val, the split that chose: the figures are optimistic.",
                                 "警告：在负责选择的验证划分上报告，数值偏乐观。"),
    "eval.warning.train_reports": (
        "Warning: reported on train, the split the methods learned on: the figures say nothing of new images.",
        "警告：在方法学习所用的训练划分上报告，这些数值不能说明在新图像上的表现。"),
    "eval.interval_note": (
        "Δ Dice is against the default prompt, with its 95 % interval (a paired bootstrap over images combined with "
        "the spread over seeds); an interval that covers 0 is marked within noise.",
        "Δ Dice 相对默认提示计算，并给出 95% 区间（对图像的配对自助法与种子间波动合并）；包含 0 的区间标记为“在噪声范围内”。"),
    "eval.within_noise": ("within noise", "在噪声范围内"),
    "eval.per_seed": ("Each seed of the rows that fold several:", "包含多个种子的行中每个种子的结果："),
    "eval.missing": ("Not evaluated: {names}.", "未评估：{names}。"),
    "col.delta_interval": ("Δ Dice [95 % interval]", "Δ Dice［95% 区间］"),
    "col.seeds": ("seeds", "种子数"),
    "col.seed": ("seed", "种子"),
    "col.images": ("images", "图像数"),
    "col.baseline_dice": ("baseline Dice", "基线 Dice"),
    "col.condition": ("condition", "条件"),
    "col.difficulty": ("baseline Dice quarter", "基线 Dice 四分位"),
    "row.baseline": ("baseline: default prompt {prompt}", "基线：默认提示 {prompt}"),
    "row.own_expression": ("the image's own expression (from the dataset)", "图像自带的指代表达（来自数据集）"),
    "row.best_fixed_prompt": ("best fixed prompt, chosen on train: {prompt}", "在训练集上选出的最佳固定提示：{prompt}"),
    "row.supervised_chooser": (
        "supervised chooser: a regression per prompt on the policy's first observation, fitted to train labels",
        "监督选择器：基于策略的首个观测、按提示分别拟合训练标注的回归"),
    "row.prompt_policy": ("prompt policy", "提示选择策略"),
    "row.postprocess_policy": ("post-processing policy on the default prompt's mask", "默认提示掩码上的后处理策略"),
    "row.combined": ("prompt policy, then post-processing policy", "提示选择策略加后处理策略"),
    "row.oracle_prompt": ("oracle prompt (chosen with labels: upper bound)", "最优提示（使用标注选择：上界）"),
    "row.finetuned": ("reward-guided fine-tuned model, default prompt", "奖励网络引导微调后的模型（默认提示）"),
    "row.reward_rerank": ("reward-network reranking (prompts x post-processing, no labels)",
                          "奖励网络重排序（提示 × 后处理，不使用标注）"),
    "row.group": ("{label} ({group})", "{label}（{group}）"),
    # where the gain comes from
    "section.breakdown": ("Where the gain comes from", "增益来自哪里"),
    "breakdown.condition": (
        "Δ Dice of each row by the condition the dataset drew the image under, the condition's share of the row's "
        "whole gain in brackets.",
        "按数据集生成图像时的条件列出各行的 Δ Dice，括号内为该条件占该行总增益的比例。"),
    "breakdown.difficulty": (
        "Δ Dice of each row by quarter of the baseline's Dice (Q1: the images it does worst on), the quarter's share "
        "of the row's whole gain in brackets.",
        "按基线 Dice 的四分位列出各行的 Δ Dice（Q1：基线表现最差的图像），括号内为该组占该行总增益的比例。"),
    "breakdown.quarter": ("{name}: {low:.2f} to {high:.2f}", "{name}：{low:.2f} 至 {high:.2f}"),
    # conclusions
    "section.conclusions": ("Preliminary conclusions", "初步结论"),
    "concl.not_evaluated": ("Not evaluated yet: {command} makes the figures these conclusions come from.",
                            "尚未评估：{command} 会生成这些结论所依据的数值。"),
    "concl.best": ("On {split}, the best row is {row}: Dice {dice:.4f}, {delta} against the default prompt.",
                   "在 {split} 上，最好的一行是{row}：Dice {dice:.4f}，相对默认提示 {delta}。"),
    "concl.best_is_baseline": ("It is a baseline (it reads no label at inference), not a method: no experiment of "
                               "this run beats it.",
                               "它是基线（推理时不读取标注）而不是方法：本次运行中没有实验超过它。"),
    "concl.best_is_default": ("No row beats the default prompt.", "没有任何一行超过默认提示。"),
    "concl.method": ("{row}: {against_default} against the default prompt ({verdict_default}); {against_bar} against "
                     "the supervised chooser ({verdict_bar}).",
                     "{row}：相对默认提示 {against_default}（{verdict_default}）；相对监督选择器 {against_bar}"
                     "（{verdict_bar}）。"),
    "concl.method_alone": ("{row}: {against_default} against the default prompt ({verdict_default}).",
                           "{row}：相对默认提示 {against_default}（{verdict_default}）。"),
    "concl.own_expression": ("{row}: {delta} against the image's own expression, the baseline to beat on this "
                             "dataset ({verdict}).",
                             "{row}：相对图像自带的指代表达（此数据集上需要超越的基线）{delta}（{verdict}）。"),
    "concl.rl_none": ("No RL method beats the supervised chooser beyond noise on {split}: a supervised choice over "
                      "the policy's own features, fitted to train labels, does at least as well.",
                      "在 {split} 上，没有任何强化学习方法在噪声之外优于监督选择器：在策略自身特征上拟合训练标注的监督选择至少同样好。"),
    "concl.rl_some": ("Beyond noise, {names} beat the supervised chooser on {split}.",
                      "在 {split} 上，{names} 在噪声之外优于监督选择器。"),
    "concl.oracle": ("The oracle prompt, an upper bound that reads the labels, reaches Dice {dice:.4f}; the best row "
                     "takes {share:.0%} of its gain.",
                     "最优提示（读取标注的上界）达到 Dice {dice:.4f}；最好的一行获得了其增益的 {share:.0%}。"),
    "concl.seeds": ("Rows of methods fold {seeds} seeds each; their intervals include the spread over seeds.",
                    "方法所在的行各合并了 {seeds} 个种子；其区间包含种子间的波动。"),
    "concl.one_seed": ("Each method was trained with one seed: its interval covers the choice of images, not the luck "
                       "of training (`sa2va-tui launch --seeds 3` measures that too).",
                       "每个方法只用一个种子训练：其区间只反映图像的抽样，不反映训练的偶然性（`sa2va-tui launch --seeds 3` "
                       "可同时衡量后者）。"),
    "concl.optimistic": ("These conclusions rest on the split that chose: take them as optimistic.",
                         "这些结论基于负责选择的划分：应视为偏乐观。"),
    "verdict.above": ("better beyond noise", "在噪声之外更好"),
    "verdict.below": ("worse beyond noise", "在噪声之外更差"),
    "verdict.noise": ("within noise", "在噪声范围内"),
    # the combined strategy
    "section.combined": ("Combined strategy", "组合策略"),
    "comb.result": ("The prompt policy, then the post-processing policy on its mask: Dice {dice:.4f}, {delta} "
                    "against the default prompt ({verdict}).",
                    "先用提示选择策略，再在其掩码上用后处理策略：Dice {dice:.4f}，相对默认提示 {delta}（{verdict}）。"),
    "comb.part": ("Against {part} alone: {delta} ({verdict}).", "相对单独使用{part}：{delta}（{verdict}）。"),
    "comb.adds": ("The combination beats each of its parts beyond noise: the two policies are worth using together.",
                  "组合在噪声之外优于其每个部分：两个策略值得一起使用。"),
    "comb.no_gain": ("The combination does not beat {names} beyond noise: the simpler strategy does as well.",
                     "组合没有在噪声之外优于{names}：更简单的策略同样有效。"),
    "comb.missing": ("Not evaluated: the combination needs both a `prompt_rl` and a `postprocess_rl` model.",
                     "未评估：组合需要 `prompt_rl` 和 `postprocess_rl` 的模型。"),
    "comb.keep_default": ("Nothing beats the default prompt beyond noise on {split}: keep the default prompt.",
                          "在 {split} 上，没有任何方法在噪声之外优于默认提示：保留默认提示。"),
    "comb.best": ("The strategy to use on this evidence: {row} (Dice {dice:.4f} on {split}).",
                  "根据现有证据应采用的策略：{row}（在 {split} 上 Dice {dice:.4f}）。"),
    # curves
    "curve.episode_reward": ("Episode reward over timesteps", "回合奖励随时间步变化"),
    "curve.ppo_metrics": ("PPO metrics over timesteps", "PPO 指标随时间步变化"),
    "curve.reward_net": ("Reward network over its steps", "奖励网络随训练步变化"),
    "curves.no_data": ("No metric has been recorded yet: there is no curve to draw.",
                       "尚未记录任何指标：没有可绘制的曲线。"),
    "curves.not_written": ("Write the report with -o FILE to draw the learning curves as PNG images next to it.",
                           "使用 -o FILE 写出报告时，学习曲线会以 PNG 图像保存在其旁边。"),
}


class Translator:
    """The report's words in one language."""

    def __init__(self, lang: str) -> None:
        if lang not in LANGUAGES:
            raise ValueError(f"language {lang!r}: one of {', '.join(LANGUAGES)}")
        self.lang = lang
        self._column = LANGUAGES.index(lang)

    def __call__(self, key: str, **values: Any) -> str:
        return MESSAGES[key][self._column].format(**values)

    def optional(self, key: str, **values: Any) -> str | None:
        """The message, or None when there is none under `key`."""
        return self(key, **values) if key in MESSAGES else None

    def _word(self, group: str, word: str | None) -> str:
        # An unknown word (a state a newer version adds) shows as the identifier it is.
        return self.optional(f"{group}.{word}") or f"`{word}`"

    def state(self, state: str | None) -> str:
        return self._word("state", state)

    def phase(self, phase: str | None) -> str:
        return self._word("phase", phase)

    def trend(self, trend: str | None) -> str:
        return self._word("trend", trend)

    def status(self, status: str) -> str:
        return self._word("status", status)

    def failure_kind(self, kind: str | None) -> str:
        return self._word("failure", kind)

    def restart_reason(self, reason: str) -> str:
        return self._word("restart", reason)

    def description(self, kind: str) -> str:
        """What an experiment of this kind does, in one line."""
        return self.optional(f"desc.{kind}") or self("desc.other", kind=f"`{kind}`")

    def row_label(self, row: Any) -> str:
        """An evaluation row's label: the table's own in English, a translation by the
        row's name otherwise (what it names, a prompt, in code), else the name."""
        if self.lang == "en":
            return row.label
        base, _, group = row.name.partition("@")
        args = {key: "`" + str(value).replace("`", "'") + "`" for key, value in row.label_args.items()}
        label = self.optional(f"row.{base}", **{"prompt": "", **args})
        if label is None:
            return f"`{row.name}`"
        return self("row.group", label=label, group=f"`{group}`") if group else label

    def join(self, items: Iterable[str]) -> str:
        """Clauses of one sentence."""
        return ("; " if self.lang == "en" else "；").join(items)

    def names(self, items: Iterable[str]) -> str:
        """A list of names."""
        return (", " if self.lang == "en" else "、").join(items)

    def item(self, label: str, value: Any) -> str:
        """`label: value`, with the language's colon."""
        return f"{label}{': ' if self.lang == 'en' else '：'}{value}".rstrip()

    def items(self, *pairs: tuple[str, Any]) -> str:
        """Several `label: value` on one line."""
        return (", " if self.lang == "en" else "，").join(self.item(label, value) for label, value in pairs)
