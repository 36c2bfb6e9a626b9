"""Data preparation: read source rows, split them, apply templates, write instruction examples.

    table.py         a file's rows as read (Table) and the bad-row policy (Problems: raise, or skip and count)
    readers.py       files -> Tables: format detection, .gz, Parquet, saved HF datasets, parallel text
    readers_text.py  decode and parse CSV/TSV/JSON/JSONL, errors naming the line
    rows.py          map columns to schema fields, convert and check each row; prompt/completion and chat rows
    chat.py          chat roles and the plain-text prompt of a conversation
    sources.py       one configured dataset -> a Source of checked rows with stable ids
    split.py         deduplicate, then split source rows (seeded, stratified, group-aware) BEFORE templating
    plan.py          per dataset: rows, templates, split; the training mixture
    examples.py      the Example record and its JSONL line
    build.py         rows x templates -> Example lines; `prepare()` writes train/validation/test.jsonl
                     and stats.json
    tokenize.py      examples -> token ids and labels
    sampler.py       the epoch plan: step groups, class balance, packing, micro-batches per process
    batching.py      planned micro-batches -> tensors (padded, packed, seq2seq)

Importing this package is light: no torch, no `datasets` (loaded only to read a saved HF dataset).
"""

from instructkit.data.build import PrepareResult, load_examples, prepare
from instructkit.data.examples import Example

__all__ = ["Example", "PrepareResult", "load_examples", "prepare"]
