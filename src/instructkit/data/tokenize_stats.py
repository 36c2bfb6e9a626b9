"""What tokenizing a split did: examples, truncated and dropped ones, prompt and completion tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TokenizeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dropped_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dropped_ids"] = out["dropped_ids"][:20]
        return out

    def dropped_note(self, max_length: int, split: str = "training") -> str | None:
        """A warning naming how many examples did not fit `max_length` and were dropped (None: none)."""
        if not self.dropped:
            return None
        first = ", ".join(self.dropped_ids[:3])
        return (f"{self.dropped} of {self.examples} {split} examples ({self.dropped / max(self.examples, 1):.0%}) "
                f"dropped: their completion (for a chat, its last exchange with every question cut to its "
                f"minimum; answers and tool results are never cut) does not fit model.max_length={max_length} "
                f"(first: {first}; tokenize_stats.json lists up to 20). Raise model.max_length to keep them")
