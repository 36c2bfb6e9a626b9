"""Scoring a model on prompts: rank classification of answer choices, NLL of reference completions.

All inputs are built by `instructkit.data.tokenize`, the same functions that build training examples, so a
prompt is cut and a completion tokenized exactly as the model saw them in training.

Rank classification (`rank_choices`)
------------------------------------
Each choice is scored by its summed log-probability given the prompt,

    score(choice) = sum_t log p(choice_t | prompt, choice_<t)

and the prediction is the best choice (or the best mean per token with `length_normalized`). The prompt is
encoded ONCE per example, however many choices it has:

* causal models: the choices of one prompt usually share their first tokens (" 1" .. " 5" are a space token
  then a digit in both real tokenizers). The shared prefix is appended to the prompt, and one forward pass
  over `prompt + prefix` gives the log-probabilities of the prefix and of every choice's next token (the
  logits at the last `len(prefix) + 1` positions only, via `logits_to_keep`). When every choice ends one
  token after the prefix (the " 1" .. " 5" case) that single pass is all: 5 choices cost one forward
  instead of five. Longer choices continue from the prompt's KV cache, copied once per choice row, so
  only their remaining tokens go through the model.
* seq2seq models: the encoder runs once per prompt; the decoder runs over all choices in a batch, with the
  encoder states repeated per choice.

One prompt, one context: every choice of an example is scored against the same prompt, cut to fit the
LONGEST choice (`assemble(prompt, longest_choice)`, as training would cut it). With equally long choices
this is exactly the training cut for each choice.

The end of the answer: by default (`include_eos=True`, config `eval.choice_end: eos`) each choice is scored
followed by the end of the answer the model was trained to produce: EOS after a plain completion, the chat
template's end-of-turn token after an assistant turn (`encode_completions(add_eos=True)`, the training
encoding). Without it a choice that is a prefix of another can never win: with choices "1" .. "10",
score("10") = score("1") + log p("0" | ..., "1") <= score("1") for ANY model, so a model that answers "10"
is still ranked "1". With the end scored, score("1") includes log p(EOS | ..., "1"), which a model that
answers "10" makes small. `include_eos=False` (`eval.choice_end: none`) scores the choice text alone: the
sum of log-probabilities of the continuation given the context, lm-evaluation-harness's `acc`. With EOS the
" 1" .. " 5" choices have two tokens of their own (digit, EOS), so they take the second pass below.

k-shot text prompts end the answer differently: every demonstration's answer in the prompt is followed by
the demonstration separator "\\n\\n", never by EOS, so there the end scored is the separator
(`demonstration_end`, evaluate/fewshot.py `answer_end`), tokenized as the demonstrations have it
(`fewshot.demonstration_answer_ids`). A chat template's demonstrations are earlier turns, each closed by
the end-of-turn token: there, as in zero-shot, the end is that token. `include_eos=False` scores the choice
text alone whatever the prompt.

Reference completions (`completion_nll`): the summed NLL (nats) of each completion given its prompt,
encoded exactly as for training, so that perplexity = exp(total / tokens) is the training loss's measure.

Batching and padding are in `instructkit.evaluate.model_inputs`; generation in `instructkit.evaluate.generate`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from instructkit.data.tokenize import (
    IGNORE_INDEX,
    TokenizeSettings,
    assemble_prompt,
    encode_batch,
    encode_completions,
    encode_prompts,
)
from instructkit.evaluate.fewshot import demonstration_answer_ids
from instructkit.evaluate.model_inputs import (
    ROW_GROWTH,
    index_chunks,
    left_pad,
    model_device,
    right_pad,
    settings_for_model,
    token_batches,
    token_logprobs,
    tokenizer_pad_id,
)

logger = logging.getLogger(__name__)

MAX_PADDING = 0.25  # a scoring batch ends before pad tokens would pass this share of it (see token_batches)

__all__ = [
    "ChoiceScores",
    "completion_nll",
    "rank_choices",
]


# --------------------------------------------------------------------------------------------------
# Rank classification
# --------------------------------------------------------------------------------------------------


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Tokens shared by the start of every sequence, never a whole sequence's last token.

    [[225, 21], [225, 22], [225, 23]] -> 1 (the space token). Capped at min(len) - 1 so that every choice
    keeps at least one token of its own: the prompt pass then scores the prefix plus each choice's next
    token at its last position.
    """
    limit = min(len(s) for s in seqs) - 1
    n = 0
    while n < limit and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


