"""Models with hand-set log-probabilities for evaluation tests: a bigram causal LM, and a "scripted" one
that answers each prompt with a chosen answer choice (so eval.json and report figures can be checked by
hand). Both speak enough of the transformers call signature for rank_choices and evaluate_examples."""

from __future__ import annotations

from itertools import pairwise
from types import SimpleNamespace

import torch

from instructkit.data.tokenize import TokenizeSettings, encode_completions, encode_prompts


class Bigram(torch.nn.Module):
    """A causal LM whose next token depends on the current token only: log p(b | ..., a) = logprobs[a, b]."""

    def __init__(self, logprobs: torch.Tensor):
        super().__init__()
        self.logprobs = torch.nn.Parameter(logprobs, requires_grad=False)
        self.config = None

    def forward(self, input_ids, logits_to_keep=0, **_):
        from transformers import DynamicCache

        logits = self.logprobs[input_ids]
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, cache=DynamicCache())


def bigram_table(vocab: int, rows: dict[int, dict[int, float]], default: dict[int, float]) -> torch.Tensor:
    """Log-probabilities: row a puts the given probabilities on its tokens, the rest spread evenly."""
    probs = torch.empty(vocab, vocab, dtype=torch.float64)
    for a in range(vocab):
        spec = rows.get(a, default)
        probs[a] = (1.0 - sum(spec.values())) / (vocab - len(spec))
        for b, p in spec.items():
            probs[a, b] = p
    return probs.log().float()


SCRIPT_SETTINGS = TokenizeSettings(max_length=64, separator="")  # the answer follows the prompt's last token


def scripted_model(tokenizer, answers: dict[str, str], settings: TokenizeSettings = SCRIPT_SETTINGS) -> Bigram:
    """A Bigram that ranks (and generates) `answers[prompt]` first for every prompt, with EOS scored or not.

    The prompt's last token leads to the answer's first token (p 0.9), each answer token to the next and
    the last to EOS (p 0.9 each). Prompts that must get different answers need different last tokens.

    Raises: AssertionError when two prompts ending with the same token are scripted to different answers.
    """
    rows: dict[int, dict[int, float]] = {}

    def put(a: int, b: int) -> None:
        assert rows.setdefault(a, {b: 0.9}) == {b: 0.9}, f"token {a} is scripted to two different answers"

    for prompt, answer in answers.items():
        ids = encode_completions(tokenizer, [answer], settings, [prompt], add_eos=True)[0]
        put(encode_prompts(tokenizer, [prompt], settings)[0][-1], ids[0])
        for a, b in pairwise(ids):
            put(a, b)
    return Bigram(bigram_table(len(tokenizer), rows, default={}))
