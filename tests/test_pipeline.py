"""The whole pipeline against diffusers' FluxPipeline, and the behaviour promised around it.

The authority for the numbers is diffusers itself: the tiny pipelines of `tests/tiny.py` are written by
`FluxPipeline.save_pretrained`, run by `FluxPipeline.from_pretrained(...)(...)` in torch float32 on the
CPU, and read by our loader from the same folder. Everything else (seeds, low-memory mode, argument
checks, quantization) is checked against our own unquantized float32 output or the documented API.
"""

import functools
import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from mlx_crepulse import Pipeline, sampling
from tests import tiny

PROMPT = "a red circle on a blue square"
NEGATIVE = "blurry, grey"
TOKENS, CHANNELS = 64, 16  # 32x32 pixels, tiny VAE scale 2, 2x2 patches of 4 latent channels


def latents(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, TOKENS, CHANNELS)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def loaded(folder, quantize=None) -> Pipeline:
    """Our pipeline for a folder, loaded once per test session (tests that change one use their own)."""
    return Pipeline.from_pretrained(str(folder), quantize=quantize)


@functools.lru_cache(maxsize=None)
def reference(folder) -> FluxPipeline:
    ref = tiny.reference(folder)
    ref.set_progress_bar_config(disable=True)
    return ref


def diffusers_images(folder, L, **kw):
    return reference(folder)(PROMPT, latents=torch.from_numpy(L), num_inference_steps=4, guidance_scale=3.5,
               height=tiny.SIZE, width=tiny.SIZE, max_sequence_length=tiny.SEQ, output_type="np",
               num_images_per_prompt=L.shape[0], **kw).images


def ours(folder, L, **kw):
    return loaded(folder).generate(PROMPT, n=L.shape[0], latents=L, output_type="np",
                                                          steps=4, **kw).images


@pytest.fixture
def folders(schnell_dir, dev_dir):
    return {"schnell": schnell_dir, "dev": dev_dir}


# --------------------------------------------------------------------------- against diffusers


@pytest.mark.parametrize("kind", ["schnell", "dev"])
def test_generate_matches_diffusers(kind, folders):
    """A batch of 2 images from given latents, 4 steps, equals diffusers' FluxPipeline on the same folder
    within 2e-3 (max abs, pixels in [0, 1]): the schnell-like one unshifted without guidance embedding,
    the dev-like one with the shifted schedule and embedded guidance 3.5."""
    L = latents()
    want = diffusers_images(folders[kind], L)
    got = ours(folders[kind], L)
    assert got.shape == want.shape == (2, tiny.SIZE, tiny.SIZE, 3) and got.dtype == np.float32
    assert want.std() > 0.05  # real images, not a flat output
    err = np.abs(got - want).max()
    print(f"{kind}: max abs difference to diffusers {err:.2e}")
    assert err <= 2e-3


@pytest.mark.parametrize("kind", ["schnell", "dev"])
def test_true_cfg_matches_diffusers(kind, folders):
    """True classifier-free guidance (negative prompt, scale 3) equals diffusers' FluxPipeline with
    `negative_prompt=..., true_cfg_scale=3.0` within 2e-3, and differs visibly from the call without it."""
    L = latents(seed=1)
    want = diffusers_images(folders[kind], L, negative_prompt=NEGATIVE, true_cfg_scale=3.0)
    got = ours(folders[kind], L, negative_prompt=NEGATIVE, true_cfg=3.0)
    err = np.abs(got - want).max()
    print(f"{kind} true CFG: max abs difference to diffusers {err:.2e}")
    assert err <= 2e-3
    assert np.abs(got - ours(folders[kind], L)).max() > 0.01  # the negative branch did something


