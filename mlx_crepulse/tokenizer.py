"""Prompt -> token ids, exactly as transformers' tokenizers give them to FluxPipeline.

Where a tokenizer folder has a `tokenizer.json` (FLUX's T5 folder does, and every folder this package
saves), the `tokenizers` library reads it directly: importing transformers costs seconds (it brings in
torch when torch is installed). Otherwise transformers' AutoTokenizer reads the folder.
"""

import json
from pathlib import Path

import numpy as np


class Tokenizer:
    def __init__(self, folder):
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        # transformers' default when unset is a huge number ("no limit"); CLIP's configs say 77
        self.model_max_length = int(min(config.get("model_max_length", 77), 10**9))
        self._fast = self._hf = None
        if (folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer as Fast
            self._fast = Fast.from_file(str(folder / "tokenizer.json"))
            self.pad_id = self._fast.token_to_id(_token(config, folder, "pad_token"))
        else:
            from transformers import AutoTokenizer
            self._hf = AutoTokenizer.from_pretrained(str(folder))
            self.pad_id = self._hf.pad_token_id
        if self.pad_id is None:
            raise ValueError(f"the tokenizer in {folder} has no padding token")

    def ids(self, text: str, max_length: int) -> np.ndarray:
        """(1, max_length) ids: truncated to max_length with the special tokens, padded at the right."""
        if self._hf is not None:
            return self._hf(text, padding="max_length", max_length=max_length, truncation=True,
                            return_tensors="np").input_ids
        self._fast.no_padding()
        self._fast.enable_truncation(max_length)
        ids = self._fast.encode(text).ids
        return np.array([ids + [self.pad_id] * (max_length - len(ids))], np.int32)

    def count(self, text: str) -> int:
        """How many tokens the prompt has, special tokens included, before any truncation."""
        if self._hf is not None:
            return len(self._hf(text, truncation=False).input_ids)
        self._fast.no_truncation()
        return len(self._fast.encode(text).ids)


def _token(config: dict, folder: Path, name: str):
    """A special token's text from tokenizer_config.json or special_tokens_map.json."""
    value = config.get(name)
    if value is None and (folder / "special_tokens_map.json").exists():
        value = json.loads((folder / "special_tokens_map.json").read_text()).get(name)
    return value.get("content") if isinstance(value, dict) else value
