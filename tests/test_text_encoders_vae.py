"""The MLX T5 encoder, CLIP text encoder and VAE against transformers / diffusers in torch float32.

Each reference is a tiny random model written with its own `save_pretrained`; the MLX model is
built from that folder's config.json and safetensors the way the loader will do it.
"""

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest
import torch

from mlx_crepulse.models import autoencoder, clip, t5

TOL = 1e-4


def save(model, path: Path):
    """save_pretrained the torch model; return (config dict, weights dict read with mx.load)."""
    model.save_pretrained(path, safe_serialization=True)
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(f)))
    return json.loads((path / "config.json").read_text()), weights


def build(module, cls, config, weights):
    model = cls(config)
    model.load_weights(list(module.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    return model


def max_err(a: mx.array, b: torch.Tensor) -> float:
    return float(np.abs(np.array(a) - b.detach().numpy()).max())


def write_back(module, model, path: Path, config: dict):
    """Save an MLX model as a HF folder via unsanitize, as a training script would."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    flat = dict(tree_flatten(model.parameters()))
    name = "diffusion_pytorch_model.safetensors" if module is autoencoder else "model.safetensors"
    mx.save_safetensors(str(path / name), module.unsanitize(flat), metadata={"format": "pt"})


def assert_round_trip(module, weights):
    back = module.unsanitize(module.sanitize(weights))
    assert back.keys() == weights.keys()
    for k, v in weights.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype and mx.array_equal(back[k], v), k


# ---------------------------------------------------------------------------------------------- T5


def t5_reference(tmp_path, feed_forward_proj):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    # Small bucket settings so that a 40-token input reaches the logarithmic and the clamped buckets.
    config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=16, relative_attention_max_distance=20,
                      feed_forward_proj=feed_forward_proj)
    ref = T5EncoderModel(config).eval()
    return ref, *save(ref, tmp_path / "t5")


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_t5_matches_transformers(tmp_path, feed_forward_proj):
    """Authority: transformers T5EncoderModel (float32, no attention mask, as FluxPipeline calls it)."""
    ref, config, weights = t5_reference(tmp_path, feed_forward_proj)
    model = build(t5, t5.T5Encoder, config, weights)
    ids = np.random.default_rng(0).integers(0, 100, size=(2, 40))
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids)).last_hidden_state
    out = model(mx.array(ids))
    assert out.shape == (2, 40, 32)
    err = max_err(out, expected)
    print(f"T5 {feed_forward_proj}: last_hidden_state max abs err {err:.2e}")
    assert err <= TOL


def test_t5_relative_buckets_match_transformers():
    """Authority: transformers T5Attention._relative_position_bucket (bidirectional), FLUX's 32/128."""
    from transformers.models.t5.modeling_t5 import T5Attention

    pos = np.arange(600)
    rel = pos[None, :] - pos[:, None]
    expected = T5Attention._relative_position_bucket(torch.tensor(rel), True, 32, 128).numpy()
    got = np.array(t5.relative_position_bucket(mx.array(rel), 32, 128))
    assert (got == expected).all()


def test_t5_weight_files(tmp_path):
    """Authority: transformers' own files: round trip, the tied embed_tokens duplicate older
    transformers write, and a folder written from MLX loads back in transformers."""
    from transformers import T5EncoderModel

    ref, config, weights = t5_reference(tmp_path, "gated-gelu")
    assert_round_trip(t5, weights)
    legacy = {**weights, "encoder.embed_tokens.weight": weights["shared.weight"]}
    assert t5.sanitize(legacy).keys() == weights.keys()
    renamed = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in weights.items()}
    assert mx.array_equal(t5.sanitize(renamed)["shared.weight"], weights["shared.weight"])

    model = build(t5, t5.T5Encoder, config, weights)
    write_back(t5, model, tmp_path / "back", config)
    again = T5EncoderModel.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, 100, (1, 12))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)


# -------------------------------------------------------------------------------------------- CLIP


def clip_reference(tmp_path, eos_token_id, hidden_act="quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16, hidden_act=hidden_act,
                            eos_token_id=eos_token_id, bos_token_id=98, pad_token_id=1)
    ref = CLIPTextModel(config).eval()
    return ref, *save(ref, tmp_path / "clip")


