"""The numbers of a transformer that its training memory depends on, read from its config by building it on
the meta device (no memory). train/memory.py does the accounting with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from instructkit.config import LoraSettings

# bitsandbytes' min_8bit_size: tensors with fewer values keep fp32 moments under adamw_8bit
MIN_8BIT_SIZE = 4096


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a transformer that its training memory depends on."""

    params: int  # distinct parameters (tied embeddings counted once)
    hidden: int
    intermediate: int
    layers: int  # decoder layers (+ encoder layers for encoder-decoders)
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    extra_norms: int = 0  # hidden-size norms per layer beyond Llama's two (Gemma 3: two more)
    qk_norm: bool = False  # per-head norms of queries and keys (Gemma 3)
    eager_attention: bool = False  # attention probabilities materialised (heads x seq x seq per token row)
    lm_head_params: int = 0  # parameters of the output projection (its gradient comes first in backward)
    tied_embeddings: bool = False  # the LM head is the input embedding matrix
    linears: tuple[tuple[str, int, int], ...] = ()  # (name, in, out) of every Linear in the body, for LoRA
    largest_param: int = 0  # values of the largest parameter tensor (the embedding, mostly)
    small_params: int = 0  # values in tensors under MIN_8BIT_SIZE (norms, biases): fp32 moments in adamw_8bit
    quant_blocks: int = 0  # 256-value blocks of the other tensors (adamw_8bit: a float32 absmax each, per moment)
    factored_state: int = 0  # Adafactor's second moment: rows + columns of each matrix, all of each 1-D tensor
    embedding_params: int = 0  # values of the nn.Embedding weights (adamw_8bit keeps them 32-bit by default)

    def lora_targets(self, lora: LoraSettings) -> list[tuple[str, int, int]]:
        """The Linears LoRA adapts: all of them for 'all-linear' (the LM head is never among them)."""
        targets = lora.target_modules
        names = None if targets == "all-linear" else ({targets} if isinstance(targets, str) else set(targets))
        return [lin for lin in self.linears if names is None or lin[0].rsplit(".", 1)[-1] in names]

    def lora_params(self, lora: LoraSettings) -> int:
        """r x (in + out) per adapted Linear (A is r x in, B is out x r)."""
        return sum(lora.r * (d_in + d_out) for _, d_in, d_out in self.lora_targets(lora))


def hf_config_numbers(config: Any) -> dict[str, int]:
    """hidden / intermediate / layers / heads / kv heads / head dim / vocab from a transformers config."""
    get = lambda *names, default=None: next(
        (getattr(config, n) for n in names if getattr(config, n, None) is not None), default)
    hidden = int(get("hidden_size", "d_model", "n_embd"))
    heads = int(get("num_attention_heads", "num_heads", "n_head"))
    layers = int(get("num_hidden_layers", "num_layers", "n_layer"))
    if getattr(config, "is_encoder_decoder", False):
        layers += int(get("num_decoder_layers", default=layers))
    return {
        "hidden": hidden,
        "intermediate": int(get("intermediate_size", "d_ff", "n_inner", default=4 * hidden)),
        "layers": layers,
        "heads": heads,
        "kv_heads": int(get("num_key_value_heads", default=heads)),
        "head_dim": int(get("head_dim", "d_kv", default=hidden // heads)),
        "vocab": int(config.vocab_size),
    }


def model_shape(config: Any) -> ModelShape:
    """Build the model on the meta device (no memory, ~1 s) to count parameters, norms and Linears exactly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config)
    numbers = hf_config_numbers(config)
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    tied = head is not None and embeddings is not None and head.weight is embeddings.weight
    linears, norms, qk_norm = [], 0, False
    first_layer = None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            linears.append((name, module.in_features, module.out_features))
        if first_layer is None and name.endswith(".layers.0"):
            first_layer = module
    if first_layer is not None:
        for name, module in first_layer.named_modules():
            weight = getattr(module, "weight", None)
            if "norm" in type(module).__name__.lower() and weight is not None:
                if weight.shape[-1] == numbers["hidden"]:
                    norms += 1
                elif name.endswith(("q_norm", "k_norm")):
                    qk_norm = True
    sizes = [p.shape for p in model.parameters()]
    embedding_weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    attn = getattr(config, "_attn_implementation", None) or "sdpa"
    return ModelShape(
        params=params,
        extra_norms=max(norms - 2, 0),
        qk_norm=qk_norm,
        eager_attention=attn == "eager",
        lm_head_params=head.weight.numel() if head is not None else 0,
        tied_embeddings=tied,
        linears=tuple(linears),
        largest_param=max((size.numel() for size in sizes), default=0),
        small_params=sum(size.numel() for size in sizes if size.numel() < MIN_8BIT_SIZE),
        quant_blocks=sum(-(-size.numel() // 256) for size in sizes if size.numel() >= MIN_8BIT_SIZE),
        embedding_params=sum(embedding_weights.values()),
        factored_state=sum(size[-2] + size[-1] if len(size) >= 2 else size.numel() for size in sizes),
        **numbers,
    )
