"""The tokenizer files an export carries: a run trained with a Hugging Face ``tokenizer.json``
(``data.tokenizer``) exports it beside the weights, with a ``tokenizer_config.json`` that lets
``transformers.AutoTokenizer`` load it; a hub directory's own tokenizer files are copied as they
are. A run on the byte tokenizer exports none (it has no ``tokenizer.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from moetrain.checkpoint.safetensors_io import is_hf_dir
from moetrain.data.config import BYTE_TOKENIZER

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
# the (text) tokenizer files of a hub directory, copied when it is a conversion's source
HUB_TOKENIZER_FILES = (
    TOKENIZER_FILE,
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


def run_tokenizer(src: str | os.PathLike) -> str | None:
    """``data.tokenizer`` of the run that saved the native checkpoint ``src`` (a step or run
    directory) when it is a file, else None (the byte tokenizer, a weights-only checkpoint)."""
    from moetrain.checkpoint.locate import TRAIN_STATE, locate

    step = locate(src, "--from")  # the checkpoint load_model read (verified once per process)
    config = json.loads((step / TRAIN_STATE).read_text()).get("config", {})
    name = (config.get("data") or {}).get("tokenizer", BYTE_TOKENIZER)
    return None if name == BYTE_TOKENIZER else str(name)


def tokenizer_config(tokenizer_json: str, max_seq_len: int) -> str:
    """``tokenizer_config.json`` for a bare ``tokenizer.json``: the generic fast tokenizer,
    with the end-of-text token moetrain trained with (if any)."""
    from moetrain.data.tokenizer import EOS_NAMES

    tokens = json.loads(tokenizer_json).get("added_tokens") or []
    specials = [t["content"] for t in tokens if t.get("special")]
    eos = next((n for n in EOS_NAMES if n in specials), None)
    eos = eos or next((s for s in specials if "eos" in s.lower() or "endoftext" in s), None)
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    if eos is not None:
        config["eos_token"] = eos
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def export_tokenizer_files(src: str | os.PathLike, max_seq_len: int) -> dict[str, str]:
    """The tokenizer files (name -> text) an export of ``src`` writes beside its weights: a hub
    directory's own tokenizer files, or the native run's ``data.tokenizer`` file as
    ``tokenizer.json`` plus a ``tokenizer_config.json``. Empty for the byte tokenizer; a
    :class:`FileNotFoundError` naming the run's setting when its tokenizer file is gone (a
    relative path is read from the current directory, as training read it)."""
    if is_hf_dir(src):
        root = Path(src)
        return {
            name: (root / name).read_text(encoding="utf-8")
            for name in HUB_TOKENIZER_FILES
            if (root / name).is_file()
        }
    path = run_tokenizer(src)
    if path is None:
        return {}
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the run was trained with data.tokenizer={path!r}, which is not a file here (a "
            "relative path is read from the current directory); run from the directory the "
            "training ran in, or restore the file"
        )
    text = Path(path).read_text(encoding="utf-8")
    return {TOKENIZER_FILE: text, TOKENIZER_CONFIG: tokenizer_config(text, max_seq_len)}
