"""The cache of GGUF files converted to safetensors folders.

GGUF weights are dequantized to fp32 by transformers, which still marks the model as quantized (then
`save_pretrained` and fine-tuning refuse it); `hf_quantizer.remove_quantization_config` clears the mark.
Reading a GGUF is slow (SmolLM2 15-25 s, Gemma 35-65 s, mostly the tokenizer conversion), so the first
load converts it once into a safetensors folder in the cache, keyed by the GGUF file's sha256:

    $INSTRUCTKIT_CACHE/models/<sha256[:16]>/      (default ~/.cache/instructkit/models/<sha256[:16]>/)
        config.json  model.safetensors  generation_config.json  tokenizer.json  tokenizer_config.json
        chat_template.jinja (SmolLM2)  instructkit_source.json (provenance)  licence file(s)

It is written to a temporary folder and renamed, so a crash never leaves half a cache entry; later loads
read the folder (1-5 s). transformers parses the GGUF once for the tokenizer and again for the model (its
config and tensors); on a machine of 2+ cores the tokenizer is converted in a second process meanwhile
(`instructkit.background`): SmolLM2's took 34 s instead of 39-46 s in the README's first command.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from instructkit.background import BackgroundStep
from instructkit.errors import ModelError
from instructkit.io import fsync_dir, replace_folder, sha256_file, temp_folder_beside, write_json
from instructkit.models.generation import configure_generation, ensure_pad_token

logger = logging.getLogger(__name__)

SOURCE_FILE = "instructkit_source.json"  # provenance of a converted GGUF, inside its cache folder
TOKENIZER_IN_CHILD_MIN_BYTES = 32 << 20
"""GGUFs at least this large have their tokenizer converted in a second process (a real vocabulary takes
5-15 s; a tiny test file's is quicker than starting a process)."""


def default_cache_dir() -> Path:
    """`$INSTRUCTKIT_CACHE/models`, else `~/.cache/instructkit/models`."""
    root = os.environ.get("INSTRUCTKIT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "instructkit") / "models"


def cached_folder(cache_dir: Path, sha256: str) -> Path:
    return Path(cache_dir) / sha256[:16]


def is_complete_cache(folder: Path) -> bool:
    """A cache entry appears by rename only once complete; SOURCE_FILE is written last inside it."""
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def convert_gguf(gguf_path: Path, target: Path, provenance: dict[str, Any], *,
                 licence_files: list[Path] | None = None, trust_remote_code: bool = False,
                 tokenizer_in_child: bool | None = None) -> Path:
    """Dequantize a GGUF into a safetensors folder at `target` (atomically); return `target`.

    `tokenizer_in_child`: convert the tokenizer in a second process while this one reads the weights
    (default: when the file has >= TOKENIZER_IN_CHILD_MIN_BYTES and 2+ cores are usable); the folder is
    the same either way.
    Raises: ModelError when the gguf package is missing or transformers cannot read the file.
    """
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading {gguf_path} needs the 'gguf' package: pip install gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if tokenizer_in_child is None:
        tokenizer_in_child = (gguf_path.stat().st_size >= TOKENIZER_IN_CHILD_MIN_BYTES
                              and len(os.sched_getaffinity(0)) >= 2)
    logger.info("converting %s to safetensors in %s (once; later loads take seconds)", gguf_path, target)
    tmp = temp_folder_beside(target)
    child = None
    try:
        args = (str(gguf_path), str(tmp), trust_remote_code)
        if tokenizer_in_child:
            child = BackgroundStep("convert-tokenizer", save_gguf_tokenizer, args, beside="reading the weights")
            child.start()
        else:
            save_gguf_tokenizer(*args)
        model = _read(gguf_path, lambda: AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, trust_remote_code=trust_remote_code))
        if child is not None:
            try:
                child.wait()
            except RuntimeError as exc:  # the process itself failed (cannot start here, killed): do it here
                logger.warning("converting the tokenizer in a second process failed (%s); converting it here",
                               str(exc).splitlines()[0])
                save_gguf_tokenizer(*args)
        tokenizer = AutoTokenizer.from_pretrained(tmp)  # as saved: what every later load reads
        clear_quantizer(model)
        configure_generation(model, tokenizer)
        model.save_pretrained(tmp)
        names = []
        for path in licence_files or []:
            shutil.copy2(path, tmp / path.name)
            names.append(path.name)
        write_json(tmp / SOURCE_FILE, {**provenance, "licence_files": names})
        fsync_dir(tmp)
        return replace_folder(tmp, target, keep_existing=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if child is not None:
            child.stop()


def save_gguf_tokenizer(gguf_path: str, folder: str, trust_remote_code: bool = False) -> None:
    """Convert the tokenizer of the GGUF at `gguf_path` and save it into `folder` (a pad token set).

    Module-level (with str arguments) so that it can run in a spawned process. Raises ModelError as
    `convert_gguf`."""
    from transformers import AutoTokenizer

    path = Path(gguf_path)
    tokenizer = _read(path, lambda: AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, trust_remote_code=trust_remote_code))
    ensure_pad_token(tokenizer)
    tokenizer.save_pretrained(folder)


def _read(gguf_path: Path, load: Any) -> Any:
    try:
        return load()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelError(f"cannot read GGUF file {gguf_path}: {exc}") from None


def clear_quantizer(model: Any) -> None:
    """GGUF weights arrive dequantized (fp32) but marked quantized; drop the mark so saving works."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def gguf_to_cached_folder(gguf_path: Path, cache_dir: Path, provenance: dict[str, Any], *,
                          sha256: str | None = None, licence_files: list[Path] | None = None,
                          trust_remote_code: bool = False) -> Path:
    """The cache folder of `gguf_path`, converting it first when absent.

    Raises: ModelError as `convert_gguf` does.
    """
    sha256 = sha256 or sha256_file(gguf_path)
    target = cached_folder(cache_dir, sha256)
    if is_complete_cache(target):
        return target
    provenance = {**provenance, "gguf_sha256": sha256, "gguf_file": gguf_path.name}
    return convert_gguf(gguf_path, target, provenance, licence_files=licence_files,
                        trust_remote_code=trust_remote_code)
