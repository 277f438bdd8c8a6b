"""The demo data set (scripts/shapes.py): its grammar, renderer, skewed free attributes and oracle,
and the small tokenizers trained for it (scripts/make_tokenizers.py)."""

import json
import unicodedata
from itertools import product

import numpy as np
import pytest
from PIL import Image, ImageFilter

from scripts import make_tokenizers as mt
from scripts import shapes as S
from scripts import train_demo


def _attrs_read(r):
    return {k: r[k] for k in S.ALL_ATTRIBUTES}


def _covering_set():
    """Every (shape, position, size, background) with the colours cycled through it (240 images),
    plus every (colour, shape, background) at the typical position and size (96 images)."""
    out = []
    colours = list(S.COLOURS)
    for k, (s, p, z, b) in enumerate(product(S.SHAPES, S.POSITIONS, S.SIZES, S.BACKGROUNDS)):
        out.append(dict(colour=colours[(k + k // 4) % 6], shape=s, position=p, size=z, background=b))
    for c, s, b in product(S.COLOURS, S.SHAPES, S.BACKGROUNDS):
        out.append(dict(colour=c, shape=s, position=S.TYPICAL["position"], size=S.TYPICAL["size"], background=b))
    return out


def _ragged(image, attrs, rng, flip=0.25, noise=10.0):
    """Edge jitter (each pixel just inside or just outside the shape's edge swapped to the other side's
    colour with probability `flip`) plus Gaussian pixel noise: a crude model of a generated shape."""
    bg = np.array(S.BACKGROUNDS[attrs["background"]], float)
    fg = np.array(S.COLOURS[attrs["colour"]], float)
    out = image.astype(float)
    inside = np.linalg.norm(out - bg, axis=-1) > 0.5 * np.linalg.norm(fg - bg)
    u = rng.random(inside.shape)
    out[inside & ~S._erode(inside) & (u < flip)] = bg
    out[S._dilate(inside) & ~inside & (u < flip)] = fg
    out += rng.normal(0.0, noise, out.shape)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _rounded_square(colour, position, size, background, k, ss=4):
    """A square whose corners are rounded with radius k * half-side (k=1 is a circle)."""
    n = S.SIZE * ss
    c = (np.arange(n) + 0.5) / ss
    cx, cy = S.POSITIONS[position]
    r = S.SIZES[size] / 2
    x, y = np.abs(c[None, :] - cx), np.abs(c[:, None] - cy)
    qx, qy = np.maximum(x - r * (1 - k), 0), np.maximum(y - r * (1 - k), 0)
    inside = (x <= r) & (y <= r) & (qx ** 2 + qy ** 2 <= (k * r) ** 2)
    big = Image.new("RGB", (n, n), S.BACKGROUNDS[background])
    big.paste(Image.new("RGB", (n, n), S.COLOURS[colour]), mask=Image.fromarray((inside * 255).astype(np.uint8)))
    return np.asarray(big.resize((S.SIZE, S.SIZE), Image.Resampling.BOX))


# ----------------------------------------------------------------------------------------------
# Grammar and renderer
# ----------------------------------------------------------------------------------------------

def test_grammar_and_distributions_are_well_formed():
    """24 distinct captions; each free attribute's distribution sums to 1, covers exactly its values,
    and has one clearly typical value (at least half the mass, more than twice the next); palette
    colours are far from each other and from every background, so nothing is ambiguous."""
    ps = S.prompts()
    assert len(ps) == 24 == len(set(ps)) and ps[0] == "a red circle"
    assert all(S.parse_caption(p) == (p.split()[1], p.split()[2]) for p in ps)
    values = {"position": S.POSITIONS, "size": S.SIZES, "background": S.BACKGROUNDS}
    for name, dist in S.DISTRIBUTIONS.items():
        assert set(dist) == set(values[name])
        assert abs(sum(dist.values()) - 1.0) < 1e-9
        top, second = sorted(dist.values(), reverse=True)[:2]
        assert top >= 0.5 and top > 2 * second and dist[S.TYPICAL[name]] == top
    fg = np.array(list(S.COLOURS.values()), float)
    bg = np.array(list(S.BACKGROUNDS.values()), float)
    d_ff = np.linalg.norm(fg[:, None] - fg[None], axis=-1) + 1e9 * np.eye(len(fg))
    d_bb = np.linalg.norm(bg[:, None] - bg[None], axis=-1) + 1e9 * np.eye(len(bg))
    assert d_ff.min() > 90 and np.linalg.norm(fg[:, None] - bg[None], axis=-1).min() > 120 and d_bb.min() > 80


def test_captions_name_only_atypical_free_attributes_and_parse_back():
    """all_captions: the 24 bare prompts first, then 1440 distinct captions in all (24 x 3 x 5 x 4: each
    free attribute unnamed or one of its atypical values); every caption parses back to what built it,
    "on pale blue" included (not read as the colour blue); named_caption never names a typical value;
    text outside the grammar is refused."""
    cs = S.all_captions()
    assert cs[:24] == S.prompts() and len(cs) == 1440 == len(set(cs))
    for c in cs:
        a = S.named_attributes(c)
        assert S.caption(a.pop("colour"), a.pop("shape"), **a) == c
        assert all(v != S.TYPICAL[k] for k, v in a.items())
    assert S.named_attributes("a blue diamond at top right on pale blue") == {
        "colour": "blue", "shape": "diamond", "position": "top-right", "background": "pale blue"}
    typical = dict(colour="red", shape="circle", **S.TYPICAL)
    assert S.named_caption(typical, {k: True for k in S.FREE_ATTRIBUTES}) == "a red circle"
    odd = dict(colour="red", shape="circle", size="large", position="bottom-left", background="grey")
    assert S.named_caption(odd, {"size": True, "position": False, "background": True}) == "a large red circle on grey"
    for bad in ("a red blue circle", "a red", "a large small red circle", ""):
        with pytest.raises(ValueError):
            S.named_attributes(bad)


def test_render_is_deterministic_antialiased_and_in_bounds():
    """render gives uint8 (32, 32, 3), the same bytes every call, a background-coloured border
    (objects never touch the edge), and antialiased edges (intermediate values on a circle)."""
    for z, p in product(S.SIZES, S.POSITIONS):
        im = S.render("blue", "circle", p, z, "white")
        assert im.dtype == np.uint8 and im.shape == (32, 32, 3)
        assert np.array_equal(im, S.render("blue", "circle", p, z, "white"))
        border = np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]])
        assert (border == 255).all()
    g = S.render("blue", "circle", "centre", "large", "white")[..., 0].astype(int)
    assert ((g > 40) & (g < 245)).sum() >= 8


def test_sample_shows_the_skewed_distributions():
    """Over 2000 draws of `sample`, colours and shapes are near uniform and each free attribute's
    value frequencies are within 0.04 of DISTRIBUTIONS, typical values included; captions name the
    drawn colour and shape, name only attributes the image has, and name an atypical free attribute
    NAMING_PROBABILITY of the time (within 0.05); the images are those attributes rendered. The bare
    captions' images are more typical than the data overall (what guidance pulls on)."""
    images, captions, attrs = S.sample(np.random.default_rng(0), 2000)
    assert images.shape == (2000, 32, 32, 3) and images.dtype == np.uint8
    named = [S.named_attributes(c) for c in captions]
    assert all(all(a[k] == v for k, v in n.items()) for n, a in zip(named, attrs))
    for k in S.FREE_ATTRIBUTES:
        atypical = [k in n for n, a in zip(named, attrs) if a[k] != S.TYPICAL[k]]
        assert abs(np.mean(atypical) - S.NAMING_PROBABILITY) < 0.05, (k, np.mean(atypical))
    bare = S.bare_caption_attributes(0, 4000)
    for k in S.FREE_ATTRIBUTES:
        assert np.mean([a[k] == S.TYPICAL[k] for a in bare]) > S.DISTRIBUTIONS[k][S.TYPICAL[k]] + 0.05
    for i in (0, 1, 1999):
        assert np.array_equal(images[i], S.render(**attrs[i]))
    for name, dist in S.DISTRIBUTIONS.items():
        for value, p in dist.items():
            freq = np.mean([a[name] == value for a in attrs])
            assert abs(freq - p) < 0.04, (name, value, freq, p)
    for name, values in (("colour", S.COLOURS), ("shape", S.SHAPES)):
        for v in values:
            assert abs(np.mean([a[name] == v for a in attrs]) - 1 / len(values)) < 0.04
    again = S.sample(np.random.default_rng(0), 5)
    assert np.array_equal(again[0], images[:5]) and again[2] == attrs[:5]


# ----------------------------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------------------------

def test_oracle_reads_every_attribute_of_rendered_images():
    """On 336 rendered images covering every (shape, position, size, background) and every
    (colour, shape, background), plus 100 random samples, the oracle reads all five attributes
    right, calls every image clean, with a clear template fit (IoU > 0.95) and shape margin."""
    rng = np.random.default_rng(1)
    _, _, random_attrs = S.sample(rng, 100)
    for a in _covering_set() + random_attrs:
        r = S.read(S.render(**a))
        assert _attrs_read(r) == a, (a, r)
        assert r["clean"], (a, r["reasons"])
        assert r["iou"] > 0.95 and r["margin"] > 0.08, (a, r["iou"], r["margin"])


def test_oracle_accepts_float_images():
    """read takes float images in [0, 1] (the pipeline's output_type="np") as well as uint8."""
    a = dict(colour="green", shape="diamond", position="top-right", size="large", background="pale blue")
    r = S.read(S.render(**a).astype(np.float32) / 255.0)
    assert _attrs_read(r) == a and r["clean"]


def test_oracle_rejects_unclean_images():
    """clean is False for two objects, uniform noise, strong pixel noise, Gaussian blur, a motion
    smear and a blank canvas; each comes with a reason."""
    rng = np.random.default_rng(2)
    base = S.render("red", "circle", "centre", "medium", "white")
    two = np.minimum(S.render("red", "circle", "top-left", "small", "white"),
                     S.render("blue", "square", "bottom-right", "small", "white"))
    two_same = np.minimum(S.render("green", "triangle", "top-right", "medium", "white"),
                          S.render("green", "triangle", "bottom-left", "medium", "white"))
    two_dark = np.maximum(S.render("yellow", "square", "top-left", "small", "black"),
                          S.render("yellow", "diamond", "bottom-right", "medium", "black"))
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    noisy = np.clip(S.render("green", "triangle", "centre", "medium", "grey") + rng.normal(0, 25, (32, 32, 3)),
                    0, 255).astype(np.uint8)
    smear = np.mean([np.roll(base.astype(float), k, axis=1) for k in range(-5, 6)], axis=0).astype(np.uint8)
    cases = {"two objects": two, "two same": two_same, "two on black": two_dark, "uniform noise": noise,
             "pixel noise": noisy, "motion smear": smear, "blank": np.full((32, 32, 3), 255, np.uint8)}
    for shape in S.SHAPES:
        im = S.render("blue", shape, "centre", "medium", "white")
        for radius in (1.5, 2.5):
            cases[f"blur {radius} {shape}"] = np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius)))
    for name, im in cases.items():
        r = S.read(im)
        assert not r["clean"] and r["reasons"], (name, r)
    assert S.read(cases["blank"])["shape"] is None


