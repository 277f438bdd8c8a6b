"""The FLUX.2 transformer against diffusers' `Flux2Transformer2DModel`.

A tiny random model written by diffusers' own `save_pretrained` is loaded by our loader; both run the
same inputs in float32 on the CPU. This proves the key names, the shared modulation, SwiGLU, the fused
single-block projection and the 4-axis RoPE, and that the hook sees each block's own outputs."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel

from mlx_crepulse import weights
from mlx_crepulse.models import flux2

ROWS, COLS, TXT = 3, 4, 5


def build(folder, guidance_embeds):
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=24, mlp_ratio=3.0,
                                    axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds)
    with torch.no_grad():  # no weight left at zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    return model.eval()


def inputs(batch=2):
    rng = np.random.default_rng(1)
    img = rng.standard_normal((batch, ROWS * COLS, 16)).astype(np.float32)
    txt = rng.standard_normal((batch, TXT, 24)).astype(np.float32)
    return img, txt


def ours(folder):
    return weights.load_into(flux2.Flux2Transformer(weights.read_json(folder / "config.json")), folder)


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_matches_diffusers(tmp_path, guidance_embeds):
    """Velocity within 1e-4 of diffusers for a batch of 2, at t = 0.7 (and guidance 3.5 where embedded);
    the hook is called after every block with the text stream diffusers' double blocks return."""
    ref = build(tmp_path, guidance_embeds)
    img, txt = inputs()
    tids = torch.from_numpy(np.array(flux2.text_ids(TXT)))
    iids = torch.from_numpy(np.array(flux2.image_ids(ROWS, COLS)))
    seen = []
    handles = [b.register_forward_hook(lambda m, a, o: seen.append(o[0].numpy().copy()))
               for b in ref.transformer_blocks]
    with torch.no_grad():
        want = ref(torch.from_numpy(img), torch.from_numpy(txt), timestep=torch.tensor([0.7, 0.7]),
                   img_ids=iids, txt_ids=tids, guidance=torch.tensor([3.5, 3.5]) if guidance_embeds else None,
                   return_dict=False)[0].numpy()
    for h in handles:
        h.remove()
    tf = ours(tmp_path)
    calls = []

    def hook(kind, index, t, i):
        calls.append((kind, index, np.array(t)))
        return t, i
    vec = tf.conditioning(mx.array([0.7]), None, mx.array([3.5]))
    pe = tf.pos_embed(flux2.text_ids(TXT), flux2.image_ids(ROWS, COLS))
    got = np.array(tf(mx.array(img), mx.array(txt), vec, pe, hook))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert [c[:2] for c in calls] == [("double", 0), ("double", 1), ("single", 0), ("single", 1)]
    for (_, _, t), w in zip(calls, seen):
        np.testing.assert_allclose(t, w, atol=1e-4, rtol=0)
    # and without a hook (the CPU's two-stream path), the same numbers
    np.testing.assert_allclose(np.array(tf(mx.array(img), mx.array(txt), vec, pe)), want, atol=1e-4, rtol=0)


def test_config_misfit_is_one_clear_error(tmp_path):
    """Weights of another width than the config says: a WeightsError naming the tensor, before any work."""
    build(tmp_path, False)
    config = dict(weights.read_json(tmp_path / "config.json"), joint_attention_dim=32)
    with pytest.raises(weights.WeightsError, match="context_embedder"):
        weights.load_into(flux2.Flux2Transformer(config), tmp_path)
