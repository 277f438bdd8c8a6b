"""Weights: BFL single-file checkpoints, quantized sizes and memory, and what bad input gives.

Authorities: diffusers' own single-file converter (`convert_flux_transformer_checkpoint_to_diffusers`)
for the BFL key mapping; the file sizes and MLX's allocator (`mx.get_peak_memory`) for quantization;
the documented contract of `Pipeline.from_pretrained` (one `WeightsError` that names the file or tensor
and says what to do, no pickle ever unpickled, nothing returned half-loaded) for bad input.
"""

import json
import pickle
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from mlx.utils import tree_flatten, tree_map
from safetensors.torch import load_file, save_file

from mlx_crepulse import Pipeline, WeightsError, weights
from mlx_crepulse.models.flux import FluxTransformer
from tests import tiny

# ------------------------------------------------------------------------------ BFL single files

D, IN, CTX, POOL = 3072, 64, 64, 64  # the converter hard-codes hidden 3072 and MLP ratio 4
BFL_CONFIG = dict(num_attention_heads=24, attention_head_dim=128, num_layers=1, num_single_layers=1,
                  in_channels=IN, joint_attention_dim=CTX, pooled_projection_dim=POOL, guidance_embeds=True)
PREFIX = "model.diffusion_model."


def bfl_shapes(d: int = D, head_dim: int = 128) -> dict:
    """Key -> shape of a FLUX.1-dev BFL checkpoint (flux1-dev.safetensors) of hidden width `d`, with 1
    double and 1 single block and small input, context and pooled widths."""
    linears = {"img_in": (d, IN), "txt_in": (d, CTX), "time_in.in_layer": (d, 256), "time_in.out_layer": (d, d),
               "vector_in.in_layer": (d, POOL), "vector_in.out_layer": (d, d), "guidance_in.in_layer": (d, 256),
               "guidance_in.out_layer": (d, d), "final_layer.linear": (IN, d),
               "final_layer.adaLN_modulation.1": (2 * d, d),
               "single_blocks.0.linear1": (3 * d + 4 * d, d), "single_blocks.0.linear2": (d, d + 4 * d),
               "single_blocks.0.modulation.lin": (3 * d, d)}
    for side in ("img", "txt"):
        b = f"double_blocks.0.{side}_"
        linears.update({b + "mod.lin": (6 * d, d), b + "attn.qkv": (3 * d, d), b + "attn.proj": (d, d),
                        b + "mlp.0": (4 * d, d), b + "mlp.2": (d, 4 * d)})
    shapes = {}
    for k, (out, inp) in linears.items():
        shapes[k + ".weight"], shapes[k + ".bias"] = (out, inp), (out,)
    for norm in ("double_blocks.0.img_attn.norm", "double_blocks.0.txt_attn.norm", "single_blocks.0.norm"):
        shapes[norm + ".query_norm.scale"] = shapes[norm + ".key_norm.scale"] = (head_dim,)
    return shapes


@pytest.fixture(scope="module")
def bfl(tmp_path_factory):
    """A random float16 BFL checkpoint (530M values, 1 GB) written with safetensors.torch.save_file, and
    what diffusers' converter makes of it. Each tensor is a different window of one random pool (drawing
    530M fresh normals would take longer than the whole test), so no two tensors or halves are equal."""
    pool = torch.randn(7 * D * D + 7919, generator=torch.Generator().manual_seed(0), dtype=torch.float16)
    state, offset = {}, 0
    for key, shape in bfl_shapes().items():
        n = int(np.prod(shape))
        offset = (offset + 7919 * 13) % (pool.numel() - n)
        state[key] = pool[offset:offset + n].view(shape).clone()
    del pool
    folder = tmp_path_factory.mktemp("bfl")
    save_file(state, str(folder / "flux1-tiny.safetensors"))
    reference = convert_flux_transformer_checkpoint_to_diffusers(dict(state))
    return dict(folder=folder, file=folder / "flux1-tiny.safetensors", state=state, reference=reference)


def assert_equal_to(reference: dict, ours: dict):
    """Same names, dtypes, shapes and bits (compared as raw 16-bit words, without copies)."""
    assert sorted(ours) == sorted(reference)
    for key in list(ours):
        got, want = np.asarray(ours.pop(key)), reference[key].numpy()
        assert got.dtype == want.dtype == np.float16 and got.shape == want.shape, key
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), key


def test_bfl_conversion_equals_diffusers_converter(bfl):
    """`bfl_to_diffusers` on a BFL file read by mx.load gives exactly the tensors (names, shapes, float16
    values) of diffusers' own converter: fused q/k/v and the single blocks' q/k/v/mlp split, the final
    modulation's (shift, scale) swapped."""
    assert_equal_to(bfl["reference"], weights.bfl_to_diffusers(mx.load(str(bfl["file"]))))


