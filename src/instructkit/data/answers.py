"""What the completions of instruction-form data are: a closed set of answers (classification) or free text.

Data already in prompt/completion (or chat) form has no template to say so. A dataset entry can declare
it (`choices: ["1", "2", "3", "4", "5"]`, `metrics: [accuracy, macro_f1]`); by default (`choices: auto`)
the completions are looked at: when the most frequent completions that together cover `MIN_COVERAGE`
(95%) of the rows, ties included, are at most `MAX_CLASSES` (20), with `MIN_ROWS_PER_CLASS` (4) rows per
answer on average, the data is classification. Its examples then carry those choices and are rank-scored with accuracy and macro-F1
like a template with answer choices, instead of free generation scored with ROUGE-L (P3's rating prompts,
answers "1"-"5": 171 s of generation for 40 examples before). The decision, and why, is in stats.json
(`datasets.<name>.answers`). `choices: none` keeps free text; so does `auto` on chat rows
(conversations), which only declared choices make classification.

Rows whose completion is outside the choices: with declared choices they are bad rows (an error naming
file and line, or skipped and counted with `skip_bad_rows`); with detected ones (at most 5% of the rows)
they are left out and counted (`rows_skipped_by_reason`), so every evaluated example has its answer among
the choices. A completion spelled differently from a choice but the same text up to Unicode canonical
equivalence (NFC: "cafe" + combining acute against "caf\u00e9") is that choice (templates/template.as_written_in):
detection counts the spellings as one answer, spelled in NFC; declared choices may not hold two of them
(config.DatasetConfig).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from instructkit.data.chat import CHAT_METRICS
from instructkit.templates.template import DEFAULT_METRICS

MAX_CLASSES = 20
MIN_COVERAGE = 0.95
MIN_ROWS_PER_CLASS = 4
CLASSIFICATION = "classification"
FREE_TEXT_TASK = "instruction_following"
OUTSIDE_DETECTED = "completion outside the detected answer choices"


@dataclass(frozen=True)
class Answers:
    """The decision for one dataset. `choices` None: free text. `origin`: declared | detected | default."""

    task: str
    choices: list[str] | None
    metrics: list[str]
    origin: str
    distinct: int  # distinct completions over the rows looked at
    coverage: float | None  # share of the rows whose completion is one of `choices`
    rule: str

    def to_dict(self) -> dict:
        return asdict(self)


def _order(values: Sequence[str]) -> list[str]:
    """Numbers in numeric order ("2" before "10"), else alphabetical."""
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def _nfc_merged(counts: Counter) -> Counter:
    """`counts` keyed by each string's NFC form (canonically equivalent spellings counted as one); other
    keys (hashes) unchanged."""
    merged: Counter = Counter()
    for value, n in counts.items():
        merged[unicodedata.normalize("NFC", value) if isinstance(value, str) else value] += n
    return merged


def _frequent(counts: Counter, n: int) -> list[str]:
    """The fewest most frequent values covering MIN_COVERAGE of `n` rows, plus any tied with the last."""
    ranked = counts.most_common()
    k, covered = 0, 0
    while k < len(ranked) and covered < MIN_COVERAGE * n:
        covered += ranked[k][1]
        k += 1
    while k < len(ranked) and ranked[k][1] == ranked[k - 1][1]:
        k += 1
    return [value for value, _ in ranked[:k]]


def decide_answers(completions: Sequence[str], choices: list[str] | str, metrics: list[str] | None,
                   conversations: bool = False) -> Answers:
    """The answers of instruction-form data from its `completions` and the dataset's `choices` setting
    (a list, "auto" or "none") and `metrics` (None: accuracy and macro_f1 with choices, else rougeL).

    `conversations` (chat rows): "auto" means free text. Replies that repeat (a bot's identity answer,
    "Sure!") would otherwise look like a closed set of classes; declared choices still apply."""
    return decide_counts(Counter(completions), len(completions), choices, metrics, conversations)


def decide_counts(counts: Counter, n: int, choices: list[str] | str, metrics: list[str] | None,
                  conversations: bool = False) -> Answers:
    """`decide_answers` from the count of each distinct completion over `n` rows; a key that is not a
    string (a completion known only by its hash, data/stream_source.py) cannot be a choice. Keys that are
    the same text up to NFC are one completion (`distinct` counts them once; detected choices are NFC)."""
    counts = _nfc_merged(counts)
    rule = (f"classification when the most frequent completions covering >= {MIN_COVERAGE:.0%} of the rows "
            f"(ties included) are at most {MAX_CLASSES}, with >= {MIN_ROWS_PER_CLASS} rows per answer on average")
    if isinstance(choices, list):
        chosen, origin, rule = list(dict.fromkeys(choices)), "declared", "declared in the config (choices)"
    elif choices == "auto" and conversations:
        chosen, origin, rule = None, "default", "conversations are free text unless the config declares choices"
    elif choices == "auto" and n:
        top = _frequent(counts, n)
        classify = (len(top) <= MAX_CLASSES and n >= MIN_ROWS_PER_CLASS * len(top)
                    and all(isinstance(v, str) for v in top))
        chosen, origin = (_order(top), "detected") if classify else (None, "default")
    else:
        chosen, origin = None, "declared" if choices == "none" else "default"
        rule = "declared in the config (choices: none)" if choices == "none" else rule
    task = CLASSIFICATION if chosen else FREE_TEXT_TASK
    forms = {unicodedata.normalize("NFC", c) for c in chosen or ()}
    coverage = round(sum(counts[f] for f in forms) / n, 4) if chosen and n else None
    default = CHAT_METRICS if conversations and not chosen else DEFAULT_METRICS[task]  # what the examples get
    return Answers(task=task, choices=chosen, metrics=list(metrics or default), origin=origin,
                   distinct=len(counts), coverage=coverage, rule=rule)
