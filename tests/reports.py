"""Reading the report tests' run: its Markdown report in a language, one section."""

from __future__ import annotations

EXPERIMENTS = ("prompt_rl", "postprocess_rl", "reward_net")


def report_text(run, lang: str) -> str:
    result = run["reports"][lang]
    assert result.returncode == 0, result.stderr
    return (run["out"] / lang / "report.md").read_text(encoding="utf-8")


def report_section(markdown: str, heading: str) -> str:
    """The body of the `## heading` section."""
    start = markdown.index(f"## {heading}\n")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:end if end != -1 else None]
