"""LoRAs against diffusers + peft, in three namings, on float and quantized bases, and every bad file.

The authority: random LoRAs made by peft on the tiny pipelines of tests/tiny.py, written by diffusers'
`FluxPipeline.save_lora_weights`, loaded into diffusers' `FluxPipeline` by `load_lora_weights` and
weighted by `set_adapters`; images from the same latents. The text encoder's LoRA is checked against
peft's own LoRA layers injected into transformers' CLIP (diffusers' text-encoder loading needs a newer
peft than this environment's). kohya and BFL files are the same LoRA renamed by diffusers' key rules
(tests/lora_files.py), so they must give the same images.
"""

import functools
import hashlib

import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from mlx_crepulse import Pipeline, Recipe, WeightsError, lora
from mlx_crepulse.recipe import RecipeError
from tests import lora_files, tiny
from tests.test_pipeline import PROMPT, latents, loaded


@pytest.fixture(scope="module")
def files(schnell_dir, dev_dir, wide_dir, tmp_path_factory):
    """Random LoRAs: a, b (transformer only) on the schnell-like model, c with CLIP on it too (and its
    kohya file), d and e on the dev-like one, w on the wide one; a's BFL file."""
    root = tmp_path_factory.mktemp("loras")
    out = {"a": lora_files.make(schnell_dir, root / "a.safetensors", seed=1, text_encoder=False),
           "c": lora_files.make(schnell_dir, root / "c.safetensors", seed=3),
           "d": lora_files.make(dev_dir, root / "d.safetensors", seed=4, text_encoder=False),
           "e": lora_files.make(dev_dir, root / "e.safetensors", seed=5, rank=2, alpha=2, text_encoder=False),
           "w": lora_files.make(wide_dir, root / "w.safetensors", seed=6, text_encoder=False, std=0.1)}
    out["a_bfl"] = lora_files.write_bfl(out["a"], root / "a_bfl.safetensors")
    out["c_kohya"] = lora_files.write_kohya(out["c"], root / "c_kohya.safetensors")
    out["c_alphas"] = lora_files.write_alpha_keys(out["c"], root / "c_alphas.safetensors")
    out["root"] = root
    return out


