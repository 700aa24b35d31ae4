"""How `finetune data` shows what it prepared, for text and vision-language rows alike: trained stretches of a
sample highlighted, and the refused rows grouped by reason."""

from __future__ import annotations

from collections import Counter

from rich.markup import escape
from rich.text import Text

#: Distinct refusal reasons listed (the count of the others follows).
REASONS_SHOWN = 8


def refusal_lines(problems: list[str]) -> list[str]:
    """One line per reason (`file:row: reason` problems), most frequent first, with its count and first row."""
    reasons = Counter(problem.split(": ", 1)[-1] for problem in problems)
    lines = []
    for reason, count in reasons.most_common(REASONS_SHOWN):
        first = next(p for p in problems if p.endswith(reason)).split(": ", 1)[0]
        lines.append(f"  refused {count}x (first {escape(first)}): {escape(reason)}")
    if len(reasons) > REASONS_SHOWN:
        lines.append(f"  ... and {len(reasons) - REASONS_SHOWN} other reasons")
    return lines


def highlight(tokenizer, input_ids: list[int], labels: list[int], marks=("", "")) -> Text:
    """The sample as text, trained stretches in bold green (and between `marks`) and the rest dim; each stretch
    decoded whole, so characters split across tokens come out intact."""
    text, start = Text(), 0
    for end in range(1, len(input_ids) + 1):
        if end == len(input_ids) or (labels[end] != -100) != (labels[start] != -100):
            piece = tokenizer.decode(input_ids[start:end])
            if labels[start] != -100:
                text.append(f"{marks[0]}{piece}{marks[1]}", style="bold green")
            else:
                text.append(piece, style="dim")
            start = end
    return text
