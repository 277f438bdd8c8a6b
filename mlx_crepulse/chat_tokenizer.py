"""Prompt -> Qwen3 token ids and attention mask, exactly as `Flux2KleinPipeline` makes them.

diffusers wraps the prompt in the tokenizer's chat template as one user message, with the generation
prompt and thinking disabled (`enable_thinking=False`: the empty think block), then tokenizes the text
padded to `max_sequence_length` and truncated to it. The template is the folder's own (transformers 5
writes `chat_template.jinja`, older folders keep it in `tokenizer_config.json`), rendered with jinja2 as
transformers renders it; the text is tokenized from `tokenizer.json` by the `tokenizers` library.
"""

import json
from pathlib import Path

import numpy as np


class ChatTokenizer:
    def __init__(self, folder):
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        if not (folder / "tokenizer.json").exists():
            raise FileNotFoundError(f"{folder / 'tokenizer.json'} is missing")
        from tokenizers import Tokenizer as Fast
        self._fast = Fast.from_file(str(folder / "tokenizer.json"))
        self._fast.no_padding()
        template = folder / "chat_template.jinja"
        source = template.read_text() if template.exists() else config.get("chat_template")
        if not isinstance(source, str):
            raise ValueError(f"the tokenizer in {folder} has no chat template (chat_template.jinja)")
        self._template = _compile(source)
        self._special = {k: _content(config.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        self.pad_id = self._fast.token_to_id(self._special["pad_token"] or "")
        if self.pad_id is None:
            raise ValueError(f"the tokenizer in {folder} has no padding token")
        if config.get("padding_side", "right") != "right":
            raise ValueError(f"the tokenizer in {folder} pads on the {config['padding_side']}; only right "
                             "padding (Qwen3's) is supported")

    def text(self, prompt: str) -> str:
        """The prompt in the chat template: one user message, the assistant's turn opened, no thinking."""
        return self._template.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                                     enable_thinking=False, **self._special)

    def ids(self, prompt: str, max_length: int) -> tuple:
        """((1, max_length) ids, (1, max_length) mask): truncated, padded at the right with the pad token."""
        self._fast.enable_truncation(max_length)
        ids = self._fast.encode(self.text(prompt), add_special_tokens=True).ids
        pad = max_length - len(ids)
        return (np.array([ids + [self.pad_id] * pad], np.int32),
                np.array([[1] * len(ids) + [0] * pad], np.int32))

    def count(self, prompt: str) -> int:
        """Tokens of the templated prompt before any truncation."""
        self._fast.no_truncation()
        return len(self._fast.encode(self.text(prompt), add_special_tokens=True).ids)


def _compile(source: str):
    """jinja2 as transformers' chat templates use it: sandboxed, trim_blocks and lstrip_blocks, loop
    controls, a tojson filter and raise_exception."""
    from jinja2 import ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ValueError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _content(value):
    return value.get("content") if isinstance(value, dict) else value