def diffusers_images(folder, L, loras):
    """diffusers' FluxPipeline with `loras` [(file, scale)] loaded as named adapters and weighted."""
    ref = tiny.reference(folder)
    ref.set_progress_bar_config(disable=True)
    names = [f"l{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        ref.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    ref.set_adapters(names, adapter_weights=[s for _, s in loras])
    return ref(PROMPT, latents=torch.from_numpy(L), num_inference_steps=4, guidance_scale=3.5, height=tiny.SIZE,
               width=tiny.SIZE, max_sequence_length=tiny.SEQ, output_type="np",
               num_images_per_prompt=L.shape[0]).images


def images(pipe, L):
    return pipe.generate(PROMPT, n=L.shape[0], latents=L, output_type="np", steps=4).images


@functools.lru_cache(maxsize=None)
def fresh(folder, quantize=None):
    """A pipeline of our own for LoRA tests (the shared `loaded` ones must stay without LoRAs)."""
    return Pipeline.from_pretrained(str(folder), quantize=quantize)


# --------------------------------------------------------------------------- against diffusers


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_lora_matches_diffusers(scale, schnell_dir, files):
    """One diffusers-format LoRA (PEFT's alpha/rank = 2 read from the file's header) at scales 0.5 and
    1 gives diffusers' images within 2e-3, and changes them (the LoRA is not ignored)."""
    L = latents()
    want = diffusers_images(schnell_dir, L, [(files["a"], scale)])
    pipe = fresh(schnell_dir)
    pipe.set_loras([(files["a"], scale)])
    got = images(pipe, L)
    base = images(loaded(schnell_dir), L)
    err = np.abs(got - want).max()
    print(f"scale {scale}: max abs difference to diffusers {err:.2e}, LoRA effect {np.abs(got - base).max():.2f}")
    assert err <= 2e-3 and np.abs(got - base).max() > 0.05


def test_two_loras_match_diffusers(dev_dir, files):
    """Two LoRAs at once (ranks 4 and 2, alphas 8 and 2), at scales 0.5 and 1, on the dev-like model
    (guidance embedder adapted too): diffusers' images within 2e-3; pipe.loras records both in order."""
    L = latents()
    loras = [(files["d"], 0.5), (files["e"], 1.0)]
    want = diffusers_images(dev_dir, L, loras)
    pipe = Pipeline.from_pretrained(str(dev_dir), loras=loras)
    got = images(pipe, L)
    err = np.abs(got - want).max()
    print(f"two LoRAs: max abs difference to diffusers {err:.2e}")
    assert err <= 2e-3
    assert [(r["file"], r["scale"]) for r in pipe.loras] == [("d.safetensors", 0.5), ("e.safetensors", 1.0)]


def test_text_encoder_lora_matches_peft(schnell_dir, files):
    """The CLIP part of a diffusers LoRA file (keys text_encoder.encoder.layers...) applied at 0.7 gives
    the pooled embedding of transformers' CLIP with peft's LoRA layers and lora_B scaled by 0.7 x alpha/r,
    within 1e-4; the prompt cache is dropped when the LoRAs change."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import CLIPTextModel
    pipe = fresh(schnell_dir)
    pipe.set_loras([])
    before = np.array(pipe.encode(PROMPT, tiny.SEQ)[1])
    pipe.set_loras([(files["c"], 0.7)])
    ours = np.array(pipe.encode(PROMPT, tiny.SEQ)[1])
    sd = {k[len("text_encoder."):]: v * (0.7 * lora_files.alpha_over_rank(files["c"]) if ".lora_B." in k else 1)
          for k, v in load_file(str(files["c"])).items() if k.startswith("text_encoder.")}
    clip = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=lora_files.CLIP_TARGETS),
                                   CLIPTextModel.from_pretrained(schnell_dir / "text_encoder"))
    set_peft_model_state_dict(clip, sd)
    ids = torch.from_numpy(np.array(pipe.tokenizer.ids(PROMPT, pipe.tokenizer.model_max_length)))
    with torch.no_grad():
        want = clip(ids).pooler_output.numpy()
    err = np.abs(ours - want).max()
    print(f"CLIP with LoRA: max abs difference to peft {err:.2e}")
    assert err <= 1e-4 and np.abs(ours - before).max() > 1e-2


# --------------------------------------------------------------------------- other namings


def test_bfl_and_kohya_files_give_the_same_images(schnell_dir, files):
    """a in BFL naming (diffusion_model.double_blocks.0.img_attn.qkv.lora_A, fused qkv and linear1, the
    final modulation's halves swapped) and c in kohya naming (lora_unet_..., lora_te1_..., alpha = rank/2)
    give the images of their diffusers files within 1e-4; so does c with alpha keys instead of PEFT's header."""
    L = latents()
    pipe = fresh(schnell_dir)
    for plain, renamed in (("a", "a_bfl"), ("c", "c_kohya"), ("c", "c_alphas")):
        pipe.set_loras([(files[plain], 0.8)])
        want = images(pipe, L)
        pipe.set_loras([(files[renamed], 0.8)])
        got = images(pipe, L)
        err = np.abs(got - want).max()
        print(f"{renamed}: max abs difference to {plain} {err:.2e}")
        assert err <= 1e-4


def test_kohya_naming_agrees_with_diffusers_converter(schnell_dir, files):
    """diffusers' own kohya converter (_convert_kohya_flux_lora_to_diffusers) on the kohya file, restricted
    to the double blocks (its single-block split is sized for full FLUX only), gives lora_B @ lora_A
    products equal to ours for every layer (alpha / rank applied, fused qkv split)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    from safetensors.torch import load_file
    sd = {k: v for k, v in load_file(str(files["c_kohya"])).items() if "double_blocks" in k}
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    f = lora.read(files["c_kohya"])
    f.pairs = {k: v for k, v in f.pairs.items() if "double_blocks" in k}
    ours = lora.deltas(f, {"transformer": lora.linear_layers(fresh(schnell_dir).transformer)})
    assert len(ours) == 2 * 14  # per block: q, k, v twice (from 2 qkv), 2 out projections, 4 MLP, 2 mod
    for (_, path), [(a, b)] in ours.items():
        key = f"transformer.{path}"
        want = theirs[key + ".lora_B.weight"] @ theirs[key + ".lora_A.weight"]
        assert np.allclose(np.array(b @ a), want.numpy(), atol=1e-5), path


# --------------------------------------------------------------------------- applying, restoring


def test_scale_zero_and_removal_restore_the_base_bit_for_bit(schnell_dir, files):
    """A LoRA at scale 0 gives the base's images bit for bit; after set_loras([]) the layers are the very
    objects they were and the images are again the base's bit for bit; a LoRA never changes the model's
    parameter names or values (saving writes the base)."""
    L = latents(n=1)
    pipe = fresh(schnell_dir)
    pipe.set_loras([])
    layers = dict(pipe.transformer.named_modules())
    params = {k: np.array(v) for k, v in tree_flatten(pipe.transformer.parameters())}
    base = images(pipe, L)
    pipe.set_loras([(files["a"], 0.0), (files["c"], 0)])
    assert np.array_equal(images(pipe, L), base)
    pipe.set_loras([(files["a"], 1.0)])
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q) is lora.LoraLinear
    assert {k: np.array(v) for k, v in tree_flatten(pipe.transformer.parameters())}.keys() == params.keys()
    assert not np.array_equal(images(pipe, L), base)
    pipe.set_loras([])
    assert all(m is layers[p] for p, m in pipe.transformer.named_modules())
    assert all(np.array_equal(np.array(v), params[k]) for k, v in tree_flatten(pipe.transformer.parameters()))
    assert np.array_equal(images(pipe, L), base) and pipe.loras == []


def test_quantized_base_keeps_its_loras(wide_dir, files):
    """On 8- and 4-bit bases the LoRA stays beside the quantized layers at full precision: against float32
    + LoRA, 8-bit + LoRA is within the quantization tests' 0.05, 4-bit + LoRA within 1.5x the 4-bit base's
    own error against float32; and at both widths the quantized image without the LoRA is more than twice
    as far (so a LoRA dropped on a quantized base fails)."""
    L = latents()
    pipe = fresh(wide_dir)
    pipe.set_loras([])
    base = images(pipe, L)
    pipe.set_loras([(files["w"], 1.0)])
    want = images(pipe, L)
    for bits in (8, 4):
        q = Pipeline.from_pretrained(str(wide_dir), quantize=bits)
        without = images(q, L)
        q.set_loras([(files["w"], 1.0)])
        assert type(q.transformer.transformer_blocks[0].attn.to_q) is lora.LoraQuantizedLinear
        got = images(q, L)
        err, dropped, own = (np.abs(x - y).max() for x, y in ((got, want), (without, want), (without, base)))
        print(f"{bits}-bit + LoRA: max abs difference to float32 + LoRA {err:.3f}; without the LoRA {dropped:.3f}; "
              f"{bits}-bit base to float32 base {own:.3f}")
        assert dropped > 2 * err
        assert err <= (0.05 if bits == 8 else 1.5 * own)


def test_low_memory_mode_reapplies_text_encoder_loras(schnell_dir, files):
    """In low-memory mode CLIP is freed after each prompt and read again: the LoRA's CLIP part is applied
    to each new copy, and set_loras while CLIP is freed reads it and adapts it (the images equal the
    normal mode's bit for bit)."""
    L = latents(n=1)
    pipe = fresh(schnell_dir)
    pipe.set_loras([(files["c"], 1.0)])
    want = images(pipe, L)
    low = Pipeline.from_pretrained(str(schnell_dir), low_memory=True, loras=[(files["c"], 1.0)])
    assert np.array_equal(images(low, L), want)
    low._prompt_cache.clear()  # a new prompt reads CLIP again
    assert low.text_encoder is None and np.array_equal(images(low, L), want)
    pipe.set_loras([(files["c"], 0.5)])  # changed while CLIP is freed: read again, then re-adapted
    low.set_loras([(files["c"], 0.5)])
    assert np.array_equal(images(low, L), images(pipe, L))


# --------------------------------------------------------------------------- bad files


def _save(path, tensors):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _bad_files(files, root):
    """name -> (file, words its one error must contain besides the file's name)."""
    from safetensors.torch import load_file
    good = load_file(str(files["a"]))
    r = torch.randn
    out = {
        "no key matches (SDXL)": (_save(root / "sdxl.safetensors", {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": r(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": r(32, 4)}),
            ["1 of 1 layers match no layer", "lora_unet_down_blocks_0_attentions_0_proj_in"]),
        "partial match": (_save(root / "partial.safetensors", {
            **good, "transformer.transformer_blocks.7.attn.to_q.lora_A.weight": r(4, 32),
            "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": r(32, 4)}),
            ["match no layer", "transformer.transformer_blocks.7.attn.to_q"]),
        "shape": (files["w"], ["transformer.", "needs", "another model"]),
        "half a pair": (_save(root / "half.safetensors", {
            k: v for k, v in good.items() if k != "transformer.proj_out.lora_B.weight"}),
            ["transformer.proj_out", "no lora_B"]),
        "stray tensor": (_save(root / "stray.safetensors", {**good, "transformer.proj_out.weight": r(16, 32)}),
                         ["transformer.proj_out.weight", "not part of a LoRA pair"]),
        "DoRA": (_save(root / "dora.safetensors", {**good, "transformer.proj_out.lora_magnitude_vector": r(16)}),
                 ["DoRA"]),
        "not a LoRA": (_save(root / "empty.safetensors", {}), ["no LoRA tensors"]),
    }
    torch.save(good, root / "pickled.safetensors")
    out["pickle"] = (root / "pickled.safetensors", ["pickle", "never loaded"])
    data = files["a"].read_bytes()
    (root / "truncated.safetensors").write_bytes(data[:len(data) // 2])
    out["truncated"] = (root / "truncated.safetensors", ["truncated"])
    (root / "cut_header.safetensors").write_bytes(data[:40])
    out["truncated header"] = (root / "cut_header.safetensors", ["truncated"])
    return out


def test_every_bad_file_is_one_clear_error_before_any_change(schnell_dir, files, tmp_path):
    """No matching key, a partial match, a shape that does not fit, half a pair, a stray tensor, a DoRA,
    an empty file, a pickle, a truncated file: each is one LoraError (a WeightsError) naming the file and
    the key, raised by set_loras before any layer changes (the LoRA already applied stays, the images are
    the same bit for bit), and by from_pretrained before the model's weights are read."""
    L = latents(n=1)
    pipe = fresh(schnell_dir)
    pipe.set_loras([(files["a"], 1.0)])
    before = images(pipe, L)
    for case, (path, words) in _bad_files(files, tmp_path).items():
        with pytest.raises(lora.LoraError) as e:
            pipe.set_loras([(files["a"], 1.0), (path, 1.0)])
        message = str(e.value)
        print(f"{case}: {message}")
        assert path.name in message and all(w in message for w in words), (case, message)
        assert pipe.loras[0]["file"] == "a.safetensors" and len(pipe.loras) == 1
    assert np.array_equal(images(pipe, L), before)
    with pytest.raises(WeightsError, match="pickle"):
        Pipeline.from_pretrained(str(schnell_dir), loras=[(tmp_path / "pickled.safetensors", 1.0)])
    with pytest.raises(lora.LoraError, match="no LoRA file"):
        pipe.set_loras([tmp_path / "nowhere.safetensors"])
    for bad in ([(files["a"], "strong")], [(files["a"], float("nan"))], [42]):
        with pytest.raises(ValueError):
            pipe.set_loras(bad)


# --------------------------------------------------------------------------- records and the Hub


def test_recorded_loras_are_checked_against_their_files(schnell_dir, files, tmp_path):
    """pipe.loras records file name, scale, SHA-256 (of the file's bytes) and the reference given;
    verify() accepts the record while the file is unchanged and refuses it, with one clear error, once
    the file is changed or gone; from_pretrained takes the record itself."""
    path = tmp_path / "mine.safetensors"
    path.write_bytes(files["a"].read_bytes())
    pipe = fresh(schnell_dir)
    pipe.set_loras([(str(path), 0.5)])
    record = pipe.loras
    assert record == [{"file": "mine.safetensors", "scale": 0.5, "source": str(path),
                       "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    assert [(f.path, s) for f, s in lora.verify(record)] == [(path, 0.5)]
    again = Pipeline.from_pretrained(str(schnell_dir), loras=record)
    L = latents(n=1)
    assert again.loras == record and np.array_equal(images(again, L), images(pipe, L))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(lora.LoraError, match="has changed since it was recorded"):
        lora.verify(record)
    path.unlink()
    with pytest.raises(lora.LoraError, match="no LoRA file"):
        lora.verify(record)


def test_hub_references_resolve_from_the_cache_and_fail_clearly_offline(files, tmp_path, monkeypatch):
    """`owner/name:file.safetensors` and `owner/name` (diffusers' default file name) are read through
    huggingface_hub's cache; offline, a file the cache lacks is one error saying so."""
    import huggingface_hub.constants
    snapshot = tmp_path / "models--someone--style" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "style.safetensors").write_bytes(files["a"].read_bytes())
    (snapshot / lora.DEFAULT_HUB_FILE).write_bytes(files["a"].read_bytes())
    (tmp_path / "models--someone--style" / "refs").mkdir()
    (tmp_path / "models--someone--style" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    f = lora.read("someone/style:style.safetensors")
    assert f.path.name == "style.safetensors" and f.source == "someone/style:style.safetensors"
    assert lora.resolve("someone/style").name == lora.DEFAULT_HUB_FILE
    with pytest.raises(lora.LoraError, match="not in the Hugging Face cache"):
        lora.resolve("someone/style:other.safetensors")


@pytest.mark.parametrize("text, want", [("style.safetensors", ("style.safetensors", 1.0)),
                                        ("~/l/style.safetensors:0.75", ("~/l/style.safetensors", 0.75)),
                                        ("owner/name:file.safetensors", ("owner/name:file.safetensors", 1.0)),
                                        ("owner/name:file.safetensors:-1.5", ("owner/name:file.safetensors", -1.5))])
def test_cli_argument(text, want):
    """`--lora PATH[:SCALE]`: the last :NUMBER is the scale, a Hub reference keeps its own colon."""
    assert lora.parse_arg(text) == want


def test_recipe_records_the_loras_applied(schnell_dir, files):
    """A result's recipe carries the pipeline's LoRAs (file, scale, SHA-256, source), whatever the recipe
    asked; to_dict / from_dict keep them; a malformed entry is a RecipeError naming the field."""
    pipe = fresh(schnell_dir)
    pipe.set_loras([(files["a"], 0.5)])
    result = pipe.generate(Recipe(PROMPT, n=1, steps=1, seed=3), output_type="np")
    assert list(result.recipe.loras) == pipe.loras and result.recipe.loras[0]["scale"] == 0.5
    again = Recipe.from_dict(result.recipe.to_dict())
    assert again.loras == result.recipe.loras and again == result.recipe
    assert [(f.path, s) for f, s in lora.verify(list(again.loras))] == [(files["a"], 0.5)]
    for bad in ([{"file": "x"}], [{**pipe.loras[0], "sha256": "abc"}], [{**pipe.loras[0], "scale": "1"}], "x"):
        with pytest.raises(RecipeError, match="(?i)lora"):
            Recipe(PROMPT, loras=bad)


@pytest.mark.parametrize("bits", [None, 4, 8])
def test_wrapped_layer_on_a_bf16_base(bits):
    """On a bf16 layer (plain, 4- or 8-bit) the LoRA layer's output stays bf16 and is the base layer's
    output plus x A^T B^T (float32 of the bf16-rounded A, B) within bf16 rounding: no float32 upcast of
    the stream, nothing of the update quantized; its parameters are the base's own arrays."""
    import mlx.core as mx
    import mlx.nn as nn
    mx.random.seed(0)
    layer = nn.Linear(64, 32)
    layer.set_dtype(mx.bfloat16)
    if bits:
        layer = nn.QuantizedLinear.from_linear(layer, 64, bits)
    a, b = mx.random.normal((4, 64)), mx.random.normal((32, 4)) * 0.1
    wrapped = lora.wrap(layer, a, b)
    x = mx.random.normal((2, 3, 64)).astype(mx.bfloat16)
    a16, b16 = a.astype(mx.bfloat16).astype(mx.float32), b.astype(mx.bfloat16).astype(mx.float32)
    want = layer(x).astype(mx.float32) + (x.astype(mx.float32) @ a16.T) @ b16.T
    got = wrapped(x)
    assert got.dtype == mx.bfloat16 and mx.allclose(got.astype(mx.float32), want, rtol=1e-2, atol=2e-2).item()
    assert all(wrapped[k] is layer[k] for k in layer) and set(wrapped) == set(layer)


def test_cli_lora_recorded_rerun_and_refused_when_changed(schnell_dir, tmp_path):
    """`--lora FILE:0.5` applies the LoRA and records it (file, scale, SHA-256) in each PNG; `info` names
    it; `--from` re-runs the image bit for bit with it; once the file changes, `--from` exits 2 with one
    line saying so, before any work, and writes nothing."""
    import subprocess
    import sys

    from PIL import Image

    from mlx_crepulse import metadata

    path = lora_files.make(schnell_dir, tmp_path / "style.safetensors", seed=11, text_encoder=False)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mlx_crepulse", *map(str, args), "--quiet"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)

    made = cli("a red fox", "--model", schnell_dir, "-n", "2", "--steps", "2", "--seed", "3", "--no-sheet",
               "--lora", f"{path}:0.5")
    assert made.returncode == 0, made.stderr
    image = made.stdout.split()[1]
    (recorded,) = metadata.read_png(tmp_path / image)["loras"]
    assert recorded["file"] == "style.safetensors" and recorded["scale"] == 0.5 and len(recorded["sha256"]) == 64
    shown = subprocess.run([sys.executable, "-m", "mlx_crepulse", "info", image], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
    assert "LoRAs: style.safetensors x0.5" in shown.stdout, shown.stderr
    plain = cli("a red fox", "--model", schnell_dir, "-n", "2", "--steps", "2", "--seed", "3", "--no-sheet", "-o", "plain")
    again = cli("--from", image, "-o", "again")
    assert again.returncode == 0, again.stderr
    pixels = [np.asarray(Image.open(tmp_path / p)) for p in (image, again.stdout.strip(), plain.stdout.split()[1])]
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])
    lora_files.make(schnell_dir, path, seed=12, text_encoder=False)  # the file changes under the recipe
    changed = cli("--from", image, "-o", "changed")
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1 and "has changed since it was recorded" in changed.stderr
    assert not (tmp_path / "changed").exists()