def test_bfl_file_loads_into_transformer_without_evaluating_initialisers(bfl):
    """A BFL file in a folder loads through `load_into(FluxTransformer(config), folder)` into every
    parameter of a hidden-3072 transformer with the converter's exact values, and peak memory stays at
    the file's size: the lazy random initialisers of the 1 GB model (2 GB in float32) are never computed,
    as they must not be at full size (tens of GB)."""
    size = bfl["file"].stat().st_size
    mx.reset_peak_memory()
    model = weights.load_into(FluxTransformer(BFL_CONFIG), bfl["folder"])
    peak = mx.get_peak_memory()
    print(f"BFL load: peak {peak / 1e9:.2f} GB for a {size / 1e9:.2f} GB file")
    assert peak < 1.1 * size
    assert_equal_to(bfl["reference"], dict(tree_flatten(model.parameters())))


def test_bfl_prefixed_checkpoint(bfl, tmp_path):
    """Keys under `model.diffusion_model.` (as in ComfyUI-style files) convert to exactly what diffusers'
    converter makes of them, and a prefixed file (here 64 wide: our converter, unlike diffusers', reads
    the widths from the shapes) loads through `load_into` to the same weights as the unprefixed one."""
    prefixed = {PREFIX + k: v for k, v in mx.load(str(bfl["file"])).items()}
    reference = convert_flux_transformer_checkpoint_to_diffusers({PREFIX + k: v for k, v in bfl["state"].items()})
    assert_equal_to(reference, weights.bfl_to_diffusers(prefixed))

    torch.manual_seed(0)
    small = {k: torch.randn(shape, dtype=torch.float16) for k, shape in bfl_shapes(64, 32).items()}
    save_file({PREFIX + k: v for k, v in small.items()}, str(tmp_path / "flux1-prefixed.safetensors"))
    config = dict(BFL_CONFIG, num_attention_heads=2, attention_head_dim=32, axes_dims_rope=[8, 12, 12])
    model = weights.load_into(FluxTransformer(config), tmp_path)
    want = weights.bfl_to_diffusers({k: mx.array(v.numpy()) for k, v in small.items()})
    want = {k: torch.from_numpy(np.array(v)) for k, v in want.items()}
    assert_equal_to(want, dict(tree_flatten(model.parameters())))


# ------------------------------------------------------------------------------ quantized sizes and memory

WIDE = dict(_class_name="FluxTransformer2DModel", num_attention_heads=2, attention_head_dim=128, num_layers=2,
            num_single_layers=2, in_channels=64, joint_attention_dim=256, pooled_projection_dim=256,
            guidance_embeds=True, axes_dims_rope=[16, 56, 56])


def test_4_bit_transformer_file_size_and_peak_memory(tmp_path):
    """A 256-wide transformer saved in bf16 (random float32 weights cast to bf16, the dtype of FLUX's own
    files) and loaded with quantize=4: its saved 4-bit safetensors file takes at most 0.3x the bf16 file
    (weights, scales and biases included), loading it back gives the same output, and the quantizing
    load of that single whole-model file peaks well below the bf16 size plus the quantized one, because
    each layer's bf16 tensors are freed once the layer is quantized (a 24 GB BFL file must not sit in
    memory next to the quantized model)."""
    mx.random.seed(0)
    model = FluxTransformer(WIDE)
    model.update(tree_map(lambda p: p.astype(mx.bfloat16), model.parameters()))
    weights.save_component(model, WIDE, tmp_path / "bf16")
    bf16_file = tmp_path / "bf16" / "diffusion_pytorch_model.safetensors"

    mx.reset_peak_memory()
    base = mx.get_active_memory()
    q4 = weights.load_into(FluxTransformer(WIDE), tmp_path / "bf16", quantize=4)
    peak = mx.get_peak_memory() - base
    q = {"bits": 4, "group_size": weights.GROUP_SIZE}
    weights.save_component(q4, WIDE, tmp_path / "q4", quantization=q)
    q4_file = tmp_path / "q4" / "diffusion_pytorch_model.safetensors"
    ratio = q4_file.stat().st_size / bf16_file.stat().st_size
    print(f"4-bit file / bf16 file = {ratio:.3f}; quantizing load peak {peak / bf16_file.stat().st_size:.2f}x "
          "the bf16 file")
    assert ratio <= 0.3
    assert peak < 0.6 * bf16_file.stat().st_size

    config = json.loads((tmp_path / "q4" / "config.json").read_text())
    assert config["quantization"] == q
    again = weights.load_into(FluxTransformer(config), tmp_path / "q4", saved_quantization=config["quantization"])
    rng = np.random.default_rng(0)
    img = mx.array(rng.standard_normal((1, 16, 64)), mx.bfloat16)
    txt = mx.array(rng.standard_normal((1, 8, 256)), mx.bfloat16)
    pe = q4.pos_embed(mx.zeros((8, 3)), mx.zeros((16, 3)))
    vec = q4.conditioning(mx.array([0.5]), mx.ones((1, 256), mx.bfloat16), mx.array([3.5]))
    assert mx.array_equal(q4(img, txt, vec, pe), again(img, txt, vec, pe))


