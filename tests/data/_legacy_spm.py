"""A tokenizer of the legacy SentencePiece shape (Llama-2, Mistral-7B-v0.1, TinyLlama): tokenizer.json's
normaliser prepends "▁" to every text and writes spaces as "▁", BPE with <0xNN> byte fallback, BOS added.
Trained on the test corpus in milliseconds; " 5" alone is "▁ ▁5", but "Rating: 5" ends with "▁5"."""

from __future__ import annotations


def build_legacy_spm_tokenizer():
    from conftest import CORPUS
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # trained on "▁"-started words, as SentencePiece learns pieces; then used without a pre-tokenizer
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.train_from_iterator(CORPUS * 20, trainer=trainers.BpeTrainer(vocab_size=700,
                                                                     special_tokens=specials + byte_tokens))
    tok.pre_tokenizer = None
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")