@dataclass
class ChoiceScores:
    """Scores of one example's choices, in the order the choices were given.

    `logprobs[j]` = summed log p(choice j tokens | prompt); `mean_logprobs[j]` = logprobs[j] / n_tokens[j].
    `predicted` is `predicted_by_mean` when ranking was length-normalised, else `predicted_by_sum`.
    `prompt_tokens` is the prompt as fed (after truncation); `truncated` says the prompt was cut.
    """

    logprobs: list[float]
    n_tokens: list[int]
    mean_logprobs: list[float]
    predicted_by_sum: int
    predicted_by_mean: int
    predicted: int
    prompt_tokens: int
    truncated: bool


@dataclass
class _RankItem:
    """One example ready to score: the prompt as cut, and each choice's tokens."""

    prompt_ids: list[int]
    choice_ids: list[list[int]]
    truncated: bool


def _choice_ids(tokenizer: Any, choices: list[str], prompts: list[str], settings: TokenizeSettings,
                include_eos: bool, demonstration_end: str | None) -> list[list[int]]:
    """Each choice's tokens: `separator + choice`, then the end of the answer when `include_eos`: EOS or the
    chat end-of-turn token as trained, or `demonstration_end` tokenized as the prompt's demonstrations have
    it (module docstring)."""
    if not include_eos or demonstration_end is None:
        return encode_completions(tokenizer, choices, settings, prompts, add_eos=include_eos)
    if settings.chat or settings.seq2seq:
        raise ValueError("demonstration_end is the end of an answer in a text prompt of a causal model; a chat "
                         "or seq2seq answer ends with its end-of-turn token or EOS")
    return demonstration_answer_ids(tokenizer, [settings.separator + c for c in choices], demonstration_end,
                                    prompts)


def _rank_items(tokenizer: Any, prompts: Sequence[str], choices_per_prompt: Sequence[Sequence[str]],
                settings: TokenizeSettings, include_eos: bool,
                demonstration_end: str | None = None) -> list[_RankItem]:
    """Tokenize prompts once and every choice once; cut each prompt to fit its longest choice."""
    if len(prompts) != len(choices_per_prompt):
        raise ValueError(f"{len(prompts)} prompts but {len(choices_per_prompt)} choice lists")
    prompt_ids = encode_prompts(tokenizer, prompts, settings)
    flat_choices = [c for choices in choices_per_prompt for c in choices]
    flat_prompts = [p for p, choices in zip(prompts, choices_per_prompt) for _ in choices]
    flat_ids = _choice_ids(tokenizer, flat_choices, flat_prompts, settings, include_eos, demonstration_end)
    items, start = [], 0
    for i, (ids, choices) in enumerate(zip(prompt_ids, choices_per_prompt)):
        if not choices:
            raise ValueError(f"example {i} has no choices to rank")
        choice_ids = flat_ids[start:start + len(choices)]
        start += len(choices)
        for j, c in enumerate(choice_ids):
            if not c:
                raise ValueError(f"example {i}: choice {choices[j]!r} has no tokens")
        longest = max(choice_ids, key=len)
        encoded = assemble_prompt(tokenizer, prompts[i], ids, longest, settings)  # a chat prompt: whole turns
        if encoded is None:
            raise ValueError(f"example {i}: choice of {len(longest)} tokens leaves no room for the prompt "
                             f"within max_length={settings.max_length}")
        cut = encoded.input_ids[:encoded.prompt_length]
        items.append(_RankItem(cut, choice_ids, encoded.truncated))
    return items