def test_oracle_reads_ragged_noisy_squares_as_squares():
    """Squares with jittered edges and pixel noise are still read as squares (template matching, not
    area ratios): at every position and background, mild jitter for all sizes and stronger jitter
    for medium and large; rounded corners up to 40% of the half-side read as squares too, while the
    same test shape with corners rounded to 90% (nearly a disc) reads as a circle."""
    rng = np.random.default_rng(3)
    colours = list(S.COLOURS)
    k = 0
    for p, b in product(S.POSITIONS, S.BACKGROUNDS):
        for size, flip in (("small", 0.15), ("medium", 0.15), ("large", 0.15), ("medium", 0.25), ("large", 0.25)):
            a = dict(colour=colours[k % 6], shape="square", position=p, size=size, background=b)
            k += 1
            r = S.read(_ragged(S.render(**a), a, rng, flip=flip, noise=10.0))
            assert (r["shape"], r["colour"], r["position"], r["background"]) == ("square", a["colour"], p, b), (a, r)
    for size, p in product(S.SIZES, ("centre", "bottom-left")):
        for corner in (0.2, 0.4):
            assert S.read(_rounded_square("purple", p, size, "white", corner))["shape"] == "square"
        assert S.read(_rounded_square("purple", p, size, "white", 0.9))["shape"] == "circle"


