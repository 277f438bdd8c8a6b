"""Token ids from our tokenizer reader against transformers' AutoTokenizer, the way FluxPipeline calls it."""

import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from mlx_crepulse.tokenizer import Tokenizer

PROMPTS = ["a red circle", "A Photo of a CAT,  sitting on a mat!", "", "猫 and émigré",
           "a very long prompt " * 20]


@pytest.mark.parametrize("name,length", [("tokenizer", 77), ("tokenizer_2", 16), ("tokenizer_2", 64)])
def test_ids_equal_transformers(schnell_dir, tmp_path, name, length):
    """Padded and truncated ids and the untruncated count equal transformers' for CLIP and T5, both
    through tokenizer.json (the `tokenizers` library) and through the fallback without it."""
    ref = AutoTokenizer.from_pretrained(str(schnell_dir / name))
    without_json = tmp_path / name
    shutil.copytree(schnell_dir / name, without_json)
    (without_json / "tokenizer.json").unlink()
    for folder in (schnell_dir / name, without_json):
        ours = Tokenizer(folder)
        assert (ours._fast is not None) == (folder == schnell_dir / name)
        for p in PROMPTS:
            want = ref(p, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids
            assert np.array_equal(ours.ids(p, length), want), (folder, p)
            assert ours.count(p) == len(ref(p, truncation=False).input_ids)
    if name == "tokenizer":  # CLIP pads to its own limit, which FluxPipeline reads from the tokenizer
        assert Tokenizer(schnell_dir / name).model_max_length == ref.model_max_length == 77