# ------------------------------------------------------------------------------ bad input


@pytest.fixture
def model_dir(schnell_dir, tmp_path):
    """A private copy of the tiny schnell-like folder, to break."""
    return Path(shutil.copytree(schnell_dir, tmp_path / "model"))


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Fails the test if any weights start loading (the check must come first)."""
    monkeypatch.setattr(weights, "load_into", lambda *a, **k: pytest.fail("weights loaded before the check"))


def load_error(source, **kwargs) -> str:
    """The message of the one WeightsError that loading `source` raises (no Pipeline is returned)."""
    with pytest.raises(WeightsError) as e:
        Pipeline.from_pretrained(str(source), **kwargs)
    return str(e.value)


TRANSFORMER_FILE = "transformer/diffusion_pytorch_model.safetensors"


def test_missing_config_fails_before_loading(model_dir, no_weight_loading):
    """A deleted vae/config.json gives one WeightsError naming that file and saying to download again,
    raised before any component's weights are read (the transformer's are the first and largest)."""
    (model_dir / "vae" / "config.json").unlink()
    msg = load_error(model_dir)
    assert "vae/config.json" in msg and "missing" in msg and "download" in msg


def test_missing_component(model_dir):
    """A pipeline folder without text_encoder_2/ is reported as incomplete, naming the component."""
    shutil.rmtree(model_dir / "text_encoder_2")
    msg = load_error(model_dir)
    assert "missing text_encoder_2" in msg and "not a complete FLUX pipeline" in msg


def test_missing_tokenizer(model_dir, no_weight_loading):
    """An empty tokenizer_2/ gives a WeightsError naming it, before any weights load."""
    for f in (model_dir / "tokenizer_2").iterdir():
        f.unlink()
    msg = load_error(model_dir)
    assert "tokenizer_2" in msg and "download" in msg


def test_missing_shard_fails_before_loading(schnell_dir, tmp_path, no_weight_loading):
    """A sharded folder (written by diffusers with 50 KB shards) missing one shard its index lists: the
    error names that shard and says to download again, before any weights load."""
    folder = tmp_path / "sharded"
    tiny.reference(schnell_dir).save_pretrained(folder, safe_serialization=True, max_shard_size="50KB")
    index = json.loads(next((folder / "transformer").glob("*.index.json")).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (folder / "transformer" / shard).unlink()
    msg = load_error(folder)
    assert shard in msg and "missing" in msg and "download" in msg


def test_index_without_weight_map(model_dir):
    """An index json that is not a shard index (no weight_map) is a WeightsError naming the file."""
    (model_dir / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    msg = load_error(model_dir)
    assert "diffusion_pytorch_model.safetensors.index.json" in msg and "weight_map" in msg


def rewrite(path: Path, change):
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))


def test_missing_tensor(model_dir):
    """A transformer file without proj_out.bias: the error names the tensor and the folder and says the
    checkpoint is incomplete or for another model."""
    rewrite(model_dir / TRANSFORMER_FILE, lambda s: s.pop("proj_out.bias"))
    msg = load_error(model_dir)
    assert "proj_out.bias" in msg and "transformer" in msg and "incomplete" in msg


def test_misshapen_tensor(model_dir):
    """A tensor of the wrong shape: the error names it, both shapes and the config it contradicts."""
    rewrite(model_dir / TRANSFORMER_FILE, lambda s: s.update({"x_embedder.weight": torch.zeros(32, 8)}))
    msg = load_error(model_dir)
    assert "x_embedder.weight" in msg and "(32, 8)" in msg and "(32, 16)" in msg and "config.json" in msg


def test_unexpected_tensor(model_dir):
    """A tensor the model does not have: the error names it and says the weights do not fit the config."""
    rewrite(model_dir / TRANSFORMER_FILE, lambda s: s.update({"extra.weight": torch.zeros(2)}))
    msg = load_error(model_dir)
    assert "extra.weight" in msg and "do not fit" in msg


def test_truncated_safetensors(model_dir):
    """A safetensors file cut in half (an interrupted download): the error names the file and says it is
    truncated or corrupt and to download it again."""
    path = model_dir / TRANSFORMER_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    msg = load_error(model_dir)
    assert "diffusion_pytorch_model.safetensors" in msg and "truncated or corrupt" in msg and "download" in msg


def test_invalid_json(model_dir):
    """A config.json that is not JSON: the error names it."""
    (model_dir / "transformer" / "config.json").write_text("{not json")
    msg = load_error(model_dir)
    assert "transformer/config.json" in msg and "not valid JSON" in msg


def test_not_a_pipeline_folder(tmp_path):
    """An existing folder without model_index.json, or a file, is not taken for a model: the error says
    what a pipeline folder holds."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "model.safetensors").write_bytes(b"")
    (tmp_path / "file.txt").write_text("hello")
    for source in (tmp_path / "folder", tmp_path / "file.txt"):
        msg = load_error(source)
        assert str(source) in msg and "not a diffusers pipeline folder" in msg and "model_index.json" in msg


