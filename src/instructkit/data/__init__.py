"""Data preparation: read source rows, split them, apply templates, write instruction examples.

    sources.py   read CSV/TSV/JSON/JSONL/Parquet/.gz/parallel text/saved HF datasets; map columns; check rows
    split.py     deduplicate, then split source rows (seeded, stratified, group-aware) BEFORE templating
    build.py     rows x templates -> Example records; `prepare()` writes train/validation/test.jsonl
                 and stats.json

Importing this package is light: no torch, no `datasets` (loaded only to read a saved HF dataset).
"""

from instructkit.data.build import Example, PrepareResult, load_examples, prepare

__all__ = ["Example", "PrepareResult", "load_examples", "prepare"]