def clip_ids(eos_token_id):
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 90, size=(3, 16))
    if eos_token_id == 2:
        # Legacy rule: the pooled token is the first maximum id; make ties and put them mid-row.
        ids[0, 5] = ids[0, 9] = 95
        ids[1, 15] = 97
        ids[2, 0] = 96
    else:
        # New rule: first occurrence of eos; rows padded with eos after it, and a bigger id before.
        ids[0, 7:] = eos_token_id
        ids[1, 2] = 99
        ids[1, 12] = eos_token_id
        ids[2, 15] = eos_token_id
    return ids


@pytest.mark.parametrize("eos_token_id,hidden_act", [(2, "quick_gelu"), (50, "quick_gelu"), (50, "gelu")])
def test_clip_matches_transformers(tmp_path, eos_token_id, hidden_act):
    """Authority: transformers CLIPTextModel (float32, causal mask, no padding mask); pooled output at
    the eos position picked by transformers' two rules (eos_token_id == 2 legacy argmax, else first eos)."""
    ref, config, weights = clip_reference(tmp_path, eos_token_id, hidden_act)
    model = build(clip, clip.CLIPTextModel, config, weights)
    ids = clip_ids(eos_token_id)
    with torch.no_grad():
        expected = ref(input_ids=torch.tensor(ids))
    hidden, pooled = model(mx.array(ids))
    assert hidden.shape == (3, 16, 32) and pooled.shape == (3, 32)
    e_hidden, e_pooled = max_err(hidden, expected.last_hidden_state), max_err(pooled, expected.pooler_output)
    print(f"CLIP eos={eos_token_id} {hidden_act}: hidden {e_hidden:.2e}, pooled {e_pooled:.2e}")
    assert e_hidden <= TOL and e_pooled <= TOL


def test_clip_weight_files(tmp_path):
    """Authority: transformers' own files, in both layouts (FLUX's `text_model.`-prefixed files with
    the position_ids buffer, and transformers>=5 files without the prefix); a folder written from MLX
    loads back in transformers."""
    from transformers import CLIPTextModel

    ref, config, weights = clip_reference(tmp_path, 2)
    legacy = {"text_model." + k: v for k, v in weights.items()}
    assert_round_trip(clip, legacy)
    assert clip.unsanitize(clip.sanitize(weights)).keys() == legacy.keys()
    with_buffer = {**legacy, "text_model.embeddings.position_ids": mx.arange(16)[None]}
    assert clip.sanitize(with_buffer).keys() == legacy.keys()

    model = build(clip, clip.CLIPTextModel, config, with_buffer)
    write_back(clip, model, tmp_path / "back", config)
    again = CLIPTextModel.from_pretrained(tmp_path / "back").eval()
    ids = torch.tensor(clip_ids(2))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).pooler_output, ref(input_ids=ids).pooler_output)


# --------------------------------------------------------------------------------------------- VAE


def vae_reference(tmp_path, quant_convs=False, attention=True):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ref = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        layers_per_block=1, norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=quant_convs,
                        use_post_quant_conv=quant_convs, mid_block_add_attention=attention,
                        shift_factor=0.1159, scaling_factor=0.3611).eval()
    return ref, *save(ref, tmp_path / "vae")


@pytest.mark.parametrize("quant_convs,attention", [(False, True), (True, True), (True, False)])
def test_vae_matches_diffusers(tmp_path, quant_convs, attention):
    """Authority: diffusers AutoencoderKL (float32): encode(...).latent_dist mean, mean + std * noise,
    and decode(...).sample, on NCHW tensors transposed to MLX's NHWC."""
    ref, config, weights = vae_reference(tmp_path, quant_convs, attention)
    model = build(autoencoder, autoencoder.AutoencoderKL, config, weights)
    assert (model.scaling_factor, model.shift_factor) == (0.3611, 0.1159)
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
    z = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    noise = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
    nchw = lambda a: torch.tensor(a.transpose(0, 3, 1, 2))
    with torch.no_grad():
        dist = ref.encode(nchw(x)).latent_dist
        e_mean, e_sample = dist.mean, dist.mean + dist.std * nchw(noise)
        e_image = ref.decode(nchw(z)).sample
    nhwc = lambda t: t.permute(0, 2, 3, 1)
    errs = {
        "mean": max_err(model.encode(mx.array(x)), nhwc(e_mean)),
        "sample": max_err(model.encode(mx.array(x), noise=mx.array(noise)), nhwc(e_sample)),
        "decode": max_err(model.decode(mx.array(z)), nhwc(e_image)),
    }
    report = ", ".join(f"{k} {v:.2e}" for k, v in errs.items())
    print(f"VAE quant_convs={quant_convs} attention={attention}: {report}")
    assert max(errs.values()) <= TOL