def _select_cache_rows(cache: Any, rows: torch.Tensor, config: Any) -> Any:
    """A new DynamicCache holding the batch rows `rows` (repeats allowed) of `cache`; `cache` is untouched.

    Cost: one copy of the prompt's keys and values per row, layers x 2 x kv_heads x head_dim x prompt_len
    floats (SmolLM2-135M: 30 x 2 x 3 x 64 x 256 = 2.9 M floats = 11.8 MB per row at a 256-token prompt).
    """
    from transformers import DynamicCache

    data = [(layer.keys.index_select(0, rows), layer.values.index_select(0, rows)) for layer in cache.layers]
    return DynamicCache(data, config=config)


def _score_causal(model: Any, items: Sequence[_RankItem], pad_id: int, max_tokens: int,
                  max_rows: int) -> list[list[float]]:
    """Summed log-probabilities of every choice of `items` (one batch of prompts), prompt run once.

    Pass 1 runs `prompt + shared prefix` (left-padded) and keeps the logits of the last q + 1 positions,
    q = prefix length: position -(q+1) + t predicts prefix token t, the last position predicts each
    choice's first own token. Pass 2 (only for choices with 2+ own tokens) feeds those tokens but the last
    on top of a copy of the prompt's cache, as many choice rows at a time as `max_tokens` of copied cache
    allow (rows x context width <= max_tokens), at most `max_rows`, at least one.
    """
    device = model_device(model)
    prefix_lens = [_common_prefix_length(item.choice_ids) for item in items]
    contexts = [item.prompt_ids + item.choice_ids[0][:q] for item, q in zip(items, prefix_lens)]
    ids, mask, positions = left_pad(contexts, pad_id, device)
    keep = max(prefix_lens) + 1
    rest = [(b, j) for b, item in enumerate(items) for j, c in enumerate(item.choice_ids)
            if len(c) - prefix_lens[b] >= 2]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=bool(rest),
                logits_to_keep=keep)
    logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # (B, keep, V): kept positions only

    scores: list[list[float]] = []
    for b, (item, q) in enumerate(zip(items, prefix_lens)):
        prefix = item.choice_ids[0][:q]
        prefix_score = sum(float(logprobs[b, keep - 1 - q + t, tok]) for t, tok in enumerate(prefix))
        scores.append([prefix_score + float(logprobs[b, keep - 1, c[q]]) for c in item.choice_ids])
    del logprobs

    context_lengths = mask.sum(-1)
    for chunk in index_chunks(range(len(rest)), max(1, min(max_tokens // ids.shape[1], max_rows))):
        pairs = [rest[k] for k in chunk]
        rows = torch.tensor([b for b, _ in pairs], device=device)
        own = [items[b].choice_ids[j][prefix_lens[b]:] for b, j in pairs]
        inputs, choice_mask = right_pad([c[:-1] for c in own], pad_id, device)
        targets, _ = right_pad([c[1:] for c in own], 0, device, width=inputs.shape[1])
        steps = torch.arange(inputs.shape[1], device=device)
        out2 = model(
            input_ids=inputs,
            attention_mask=torch.cat([mask.index_select(0, rows), choice_mask], dim=1),
            position_ids=context_lengths.index_select(0, rows)[:, None] + steps[None, :],
            cache=_select_cache_rows(out.cache, rows, model.config),
            use_cache=True,
        )
        token_lp = token_logprobs(out2.logits, targets) * choice_mask
        for (b, j), value in zip(pairs, token_lp.sum(-1).tolist()):
            scores[b][j] += value
    return scores


def _score_seq2seq(model: Any, items: Sequence[_RankItem], pad_id: int, max_tokens: int,
                   max_rows: int) -> list[list[float]]:
    """Encoder once per prompt, then the decoder over all choices with the encoder states repeated
    (rows x encoder width <= max_tokens per decoder pass, at most `max_rows`, at least one)."""
    from transformers.modeling_outputs import BaseModelOutput

    device = model_device(model)
    ids, mask = right_pad([item.prompt_ids for item in items], pad_id, device)
    encoded = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    start = int(model.config.decoder_start_token_id)
    pairs_all = [(b, j) for b, item in enumerate(items) for j in range(len(item.choice_ids))]
    scores = [[0.0] * len(item.choice_ids) for item in items]
    for chunk in index_chunks(range(len(pairs_all)), max(1, min(max_tokens // ids.shape[1], max_rows))):
        pairs = [pairs_all[k] for k in chunk]
        rows = torch.tensor([b for b, _ in pairs], device=device)
        choices = [items[b].choice_ids[j] for b, j in pairs]
        decoder_in, choice_mask = right_pad([[start] + c[:-1] for c in choices], pad_id, device)
        targets, _ = right_pad(choices, 0, device, width=decoder_in.shape[1])
        out = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=encoded.index_select(0, rows)),
            attention_mask=mask.index_select(0, rows),
            decoder_input_ids=decoder_in,
            use_cache=False,
        )
        token_lp = token_logprobs(out.logits, targets) * choice_mask
        for (b, j), value in zip(pairs, token_lp.sum(-1).tolist()):
            scores[b][j] = value
    return scores


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; ties go to the first."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def rank_choices(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    choices_per_prompt: Sequence[Sequence[str]],
    settings: TokenizeSettings,
    *,
    is_seq2seq: bool,
    batch_size: int = 16,
    length_normalized: bool = False,
    include_eos: bool = True,
    demonstration_end: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ChoiceScores]:
    """Score every choice of every prompt by its log-probability; the prompt is encoded once per example.

    Prompts go through the model longest first in `token_batches`: `batch_size` rows of the longest prompts,
    more rows of shorter ones (up to 4 x batch_size) within the first batch's tokens, and a batch ends
    before its padding would pass 25% (a long outlier goes with few rows). Choice rows that need a second
    pass go as many at a time as those tokens of copied KV cache allow, up to 4 x batch_size.
    Returns one `ChoiceScores` per prompt, in the order given (log-probabilities in nats).
    `include_eos` (default True): score each choice followed by the end of the answer as trained (EOS, or the
    chat end-of-turn token; see the module docstring); False scores the choice text alone (lm-eval's `acc`).
    `demonstration_end` (k-shot text prompts: `fewshot.answer_end`, "\\n\\n"): the end scored instead of
    EOS, what follows every demonstration's answer in the prompt; ignored when `include_eos` is False.
    `progress(n)` is called after each batch of n prompts (a progress display).

    Raises: ValueError when `prompts` and `choices_per_prompt` differ in length, an example has no choices
    or a choice with no tokens, a choice leaves no room for the prompt within `settings.max_length`, the
    tokenizer has neither a pad nor an EOS token, or `demonstration_end` is given for a chat or seq2seq model.
    """
    settings = settings_for_model(settings, is_seq2seq)
    items = _rank_items(tokenizer, prompts, choices_per_prompt, settings, include_eos, demonstration_end)
    pad_id = tokenizer_pad_id(tokenizer)
    score_batch = _score_seq2seq if is_seq2seq else _score_causal
    sums: list[list[float]] = [[] for _ in items]
    lengths = [len(item.prompt_ids) + _common_prefix_length(item.choice_ids) for item in items]
    max_tokens = batch_size * max(lengths, default=1)  # the first (longest) batch's tokens
    batches = token_batches(lengths, batch_size, max_padding=MAX_PADDING)
    with torch.no_grad():
        for batch in batches:
            values = score_batch(model, [items[i] for i in batch], pad_id, max_tokens,
                                 ROW_GROWTH * batch_size)
            for i, choice_sums in zip(batch, values):
                sums[i] = choice_sums
            if progress is not None:
                progress(len(batch))
    results = []
    for item, values in zip(items, sums):
        counts = [len(c) for c in item.choice_ids]
        means = [v / n for v, n in zip(values, counts)]
        by_sum, by_mean = _argmax(values), _argmax(means)
        results.append(ChoiceScores(
            logprobs=values, n_tokens=counts, mean_logprobs=means, predicted_by_sum=by_sum,
            predicted_by_mean=by_mean, predicted=by_mean if length_normalized else by_sum,
            prompt_tokens=len(item.prompt_ids), truncated=item.truncated,
        ))
    return results


# --------------------------------------------------------------------------------------------------
# Perplexity of reference completions
# --------------------------------------------------------------------------------------------------


def _nll_causal(model: Any, encoded: Sequence[Any], pad_id: int) -> list[tuple[float, int]]:
    """(summed NLL, label tokens) per example; LM head only at the positions that predict a label.

    Left-padded, so the K = max completion length labelled tokens of every row sit in the last K columns;
    their logits come from columns T-K-1 .. T-2 (`logits_to_keep` as an index tensor). Memory: B x K x V
    floats instead of B x T x V.
    """
    device = model_device(model)
    ids, mask, positions = left_pad([e.input_ids for e in encoded], pad_id, device)
    width = ids.shape[1]
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, e in enumerate(encoded):
        labels[i, width - len(e.labels):] = torch.tensor(e.labels, dtype=torch.long)
    k = max(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in encoded)
    predicting = torch.arange(width - k - 1, width - 1, device=device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                logits_to_keep=predicting)
    targets = labels[:, width - k:]
    valid = targets != IGNORE_INDEX
    token_lp = token_logprobs(out.logits, targets) * valid
    return [(-float(s), int(n)) for s, n in zip(token_lp.sum(-1).tolist(), valid.sum(-1).tolist())]


def _nll_seq2seq(model: Any, encoded: Sequence[Any], pad_id: int) -> list[tuple[float, int]]:
    device = model_device(model)
    ids, mask = right_pad([e.input_ids for e in encoded], pad_id, device)
    start = int(model.config.decoder_start_token_id)
    decoder_in, label_mask = right_pad([[start] + e.labels[:-1] for e in encoded], pad_id, device)
    targets, _ = right_pad([e.labels for e in encoded], 0, device, width=decoder_in.shape[1])
    out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_in, use_cache=False)
    token_lp = token_logprobs(out.logits, targets) * label_mask
    return [(-float(s), int(n)) for s, n in zip(token_lp.sum(-1).tolist(), label_mask.sum(-1).tolist())]


def completion_nll(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    settings: TokenizeSettings,
    is_seq2seq: bool,
    batch_size: int = 16,
) -> tuple[float, int, list[float]]:
    """(total NLL in nats, label tokens, per-example NLL) of the reference completions given the prompts.

    The completions are encoded exactly as for training (`encode_batch`: separator + completion + EOS), so
    perplexity = exp(total / tokens) is the training loss's measure on this data. An example whose
    completion alone does not fit `max_length` is dropped by the tokenizer: its NLL is NaN and it counts
    in neither total.

    Raises: ValueError when the tokenizer has neither a pad nor an EOS token.
    """
    settings = settings_for_model(settings, is_seq2seq)
    encoded = encode_batch(tokenizer, prompts, completions, settings)
    dropped = sum(e is None for e in encoded)
    if dropped:
        logger.warning("perplexity: %d of %d completions do not fit max_length=%d and are skipped",
                       dropped, len(encoded), settings.max_length)
    kept = [i for i, e in enumerate(encoded) if e is not None]
    pad_id = tokenizer_pad_id(tokenizer)
    nll_batch = _nll_seq2seq if is_seq2seq else _nll_causal
    per_example = [float("nan")] * len(encoded)
    total, tokens = 0.0, 0
    # growth 1: `batch_size` rows at most (the kept logits are rows x completion length x V), padding capped
    batches = token_batches([len(encoded[i].input_ids) for i in kept], batch_size, growth=1,
                            max_padding=MAX_PADDING)
    with torch.no_grad():
        for positions in batches:
            batch = [kept[k] for k in positions]
            for i, (nll, n) in zip(batch, nll_batch(model, [encoded[i] for i in batch], pad_id)):
                per_example[i] = nll
                total += nll
                tokens += n
    return total, tokens, per_example
