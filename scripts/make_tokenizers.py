"""Train small tokenizers in the formats FLUX uses, from a corpus of captions and common English.

- `write_t5_tokenizer(folder, corpus)`: a SentencePiece unigram model laid out as T5 does (pad 0,
  eos `</s>` 1, unk 2, no byte fallback), loadable by transformers' T5Tokenizer / T5TokenizerFast.
- `write_clip_tokenizer(folder, corpus)`: a byte-level BPE in CLIP's own format (lowercase, `</w>`
  word ends, vocab.json = 256 byte symbols, the same with `</w>`, one entry per merge, then
  `<|startoftext|>` and `<|endoftext|>`; merges.txt with a version line), loadable by
  transformers' CLIPTokenizer (slow in transformers 4, tokenizers-backed in 5) and CLIPTokenizerFast.

diffusers' FluxPipeline loads the CLIP one from `tokenizer/` and the T5 one from `tokenizer_2/`.
Usage: python -m scripts.make_tokenizers OUT  (writes OUT/tokenizer and OUT/tokenizer_2)
"""

from __future__ import annotations

import io
import json
import string
import sys
from pathlib import Path

try:
    from scripts import shapes
except ImportError:  # run as a file
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from scripts import shapes

# Common English, so that tokenizers built here split arbitrary test prompts into real pieces.
GENERIC_WORDS = """
a an the of and or but not no yes in on at to from with without by for over under above below near
far into onto out up down left right top bottom middle centre center side front back inside outside
between behind beside around through this that these those it its is are was were be been being has
have had do does did can could will would should may might must shall i you he she we they me him her
us them my your his our their what which who whom whose where when why how all any both each few more
most other some such only own same so than too very just also again ever never always often sometimes
one two three four five six seven eight nine ten first second last next new old good bad big small
large little long short tall high low wide narrow thick thin round square flat sharp soft hard light
dark bright dull clean dirty empty full hot cold warm cool wet dry fast slow early late young happy sad
beautiful ugly simple plain detailed realistic abstract colorful colourful black white grey gray red
orange yellow green blue purple pink brown gold silver circle triangle diamond star heart line dot
shape object thing picture photo photograph image painting drawing sketch illustration render art
style portrait landscape view scene background foreground color colour light shadow sky sun moon cloud
rain snow water sea ocean river lake beach mountain hill forest tree flower grass leaf garden field
road street city town house building room window door wall floor table chair bed lamp book cup bottle
car bus train boat plane bike man woman child boy girl people person face hand eye hair dog cat bird
horse cow fish animal food apple banana bread cake pizza coffee tea shirt hat shoe bag ball box toy
computer phone clock camera guitar music game sport team game city night day morning evening winter
summer spring autumn fall season time year world earth space planet robot dragon castle bridge
standing sitting walking running flying swimming eating drinking reading writing playing holding
looking wearing made make take makes show shows showing close closeup macro wide-angle cinematic
lighting high-quality photorealistic oil watercolor digital 3d 4k hd
""".split()


def corpus() -> list[str]:
    """Captions of the grammar (plainly and in photo phrasings), sentences of common English words,
    and every printable ASCII character, deterministic."""
    lines = list(shapes.all_captions())
    lines += [f"{p} {shape}" for p in ("a photo of a", "a picture of a", "an image of a", "a drawing of a")
              for shape in [f"{c} {s}" for c in shapes.COLOURS for s in shapes.SHAPES]]
    words = list(dict.fromkeys(GENERIC_WORDS))
    for k in range(0, len(words), 8):
        lines.append(" ".join(words[k:k + 8]))
    lines += [w.capitalize() for w in words[:40]]
    lines += [
        "a photo of a cat", "a photo of a dog", "an astronaut riding a horse on the moon",
        "a bowl of fruit on a wooden table", "A red car parked in the street, at night.",
        "the quick brown fox jumps over the lazy dog", "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG",
        "0 1 2 3 4 5 6 7 8 9 10 100 2024", string.punctuation, string.ascii_letters, string.digits,
    ]
    return lines


# ----------------------------------------------------------------------------------------------
# T5 (SentencePiece unigram)
# ----------------------------------------------------------------------------------------------