class Tripwire:
    """Unpickling this creates a file: proof that a pickle was (or was not) loaded."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_pickle_is_never_unpickled(model_dir, tmp_path):
    """A component with only a pickle `.bin` is refused with an error that names the file and says to
    convert it to safetensors, and the pickle is never unpickled (its tripwire file is never created)."""
    (model_dir / TRANSFORMER_FILE).unlink()
    tripwire = tmp_path / "unpickled"
    (model_dir / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Tripwire(tripwire)))
    msg = load_error(model_dir)
    assert "diffusion_pytorch_model.bin" in msg and "pickle" in msg and "safetensors" in msg
    assert not tripwire.exists()


@pytest.mark.parametrize("source, repo", [("someone/some-flux-repo", "someone/some-flux-repo"),
                                          ("schnell", "black-forest-labs/FLUX.1-schnell")])
def test_offline_without_local_copy(source, repo, tmp_path, monkeypatch):
    """Offline (HF_HUB_OFFLINE=1) with an empty Hugging Face cache, a repo id or an alias gives one
    WeightsError naming the repo, saying it is not in the cache, and how to fetch it once online."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # read at import time
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so "someone/some-flux-repo" cannot be a local folder
    msg = load_error(source)
    assert repo in msg and "not in the Hugging Face cache" in msg and "download" in msg


def test_unknown_source_and_bad_quantize(tmp_path, monkeypatch):
    """A name that is neither an alias, a repo id nor a folder gives a WeightsError listing the
    choices; quantize other than None, 4, 8 is a ValueError raised before the source is even looked at."""
    monkeypatch.chdir(tmp_path)
    msg = load_error("not a model")
    assert "unknown model 'not a model'" in msg and "schnell" in msg and "Hub repo id" in msg
    monkeypatch.setattr(weights, "resolve", lambda *a, **k: pytest.fail("resolved before checking"))
    with pytest.raises(ValueError, match="quantize must be None, 4 or 8"):
        Pipeline.from_pretrained("schnell", quantize=3)


@pytest.mark.parametrize("component, change, words", [
    ("transformer", lambda c: c.pop("num_layers"), "FluxParams config lacks num_layers"),
    ("transformer", lambda c: c.update(num_layer=2), "FluxParams config has unknown key(s) num_layer"),
    ("vae", lambda c: c.pop("scaling_factor"), "VAEParams config lacks scaling_factor"),
])
def test_config_is_typed(model_dir, no_weight_loading, component, change, words):
    """A config missing a field the model needs, or with a key that is not one of the diffusers model's
    arguments, is one WeightsError naming the key and the file, before any weights load (it used to
    fall back silently to full-size FLUX's 19 blocks, or to Stable Diffusion's VAE scale)."""
    path = model_dir / component / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))
    msg = load_error(model_dir)
    assert words in msg and str(path) in msg


def test_damaged_tokenizer_json(model_dir, no_weight_loading):
    """A tokenizer.json cut to `{`: one WeightsError saying it is damaged, before any weights load (the
    CLI used to count tokens first and show a traceback)."""
    (model_dir / "tokenizer_2" / "tokenizer.json").write_text("{")
    msg = load_error(model_dir)
    assert "tokenizer_2" in msg and "tokenizer.json is damaged" in msg and "download" in msg
    assert "sentencepiece" not in msg


def test_crepulse_json_with_a_bad_setting(model_dir, no_weight_loading):
    """A crepulse.json whose scale range is not two numbers: one WeightsError naming the field and file."""
    (model_dir / "crepulse.json").write_text(json.dumps({"repulsion_scale_range": "big"}))
    msg = load_error(model_dir)
    assert "repulsion_scale_range must be [low, high]" in msg and "crepulse.json" in msg