def test_vae_weight_files(tmp_path):
    """Authority: diffusers' own files round trip exactly; a folder written from MLX loads back in
    diffusers and decodes identically."""
    from diffusers import AutoencoderKL

    ref, config, weights = vae_reference(tmp_path, quant_convs=True)
    assert_round_trip(autoencoder, weights)
    model = build(autoencoder, autoencoder.AutoencoderKL, config, weights)
    write_back(autoencoder, model, tmp_path / "back", config)
    again = AutoencoderKL.from_pretrained(tmp_path / "back").eval()
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(again.decode(z).sample, ref.decode(z).sample)


def test_vae_is_differentiable(tmp_path):
    """Authority: none (a property the VAE training script needs): mx.grad reaches every parameter
    through encode with noise and decode, and the gradient is finite."""
    _, config, weights = vae_reference(tmp_path, quant_convs=True)
    model = build(autoencoder, autoencoder.AutoencoderKL, config, weights)
    x = mx.random.uniform(-1, 1, (1, 16, 16, 3), key=mx.random.key(0))
    noise = mx.random.normal((1, 8, 8, 4), key=mx.random.key(1))

    def loss(params):
        model.update(params)
        return mx.mean((model.decode(model.encode(x, noise=noise)) - x) ** 2)

    grads = tree_flatten(mx.grad(loss)(model.trainable_parameters()))
    assert len(grads) == len(weights)
    assert all(bool(mx.all(mx.isfinite(g))) for _, g in grads)
    assert sum(float(mx.abs(g).sum()) > 0 for _, g in grads) == len(grads)


# ------------------------------------------------------------------------------------ strict loading


@pytest.mark.parametrize("which", ["t5", "clip", "vae"])
def test_strict_loading_rejects_bad_weights(tmp_path, which):
    """Authority: mlx.nn.Module.load_weights(strict=True): a missing tensor, an extra tensor and a
    misshapen tensor each raise ValueError (dtype is NOT checked by mlx; the loader casts)."""
    module, cls, (_, config, weights) = {
        "t5": (t5, t5.T5Encoder, t5_reference(tmp_path, "gated-gelu")),
        "clip": (clip, clip.CLIPTextModel, clip_reference(tmp_path, 2)),
        "vae": (autoencoder, autoencoder.AutoencoderKL, vae_reference(tmp_path)),
    }[which]
    good = module.sanitize(weights)
    name = sorted(good)[0]
    missing = {k: v for k, v in good.items() if k != name}
    extra = {**good, "unexpected.weight": mx.zeros((1,))}
    misshapen = {**good, name: mx.zeros((*good[name].shape[:-1], good[name].shape[-1] + 1))}
    for bad in (missing, extra, misshapen):
        with pytest.raises(ValueError):
            cls(config).load_weights(list(bad.items()), strict=True)


def test_tiled_decode_matches_diffusers(tmp_path):
    """decode_tiled equals diffusers' AutoencoderKL.tiled_decode with the same tile size and overlap
    (the low-memory mode's decode), on a latent several tiles wide and not a multiple of the stride."""
    import diffusers

    torch.manual_seed(3)
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                                  layers_per_block=1, norm_num_groups=8, use_quant_conv=False,
                                  use_post_quant_conv=True, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval()
    ref.save_pretrained(tmp_path, safe_serialization=True)
    ours = autoencoder.AutoencoderKL(json.loads((tmp_path / "config.json").read_text()))
    ours.load_weights(list(autoencoder.sanitize(mx.load(str(tmp_path / "diffusion_pytorch_model.safetensors"))).items()))
    ref.enable_tiling()
    ref.tile_latent_min_size, ref.tile_sample_min_size, ref.tile_overlap_factor = 8, 16, 0.25
    z = np.random.default_rng(0).standard_normal((1, 4, 14, 21)).astype(np.float32)
    with torch.no_grad():
        want = ref.decode(torch.from_numpy(z)).sample.numpy().transpose(0, 2, 3, 1)
    got = np.array(ours.decode_tiled(mx.array(z.transpose(0, 2, 3, 1)), tile=8))
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4
    whole = np.array(ours.decode(mx.array(z.transpose(0, 2, 3, 1))))
    assert np.abs(got - whole).max() > 1e-3  # it really decoded in tiles