def test_free_attribute_features():
    """free_attributes one-hot encodes position, size and background (12 numbers) so that a reading's
    dot product with itself is 1 and with another is the fraction of free attributes they share; a
    reading with no object gives zeros for those blocks."""
    names = S.free_feature_names()
    a = dict(colour="red", shape="circle", position="centre", size="medium", background="white")
    b = dict(a, background="black")
    fa, fb = np.array(S.free_attributes(a)), np.array(S.free_attributes(b))
    assert len(fa) == len(names) == 5 + 3 + 4
    assert abs(fa @ fa - 1) < 1e-9 and abs(fa @ fb - 2 / 3) < 1e-9
    r = S.read(S.render(**a))
    assert np.allclose(np.array(S.free_attributes(r)), fa)
    blank = S.read(np.full((32, 32, 3), 255, np.uint8))
    assert np.array(S.free_attributes(blank))[:8].sum() == 0


# ----------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------

EXTRA_PROMPTS = ["a photo of a cat", "An astronaut riding a horse, 4K!", "Zebra xylophone quokka?? 42",
                 "naïve café — 猫 🐱", "  spaced   out\ttext\n", "it's a dog's life", ""]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    return mt.write_tokenizers(tmp_path_factory.mktemp("tokenizers"))


def _bytes_to_unicode():
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:] + [256 + i for i in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    return dict(zip(bs, map(chr, cs)))


def _clip_reference(folder):
    """OpenAI CLIP's own BPE algorithm (simple_tokenizer.py) read straight from vocab.json and
    merges.txt: an independent reader of the files."""
    import regex

    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").strip().split("\n")
    assert lines[0].startswith("#version")
    ranks = {tuple(m.split()): i for i, m in enumerate(lines[1:])}
    enc = _bytes_to_unicode()
    pat = regex.compile(mt.CLIP_PATTERN, regex.IGNORECASE)

    def bpe(token):
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = [(ranks.get(p, 1e18), i) for i, p in enumerate(zip(word, word[1:]))]
            rank, _ = min(pairs)
            if rank == 1e18:
                break
            first, second = min(p for p in zip(word, word[1:]) if ranks.get(p) == rank)
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = new
        return word

    def encode(text):
        text = " ".join(unicodedata.normalize("NFC", text).split()).lower()
        ids = [vocab["<|startoftext|>"]]
        for tok in pat.findall(text):
            ids += [vocab[t] for t in bpe("".join(enc[b] for b in tok.encode("utf-8")))]
        return ids + [vocab["<|endoftext|>"]]

    return vocab, encode


def test_clip_tokenizer_files_load_and_agree_with_clip_bpe(tokenizer_dirs):
    """The CLIP folder has CLIP's layout (256 byte symbols, the same with </w>, merges, then the two
    specials) and loads as CLIPTokenizer and CLIPTokenizerFast; both give the same ids as CLIP's
    original BPE algorithm run on the files, for the corpus and for words outside it; captions
    round-trip; padding to 77 works as diffusers' FluxPipeline asks."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    folder = tokenizer_dirs[0]
    vocab, reference = _clip_reference(folder)
    enc = _bytes_to_unicode()
    order = sorted(vocab, key=vocab.get)
    assert order[:256] == [enc[b] for b in enc] and order[256:512] == [enc[b] + "</w>" for b in enc]
    assert order[-2:] == ["<|startoftext|>", "<|endoftext|>"] and len(order) == len(set(vocab.values()))
    slow, fast = CLIPTokenizer.from_pretrained(folder), CLIPTokenizerFast.from_pretrained(folder)
    for text in mt.corpus() + EXTRA_PROMPTS:
        ids = reference(text)
        assert slow(text)["input_ids"] == ids == fast(text)["input_ids"], text
    for caption in S.all_captions():
        assert fast.decode(fast(caption)["input_ids"], skip_special_tokens=True) == caption
        assert len(fast.tokenize(caption)) == len(caption.split())  # the grammar's words are single tokens
    batch = slow(["a red circle", "a photo of a cat " * 30], padding="max_length", max_length=77,
                 truncation=True, return_tensors="np")
    ids = batch["input_ids"]
    assert ids.shape == (2, 77) and ids[0, 0] == vocab["<|startoftext|>"]
    assert ids[0, 4] == vocab["<|endoftext|>"] == slow.pad_token_id and ids[1, -1] == vocab["<|endoftext|>"]
    assert slow.model_max_length == 77


def test_t5_tokenizer_files_load_and_agree_with_sentencepiece(tokenizer_dirs):
    """The T5 folder loads as T5Tokenizer and T5TokenizerFast with T5's special ids (pad 0, eos 1,
    unk 2); both give sentencepiece's own ids plus eos for the corpus and for unseen words and
    characters (unknown characters become unk, no crash); captions round-trip; padding to a
    fixed length works as diffusers' FluxPipeline asks."""
    import sentencepiece as spm
    from transformers import T5Tokenizer, T5TokenizerFast

    folder = tokenizer_dirs[1]
    sp = spm.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    slow, fast = T5Tokenizer.from_pretrained(folder), T5TokenizerFast.from_pretrained(folder)
    for tok in (slow, fast):
        assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
        assert (tok.pad_token, tok.eos_token, tok.unk_token) == ("<pad>", "</s>", "<unk>")
    for text in mt.corpus() + EXTRA_PROMPTS:
        ids = sp.encode(text) + [1]
        assert slow(text)["input_ids"] == ids == fast(text)["input_ids"], text
    assert 2 in fast("猫 🐱")["input_ids"]
    for caption in S.all_captions():
        assert fast.decode(fast(caption)["input_ids"], skip_special_tokens=True) == caption
    # the demo's T5 length holds every caption whole (training never truncates one)
    assert max(len(fast(c)["input_ids"]) for c in S.all_captions()) <= train_demo.SEQ
    batch = fast(["a red circle", "a photo of a cat " * 30], padding="max_length", max_length=32,
                 truncation=True, return_tensors="np")
    ids = batch["input_ids"]
    assert ids.shape == (2, 32) and ids[1, -1] == 1 and ids[0, -1] == 0
    assert list(ids[0, : len(sp.encode("a red circle")) + 1]) == sp.encode("a red circle") + [1]