@pytest.mark.parametrize("kind", ["schnell", "dev"])
@pytest.mark.parametrize("steps", [1, 2, 4, 20, 28, 50])
def test_schedule_matches_diffusers_scheduler(kind, steps, folders):
    """`sampling.schedule` equals the sigmas of diffusers' FlowMatchEulerDiscreteScheduler as FluxPipeline
    sets them (linspace sigmas, mu from `calculate_shift`, `retrieve_timesteps`) for 32x32 up to
    1360x768 and 2048x2048 images; the dev config shifts by the image-token count, schnell's does not."""
    folder = folders[kind]
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    config = dict(scheduler.config)
    for width, height in [(32, 32), (512, 512), (1024, 1024), (1360, 768), (2048, 2048)]:
        tokens = (width // 16) * (height // 16)  # FLUX.1: VAE scale 8, 2x2 patches
        mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        want = scheduler.sigmas.numpy()
        got = np.array(sampling.schedule(steps, tokens, dict(config)))
        assert got.shape == want.shape == (steps + 1,) and got[-1] == 0.0
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        plain = np.append(np.linspace(1.0, 1 / steps, steps), 0.0)
        if kind == "schnell":
            np.testing.assert_allclose(got, plain, atol=1e-6)
        elif steps > 1:
            assert (got[1:-1] > plain[1:-1] + 1e-3).all()  # shifted towards noise


def test_pack_unpack_match_diffusers():
    """`sampling.pack` / `unpack` (NHWC) equal diffusers' `FluxPipeline._pack_latents` / `_unpack_latents`
    (NCHW) exactly, on a non-square latent grid, and are each other's inverse."""
    B, C, H, W = 2, 16, 8, 12
    nchw = torch.randn(B, C, H, W)
    want = FluxPipeline._pack_latents(nchw, B, C, H, W).numpy()
    packed = sampling.pack(mx.array(nchw.permute(0, 2, 3, 1).numpy()))
    np.testing.assert_array_equal(np.array(packed), want)
    # diffusers takes the pixel size: latents are 2 * (pixels // (vae_scale * 2)) with vae_scale 8
    back = FluxPipeline._unpack_latents(torch.from_numpy(want), H * 8, W * 8, 8).numpy()
    ours_back = np.array(sampling.unpack(mx.array(want), H // 2, W // 2)).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(ours_back, back)
    np.testing.assert_array_equal(ours_back, nchw.numpy())


# --------------------------------------------------------------------------- quantization


def quantized_layers(model):
    return [p for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]


def test_quantize_8_bits_close_to_float(wide_dir):
    """At 8 bits the transformer's and T5's Linear layers really are quantized (CLIP and the VAE are
    not) and the images stay within 0.05 of the float32 ones; at 4 bits the images are finite."""
    L = latents()
    full = loaded(wide_dir).generate(PROMPT, n=2, latents=L, output_type="np").images
    pipe8 = loaded(wide_dir, 8)
    q_tf, q_t5 = quantized_layers(pipe8.transformer), quantized_layers(pipe8.text_encoder_2)
    assert len(q_tf) >= 20 and "transformer_blocks.0.attn.to_q" in q_tf and "x_embedder" not in q_tf
    assert len(q_t5) >= 10 and not quantized_layers(pipe8.text_encoder) and not quantized_layers(pipe8.vae)
    assert pipe8.quantize == 8
    img8 = pipe8.generate(PROMPT, n=2, latents=L, output_type="np").images
    err8 = np.abs(img8 - full).max()
    img4 = loaded(wide_dir, 4).generate(PROMPT, n=2, latents=L, output_type="np").images
    err4 = np.abs(img4 - full).max()
    print(f"8-bit max abs difference to float32 {err8:.2e}; 4-bit {err4:.2e}")
    assert 0 < err8 <= 0.05
    assert np.isfinite(img4).all() and img4.shape == full.shape and err4 > 0


@pytest.mark.parametrize("bits", [4, 8])
def test_saved_quantized_pipeline_reloads_identically(bits, wide_dir, tmp_path):
    """`save` of a quantized pipeline writes a folder that loads (with no quantize argument) as the same
    quantized model, giving bit-identical images; asking it for other bits keeps the saved ones."""
    L = latents()
    pipe = loaded(wide_dir, bits)
    want = pipe.generate(PROMPT, n=2, latents=L, output_type="np").images
    pipe.save(tmp_path / "saved")
    again = Pipeline.from_pretrained(str(tmp_path / "saved"))
    assert again.quantize == bits
    assert quantized_layers(again.transformer) == quantized_layers(pipe.transformer)
    np.testing.assert_array_equal(again.generate(PROMPT, n=2, latents=L, output_type="np").images, want)
    other = 4 if bits == 8 else 8
    assert Pipeline.from_pretrained(str(tmp_path / "saved"), quantize=other).quantize == bits


# --------------------------------------------------------------------------- sharded folders


@pytest.fixture(scope="module")
def sharded_dir(wide_dir, tmp_path_factory):
    """The wide tiny pipeline written again by diffusers with 50 KB shards (index json + shards)."""
    folder = tmp_path_factory.mktemp("sharded")
    tiny.reference(wide_dir).save_pretrained(folder, safe_serialization=True, max_shard_size="50KB")
    for name in ("crepulse.json",):
        (folder / name).write_bytes((wide_dir / name).read_bytes())
    return folder


@pytest.mark.parametrize("quantize", [None, 8])
def test_sharded_folder_loads_like_unsharded(quantize, wide_dir, sharded_dir):
    """A folder saved by diffusers with `max_shard_size="50KB"` (several shards per component, tensors
    of one layer spread over shards) loads shard by shard to bit-identical images, plain and at 8 bits."""
    for name in ("transformer", "text_encoder_2"):
        assert len(list((sharded_dir / name).glob("*.safetensors"))) >= 3
        assert list((sharded_dir / name).glob("*.safetensors.index.json"))
    shard_of = json.loads(next((sharded_dir / "transformer").glob("*.index.json")).read_text())["weight_map"]
    assert any(shard_of[k] != shard_of.get(k.replace(".weight", ".bias"), shard_of[k]) for k in shard_of)
    L = latents()
    want = loaded(wide_dir, quantize).generate(PROMPT, n=2, latents=L, output_type="np").images
    got = Pipeline.from_pretrained(str(sharded_dir), quantize=quantize).generate(PROMPT, n=2, latents=L,
                                                                                  output_type="np").images
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- generate's contract


@pytest.fixture
def schnell(schnell_dir):
    return loaded(schnell_dir)


@pytest.mark.parametrize("kwargs, words", [
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt="   "), "prompt is empty"),
    (dict(n=0), "n must be 1 to 4096, not 0"),
    (dict(width=40), "width 40 must be a multiple of 16 (try 32)"),
    (dict(height=24), "height 24 must be a multiple of 16 (try 32)"),
    (dict(latents=np.zeros((2, 63, 16), np.float32)), "latents must have shape (2, 64, 16)"),
    (dict(n=3, latents=np.zeros((2, 64, 16), np.float32)), "latents must have shape (3, 64, 16)"),
    (dict(output_type="jpg"), "output_type must be 'pil' or 'np'"),
    (dict(steps=0), "steps must be 1 to 1000, not 0"),
    (dict(true_cfg=0.5), "true_cfg must be 1"),
])
def test_bad_generate_arguments(kwargs, words, schnell, monkeypatch):
    """Each bad argument gives one ValueError that names it, raised before any text encoding, sampling
    or decoding starts (those are replaced by functions that fail the test)."""
    for name in ("encode", "sample", "decode"):
        monkeypatch.setattr(schnell, name, lambda *a, **k: pytest.fail("work started before checking"))
    args = dict(prompt=PROMPT, n=2, steps=2, output_type="np")
    args.update(kwargs)
    with pytest.raises(ValueError) as e:
        schnell.generate(args.pop("prompt"), **args)
    assert words in str(e.value)


def test_single_image_and_pil(schnell):
    """n=1 without repulsion works; "pil" gives a list of RGB PIL images of the requested size, "np"
    the same pixels as float32 in [0, 1]."""
    r = schnell.generate(PROMPT, n=1, seed=3, output_type="pil")
    assert len(r.images) == 1 and r.images[0].size == (tiny.SIZE, tiny.SIZE) and r.images[0].mode == "RGB"
    assert r.seeds == [3] and r.noise.shape == (1, TOKENS, CHANNELS)
    arr = schnell.generate(PROMPT, n=1, seed=3, output_type="np").images
    assert arr.shape == (1, tiny.SIZE, tiny.SIZE, 3) and 0 <= arr.min() and arr.max() <= 1
    np.testing.assert_array_equal(np.asarray(r.images[0]), (arr[0] * 255).round().astype(np.uint8))


def test_seeds_reproducible_and_per_image(schnell):
    """The same seed gives identical images; in a batch with seed s, image i gets seeds s + i and the
    same initial noise as seed s + i alone, and (without repulsion) the same image within 1e-5."""
    a = schnell.generate(PROMPT, n=3, seed=11, output_type="np")
    b = schnell.generate(PROMPT, n=3, seed=11, output_type="np")
    np.testing.assert_array_equal(a.images, b.images)
    assert a.seeds == [11, 12, 13]
    assert not np.array_equal(a.noise[0], a.noise[1])
    for i in range(3):
        alone = schnell.generate(PROMPT, n=1, seed=11 + i, output_type="np")
        np.testing.assert_array_equal(alone.noise[0], a.noise[i])
        np.testing.assert_allclose(alone.images[0], a.images[i], atol=1e-5)
    assert not np.array_equal(schnell.generate(PROMPT, n=1, seed=12, output_type="np").images[0], a.images[0])


def test_same_images_on_another_thread(schnell):
    """The app runs the engine on a worker thread. MLX's streams belong to the thread that made them,
    and the CPU forward splits a batch over two streams: generating on a fresh thread after the main
    thread has generated works and gives the same images."""
    import threading

    want = schnell.generate(PROMPT, n=3, seed=5, output_type="np").images
    got = {}
    worker = threading.Thread(target=lambda: got.update(
        images=schnell.generate(PROMPT, n=3, seed=5, output_type="np").images))
    worker.start()
    worker.join()
    np.testing.assert_array_equal(got["images"], want)


def test_low_memory_identical_and_frees_encoders(schnell_dir, schnell):
    """`low_memory=True` gives the same images as the default, frees T5 and CLIP once a prompt is
    encoded (text_encoder_2 is None after generate), reloads them for a new prompt, and can save."""
    L = latents()
    low = Pipeline.from_pretrained(str(schnell_dir), low_memory=True)
    for prompt in (PROMPT, "a green triangle"):
        want = schnell.generate(prompt, n=2, latents=L, output_type="np").images
        got = low.generate(prompt, n=2, latents=L, output_type="np").images
        np.testing.assert_array_equal(got, want)
        assert low.text_encoder_2 is None and low.text_encoder is None


def test_diversity_knob_maps_log_scale_onto_the_models_range():
    """Defaults.repulsion, the one mapping from the diversity knob that the CLI, the app and the scripts
    share: scale = lo * (hi / lo) ** D (closed form: D = 0.5 is sqrt(lo * hi)), 3 significant digits,
    with the model's iterations and repelled steps unless overridden."""
    from mlx_crepulse import Defaults, Recipe, Repulsion

    d = Defaults(repulsion_scale_range=(1.25e4, 1e5), repulsion_iterations=7, repulsion_steps=2)
    assert [d.repulsion_scale(x) for x in (0, 0.5, 1, 1.5)] == [1.25e4, 3.54e4, 1e5, 2.83e5]
    assert d.repulsion_scale(0.5) == float(f"{(1.25e4 * 1e5) ** 0.5:.3g}")
    assert d.repulsion(0.5) == Repulsion(scale=3.54e4, iterations=7, repelled_steps=2, blocks="all")
    assert d.repulsion(1, blocks="double", repelled_steps=3) == Repulsion(scale=1e5, iterations=7,
                                                                          repelled_steps=3, blocks="double")
    # a recipe's knob and a Repulsion's unset fields resolve through the same mapping
    assert Recipe("x", n=2, seed=0, diversity=0.5).resolve(d).method == d.repulsion(0.5)
    assert Recipe("x", n=2, seed=0, diversity=1, method=Repulsion(blocks="double", repelled_steps=3)).resolve(d).method \
        == d.repulsion(1, blocks="double", repelled_steps=3)
    assert Recipe("x", n=1, seed=0, diversity=0.5).resolve(d).method is None  # one image: nothing to push apart
