"""What reading a file hands on: its rows as read (`Table`) and the bad rows met on the way (`Problems`).

A bad row stops reading with a DataError naming file and line, unless `skip_bad_rows` is on: then it is
skipped and counted by reason, and the first `MAX_SAMPLES` messages are kept for stats.json.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from instructkit.errors import DataError, InstructkitError

MAX_SAMPLES = 10
"""How many skipped-row messages are kept (per dataset) for stats.json."""


# --------------------------------------------------------------------------------------------------
# Bad rows: raise at the first, or count them
# --------------------------------------------------------------------------------------------------


class Problems:
    """Collects bad rows: raises a DataError at the first one unless `skip` is on, then counts by reason."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.counts: Counter[str] = Counter()
        self.samples: list[str] = []

    def bad(self, reason: str, message: str, error: type[InstructkitError] = DataError) -> None:
        """Record one bad row under `reason`.

        Raises: `error` (default DataError) with `message` when `skip` is off.
        """
        if not self.skip:
            raise error(message) from None
        self.counts[reason] += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


# --------------------------------------------------------------------------------------------------
# Raw tables
# --------------------------------------------------------------------------------------------------


SEPARATOR_NAMES = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe"}
"""Names of common field separators, for messages."""


def separator_hint(header: list[str], fmt: str, delimiter: str = "") -> str:
    """Why a CSV/TSV header (`fmt` csv or tsv, read with `delimiter`, "" for the format's own) is one
    column holding another common separator: "" when it is not."""
    if len(header) != 1:
        return ""
    own = delimiter or ("," if fmt == "csv" else "\t")
    name = SEPARATOR_NAMES.get(own, repr(own))
    counts = {d: header[0].count(d) for d in (",", ";", "\t", "|") if d != own}
    found = max(counts, key=counts.get)  # type: ignore[arg-type]
    if not counts[found]:
        return ""
    fix = (f"set `delimiter: {found!r}` (`--delimiter {found!r}` for templates check)" if found != "\t"
           else "set `format: tsv`")
    return (f" (one column holding {found!r}: the file looks {found!r}-separated, but it was read "
            f"{name}-separated: {fix})")


@dataclass
class Table:
    """The rows of one file as read, before column mapping."""

    path: str
    columns: list[str]
    rows: list[dict]
    lines: list[int] | None = None
    """1-based line where each row starts (line formats); None: rows are named by `unit` and number."""
    unit: str = "row"
    format: str = ""
    positions: list[int] | None = None
    """1-based `unit` numbers when rows were skipped while parsing (else the row's index + 1)."""
    offset: int = 0
    """Rows of the same file before this Table (a chunk of a file read in parts): row i is row offset + i."""
    delimiter: str = ""
    """The field separator a CSV/TSV file was parsed with ("" for other formats)."""
    class_labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Column -> the names of its Hugging Face `ClassLabel` feature (ids 0, 1, ... name names[id]), from the
    features a saved dataset or a Parquet file written by `datasets` carries."""

    def where(self, index: int) -> str:
        """`line 12` / `record 3` / `row 7`: how row `index` (0-based) is named in messages."""
        if self.lines is not None:
            return f"line {self.lines[index]}"
        if self.positions is not None:
            return f"{self.unit} {self.positions[index]}"
        return f"{self.unit} {self.offset + index + 1}"