def write_t5_tokenizer(folder, corpus: list[str], vocab_size: int = 1000, model_max_length: int = 512) -> Path:
    """Train a SentencePiece unigram model on `corpus` and write a T5 tokenizer folder: spiece.model,
    tokenizer.json (the fast form, so loading needs no conversion), tokenizer_config.json and
    special_tokens_map.json. vocab_size is an upper bound (the default corpus yields about 390
    pieces at most); it must leave room for the 3 specials and the printable ASCII characters."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(corpus)), model_writer=buf,
        model_type="unigram", vocab_size=vocab_size, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0, byte_fallback=False,
        required_chars=string.ascii_letters + string.digits + string.punctuation,
        normalization_rule_name="nmt_nfkc", num_threads=1, minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(buf.getvalue())
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    config = {
        "tokenizer_class": "T5Tokenizer", **special, "extra_ids": 0, "additional_special_tokens": [],
        "model_max_length": model_max_length, "legacy": True, "add_prefix_space": True,
        "clean_up_tokenization_spaces": True, "sp_model_kwargs": {},
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)
    # The fast form, converted once here by transformers from spiece.model.
    from transformers import T5TokenizerFast

    (folder / "tokenizer.json").unlink(missing_ok=True)
    fast = T5TokenizerFast.from_pretrained(str(folder))
    fast.backend_tokenizer.save(str(folder / "tokenizer.json"))
    return folder


# ----------------------------------------------------------------------------------------------
# CLIP (byte-level BPE)
# ----------------------------------------------------------------------------------------------

CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's map from the 256 bytes to printable unicode characters, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train_clip_merges(corpus: list[str], vocab_size: int = 1000) -> list[tuple[str, str]]:
    """BPE merges, in order, learnt with the tokenizers library on CLIP's normalisation and
    pre-tokenisation; vocab_size is the trainer's (its alphabet plus its merges)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(end_of_word_suffix="</w>", continuing_subword_prefix="", unk_token=None))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    trainer = BpeTrainer(vocab_size=vocab_size, min_frequency=1, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix="</w>",
                         continuing_subword_prefix="")
    tok.train_from_iterator(list(corpus), trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]


CLIP_BASE_VOCAB = 2 * 256 + 2  # byte symbols, the same with </w>, two specials


def write_clip_tokenizer(folder, corpus: list[str], vocab_size: int = 1000, model_max_length: int = 77) -> Path:
    """Train a CLIP-style byte-level BPE on `corpus` and write vocab.json, merges.txt,
    tokenizer_config.json and special_tokens_map.json (CLIP's own layout, as in FLUX's tokenizer/).
    vocab_size is the size of the whole vocabulary, at most: 514 base entries plus up to
    vocab_size - 514 merges (fewer if the corpus runs out of pairs; 514 or less means no merges,
    a character-level tokenizer that still encodes any text)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_merges = max(0, vocab_size - CLIP_BASE_VOCAB)
    merges = train_clip_merges(corpus, n_merges + 2 * 256)[:n_merges] if n_merges else []
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    seen = set(vocab_list)
    kept = []
    for a, b in merges:
        if a not in seen or b not in seen or a + b in seen:
            continue  # cannot happen for a well-formed BPE; kept out so the files stay consistent
        kept.append((a, b))
        vocab_list.append(a + b)
        seen.add(a + b)
    vocab_list += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept), encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer", **special, "model_max_length": model_max_length,
        "add_prefix_space": False, "do_lower_case": True, "errors": "replace",
        "clean_up_tokenization_spaces": True,
    }
    _write_json(folder / "tokenizer_config.json", config)
    _write_json(folder / "special_tokens_map.json", special)
    return folder


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizers(root, corpus_lines: list[str] | None = None, clip_vocab_size: int = 1000,
                     t5_vocab_size: int = 1000) -> tuple[Path, Path]:
    """Both tokenizers in the diffusers layout: root/tokenizer (CLIP) and root/tokenizer_2 (T5)."""
    lines = corpus() if corpus_lines is None else corpus_lines
    root = Path(root)
    return (write_clip_tokenizer(root / "tokenizer", lines, clip_vocab_size),
            write_t5_tokenizer(root / "tokenizer_2", lines, t5_vocab_size))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m scripts.make_tokenizers OUT")
    for f in write_tokenizers(sys.argv[1]):
        print(f)
