"""FLUX.2 [klein] against diffusers' `Flux2KleinPipeline`, piece by piece and whole.

The authority is diffusers (and transformers) itself: the tiny pipelines of `tests/tiny_klein.py` are
written by `Flux2KleinPipeline.save_pretrained` and run by it in torch float32 on the CPU; our loader reads
the same folder through `Pipeline.from_pretrained`.
"""

import functools

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps
from transformers import AutoTokenizer, Qwen3ForCausalLM

from mlx_crepulse import Pipeline, klein, weights
from tests import tiny_klein

PROMPT = "a red circle on a blue square"
TOKENS, CHANNELS = 64, 16


@pytest.fixture(scope="module")
def distilled_dir(tmp_path_factory):
    return tiny_klein.build(tmp_path_factory.mktemp("klein"), distilled=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_klein.build(tmp_path_factory.mktemp("klein-base"), distilled=False, seed=1)


@functools.lru_cache(maxsize=None)
def loaded(folder) -> Pipeline:
    return Pipeline.from_pretrained(str(folder))


@functools.lru_cache(maxsize=None)
def reference(folder) -> Flux2KleinPipeline:
    return tiny_klein.reference(folder)


def latents(n=2, seed=0):
    return np.random.default_rng(seed).standard_normal((n, TOKENS, CHANNELS)).astype(np.float32)


def to_torch(L):
    """Our packed tokens (n, rows * cols, 4C) -> diffusers' patchified latents (n, 4C, rows, cols)."""
    n = L.shape[0]
    return torch.from_numpy(L.reshape(n, 8, 8, CHANNELS).transpose(0, 3, 1, 2).copy())


def diffusers_images(folder, L, steps=4, guidance_scale=1.0, **kw):
    return reference(folder)(prompt=PROMPT, latents=to_torch(L), num_inference_steps=steps,
                             guidance_scale=guidance_scale, height=tiny_klein.SIZE, width=tiny_klein.SIZE, max_sequence_length=tiny_klein.SEQ,
                             text_encoder_out_layers=tiny_klein.LAYERS, output_type="np",
                             num_images_per_prompt=L.shape[0], **kw).images


def test_family_is_detected_from_model_index(distilled_dir, base_dir):
    """model_index.json's _class_name picks the family; is_distilled picks the variant's defaults."""
    pipe, base = loaded(distilled_dir), loaded(base_dir)
    assert isinstance(pipe, klein.KleinPipeline) and pipe.distilled and pipe.defaults.true_cfg == 1.0
    assert not base.distilled and base.defaults.true_cfg == 4.0 and base.defaults.steps == 4  # crepulse.json
    assert pipe.latent_channels == CHANNELS and pipe.size_multiple() == 16


@pytest.mark.parametrize("prompt", [PROMPT, "", "a very long prompt " * 10])
def test_text_encoder_matches_diffusers(distilled_dir, prompt):
    """Token ids and mask equal transformers' tokenizer on the chat template (thinking disabled, padded and
    truncated), and the stacked hidden states equal diffusers' _get_qwen3_prompt_embeds within 1e-4."""
    tok = AutoTokenizer.from_pretrained(distilled_dir / "tokenizer")
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=False)
    want = tok(text, padding="max_length", truncation=True, max_length=tiny_klein.SEQ)
    pipe = loaded(distilled_dir)
    ids, mask = pipe.tokenizer.ids(prompt, tiny_klein.SEQ)
    assert ids[0].tolist() == want["input_ids"] and mask[0].tolist() == want["attention_mask"]
    qwen = Qwen3ForCausalLM.from_pretrained(distilled_dir / "text_encoder", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = Flux2KleinPipeline._get_qwen3_prompt_embeds(qwen, tok, prompt, max_sequence_length=tiny_klein.SEQ,
                                                          hidden_states_layers=tiny_klein.LAYERS).numpy()
    txt, pooled = pipe.encode(prompt, tiny_klein.SEQ)
    assert pooled is None and txt.shape == (1, tiny_klein.SEQ, 3 * 32)
    np.testing.assert_allclose(np.array(txt), ref, atol=1e-4, rtol=0)


def test_vae_matches_diffusers(distilled_dir):
    """Decode (BatchNorm denormalisation, 2x2 unpatching, decoder) and encode (mean, patching,
    normalisation) equal diffusers' AutoencoderKLFlux2 as the pipeline drives it, within 1e-4."""
    ref = AutoencoderKLFlux2.from_pretrained(distilled_dir / "vae").eval()
    pipe = loaded(distilled_dir)
    L = latents(1)
    with torch.no_grad():
        t = to_torch(L)
        std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
        z = Flux2KleinPipeline._unpatchify_latents(t * std + ref.bn.running_mean.view(1, -1, 1, 1))
        want = (ref.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(pipe.decode(mx.array(L), 8, 8), want, atol=1e-4, rtol=0)
    image = np.random.default_rng(3).uniform(0, 1, (1, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        mean = ref.encode(torch.from_numpy(image * 2 - 1).permute(0, 3, 1, 2)).latent_dist.mode()
        p = Flux2KleinPipeline._patchify_latents(mean)
        p = (p - ref.bn.running_mean.view(1, -1, 1, 1)) / std
        want = Flux2KleinPipeline._pack_latents(p).numpy()
    np.testing.assert_allclose(np.array(pipe.encode_image(image)), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("config", [dict(use_dynamic_shifting=True, shift=3.0),
                                    dict(use_dynamic_shifting=True, time_shift_type="linear"),
                                    dict(use_dynamic_shifting=False, shift=3.0)])
@pytest.mark.parametrize("steps,tokens", [(4, 64), (4, 4096), (50, 4096), (28, 1024), (4, 5000)])
def test_schedule_equals_diffusers(config, steps, tokens):
    """Our sigmas equal FlowMatchEulerDiscreteScheduler's as Flux2KleinPipeline sets them (empirical mu)."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    retrieve_timesteps(scheduler, steps, sigmas=np.linspace(1.0, 1 / steps, steps),
                       mu=compute_empirical_mu(tokens, steps))
    np.testing.assert_allclose(klein.schedule(steps, tokens, dict(scheduler.config)),
                               scheduler.sigmas.numpy(), atol=1e-6, rtol=0)


def test_unsupported_scheduler_is_one_clear_error():
    with pytest.raises(weights.WeightsError, match="use_karras_sigmas"):
        klein.schedule(4, 64, {"use_karras_sigmas": True})


def test_distilled_images_match_diffusers(distilled_dir):
    """A batch of 2 from the same latents: our images equal Flux2KleinPipeline's within 2e-3."""
    L = latents()
    got = loaded(distilled_dir).generate(PROMPT, n=2, latents=L, output_type="np", steps=4).images
    np.testing.assert_allclose(got, diffusers_images(distilled_dir, L), atol=2e-3, rtol=0)


def test_base_images_match_diffusers_with_true_cfg(base_dir):
    """The base variant runs true CFG against the empty prompt (diffusers' guidance_scale = our true_cfg)."""
    L = latents(seed=1)
    got = loaded(base_dir).generate(PROMPT, n=2, latents=L, output_type="np", steps=4, true_cfg=3.0).images
    want = diffusers_images(base_dir, L, guidance_scale=3.0)
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
    plain = loaded(base_dir).generate(PROMPT, n=2, latents=L, output_type="np", steps=4, true_cfg=1.0).images
    assert np.abs(plain - want).max() > 4e-3  # CFG really acted (twice the tolerance)


def test_missing_component_is_one_clear_error(distilled_dir, tmp_path):
    """A [klein] folder without its text encoder: a WeightsError naming it, before anything is read."""
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(distilled_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(weights.WeightsError, match="missing text_encoder"):
        Pipeline.from_pretrained(str(broken))
    shutil.copytree(distilled_dir / "text_encoder", broken / "text_encoder")
    (broken / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(weights.WeightsError, match="tokenizer"):
        Pipeline.from_pretrained(str(broken))


# --- repulsion through the one hook, against diffusers with the same update hooked into its blocks ----------

def hooked_reference(folder, L, scale, iterations, steps, blocks, guidance_scale):
    """Flux2KleinPipeline with the paper's update applied by forward hooks on its own blocks: the text
    stream after each double block, the joint sequence after each single block (FLUX.2's single blocks
    return it whole). With CFG diffusers runs the two branches as two calls, so each is its own group."""
    from tests.test_repulsion import torch_ascend
    pipe = reference(folder)
    state = {"step": 0}

    def double_hook(module, args, output):
        if state["step"] >= steps:
            return output
        txt, img = output
        return torch_ascend(txt, scale, iterations), img

    def single_hook(module, args, output):
        return output if state["step"] >= steps else torch_ascend(output, scale, iterations)

    tf = pipe.transformer
    handles = []
    if blocks in ("double", "all"):
        handles += [b.register_forward_hook(double_hook) for b in tf.transformer_blocks]
    if blocks in ("single", "all"):
        handles += [b.register_forward_hook(single_hook) for b in tf.single_transformer_blocks]

    def on_step_end(p, i, t, kw):
        state["step"] = i + 1
        return kw
    try:
        return diffusers_images(folder, L, guidance_scale=guidance_scale, callback_on_step_end=on_step_end)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("variant,blocks", [("distilled", "double"), ("distilled", "all"), ("base", "all")])
def test_repulsion_matches_diffusers_with_hooked_update(distilled_dir, base_dir, variant, blocks):
    """Repelled images equal diffusers' with the same update (torch autograd through eigvalsh) hooked into
    its blocks, within 2e-3, for the distilled model and for the base model's two CFG branches as groups;
    and repulsion really changed them."""
    from mlx_crepulse import Repulsion
    folder, cfg = (distilled_dir, 1.0) if variant == "distilled" else (base_dir, 3.0)
    pipe = loaded(folder)
    L = latents(3, seed=4)
    r = Repulsion(scale=SCALE, iterations=5, repelled_steps=2, blocks=blocks)
    got = pipe.generate(PROMPT, n=3, latents=L, output_type="np", method=r, steps=4, true_cfg=cfg).images
    plain = pipe.generate(PROMPT, n=3, latents=L, output_type="np", steps=4, true_cfg=cfg).images
    want = hooked_reference(folder, L, SCALE, 5, 2, blocks, cfg)
    assert np.abs(got - want).max() <= 2e-3
    assert np.abs(got - plain).max() > 5e-3


SCALE = 1e4  # the tiny model's text states are small; this moves its images visibly


# --- quantization, aliases, defaults ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    return tiny_klein.build(tmp_path_factory.mktemp("klein-wide"), distilled=True, seed=2, wide=True)


def test_quantized_transformer_and_text_encoder(wide_dir):
    """quantize=8 and 4 replace the transformer's and Qwen3's Linear layers while loading (the VAE stays);
    8 bits stays near the float32 images (within 0.1), 4 bits well further, both finite."""
    import mlx.nn as nn
    L = latents(2, seed=5)
    full = Pipeline.from_pretrained(str(wide_dir)).generate(PROMPT, n=2, latents=L, output_type="np").images
    err = {}
    for bits in (8, 4):
        pipe = Pipeline.from_pretrained(str(wide_dir), quantize=bits)
        assert pipe.quantize == bits
        for model in (pipe.transformer, pipe.text_encoder):
            assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
        assert not any(isinstance(m, nn.QuantizedLinear) for _, m in pipe.vae.named_modules())
        images = pipe.generate(PROMPT, n=2, latents=L, output_type="np").images
        assert np.isfinite(images).all()
        err[bits] = np.abs(images - full).max()
    print(f"8-bit max abs difference to float32 {err[8]:.2e}; 4-bit {err[4]:.2e}")
    # measured 7.4e-2 and 5.7e-1: this random transformer is scaled up to see the text, which amplifies
    assert 0 < err[8] < 0.1 and 4 * err[8] < err[4]


def test_aliases_and_variant_defaults(distilled_dir, wide_dir):
    """The four aliases name the Hub's [klein] repos; a folder's variant picks its defaults (a folder's
    crepulse.json still wins), 9B's scale range is 4B's times the measured width factor (4096 / 3072)."""
    assert weights.ALIASES["klein"] == "black-forest-labs/FLUX.2-klein-4B"
    assert weights.ALIASES["klein-9b-base"] == "black-forest-labs/FLUX.2-klein-base-9B"
    assert loaded(distilled_dir).variant == "klein"
    d = klein.defaults_for("klein-base", {})
    assert (d.steps, d.true_cfg, d.guidance, d.width, d.max_sequence_length) == (50, 4.0, None, 1024, 512)
    lo4, hi4 = klein.VARIANTS["klein"]["repulsion_scale_range"]
    lo9, hi9 = klein.VARIANTS["klein-9b"]["repulsion_scale_range"]
    assert lo9 / lo4 == pytest.approx(4 / 3, rel=1e-2) and hi9 / hi4 == pytest.approx(4 / 3, rel=1e-2)
    assert klein.variant(False, {"num_attention_heads": 32, "attention_head_dim": 128}) == "klein-9b-base"


# --- the rest of the engine on [klein]: blending, the reference set, the other methods, low memory -----------

def test_blend_of_repelled_klein_images_reproduces_them(base_dir):
    """Blending works on [klein] as on FLUX.1, true CFG included: two recorded images of a repelled batch
    come back exactly at weights 0 and 1 on their own noise, and weight 0.5 lies between."""
    from mlx_crepulse import Blend, Repulsion
    pipe = loaded(base_dir)
    kw = dict(n=3, seed=3, true_cfg=3.0, method=Repulsion(scale=SCALE, iterations=5, repelled_steps=2, blocks="all"))
    batch = pipe.generate(PROMPT, output_type="np", **kw)
    a, b = pipe.record(PROMPT, [0, 2], record_steps=2, **kw)
    out = pipe.generate(PROMPT, n=3, latents=batch.noise[[0, 2, 0]], output_type="np", true_cfg=3.0,
                        blend=Blend([0.5], blended_steps=2, sources=(a, b))).images
    np.testing.assert_allclose(out[0], batch.images[0], atol=1e-5)
    np.testing.assert_allclose(out[1], batch.images[2], atol=1e-5)
    assert np.abs(out[2] - batch.images[0]).max() > 1e-3


def test_reference_set_and_baselines_run_on_klein(distilled_dir):
    """The reference set pushes a new batch's signatures away from seen ones; CADS (no pooled vector on
    FLUX.2), particle guidance and image-token repulsion all run and change the images."""
    from mlx_crepulse import CADS, ParticleGuidance, Repulsion
    pipe = loaded(distilled_dir)
    seen = pipe.generate(PROMPT, n=4, seed=10, output_type="np").signatures

    def nearest(sig):
        a = sig / np.linalg.norm(sig, axis=1, keepdims=True)
        b = seen / np.linalg.norm(seen, axis=1, keepdims=True)
        return (a.astype(np.float32) @ b.astype(np.float32).T).max(1).mean()
    plain = pipe.generate(PROMPT, n=4, seed=20, output_type="np")
    away = pipe.generate(PROMPT, n=4, seed=20, output_type="np",
                         method=Repulsion(scale=0.0, iterations=10, reference=seen, reference_scale=30.0))
    assert nearest(away.signatures) < nearest(plain.signatures)
    for method in (CADS(noise_scale=0.5), ParticleGuidance(0.5), Repulsion(scale=SCALE, iterations=5, tokens="image")):
        images = pipe.generate(PROMPT, n=4, seed=20, output_type="np", method=method).images
        assert np.isfinite(images).all() and np.abs(images - plain.images).max() > 1e-3, type(method).__name__


def test_low_memory_identical_and_frees_the_encoder(distilled_dir):
    """low_memory=True: the same images, Qwen3 freed once the prompt is encoded and read again for a new one."""
    L = latents()
    want = loaded(distilled_dir).generate(PROMPT, n=2, latents=L, output_type="np").images
    low = Pipeline.from_pretrained(str(distilled_dir), low_memory=True)
    np.testing.assert_allclose(low.generate(PROMPT, n=2, latents=L, output_type="np").images, want, atol=1e-6)
    assert low.text_encoder is None
    low.generate("another prompt", n=1, output_type="np")
    assert low.text_encoder is None and low.token_count(PROMPT) > 10


@pytest.mark.parametrize("bits", [None, 8])
def test_saved_pipeline_reloads_identically(wide_dir, tmp_path, bits):
    """`save` writes a folder that loads (with no quantize argument) as the same, quantized or not, model:
    bit-identical images."""
    pipe = Pipeline.from_pretrained(str(wide_dir), quantize=bits)
    L = latents(1, seed=6)
    want = pipe.generate(PROMPT, n=1, latents=L, output_type="np").images
    pipe.save(tmp_path / "saved")
    again = Pipeline.from_pretrained(str(tmp_path / "saved"))
    assert isinstance(again, klein.KleinPipeline) and again.quantize == bits
    np.testing.assert_array_equal(again.generate(PROMPT, n=1, latents=L, output_type="np").images, want)


def test_chat_template_inside_tokenizer_config(distilled_dir, tmp_path):
    """Folders written before transformers 5 keep the template in tokenizer_config.json: read from there,
    the same text and ids as transformers'."""
    import json
    import shutil
    from mlx_crepulse.chat_tokenizer import ChatTokenizer
    folder = tmp_path / "tokenizer"
    shutil.copytree(distilled_dir / "tokenizer", folder)
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, chat_template=template)))
    tok = AutoTokenizer.from_pretrained(folder)
    want = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False)
    ours = ChatTokenizer(folder)
    assert ours.text(PROMPT) == want and "<think>\n\n</think>" in want
    assert ours.ids(PROMPT, 40)[0][0].tolist() == tok(want, padding="max_length", max_length=40)["input_ids"]


def test_bad_hidden_state_layers_are_one_clear_error(distilled_dir, tmp_path):
    """crepulse.json asking for Qwen3 layers the text encoder does not have: a WeightsError naming the
    setting, before any weights are read."""
    import json
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(distilled_dir, broken)
    extra = json.loads((broken / "crepulse.json").read_text())
    (broken / "crepulse.json").write_text(json.dumps(dict(extra, text_encoder_out_layers=[1, 9])))
    with pytest.raises(weights.WeightsError, match="text_encoder_out_layers"):
        Pipeline.from_pretrained(str(broken))


@pytest.mark.parametrize("component,key", [("transformer", "num_layers"), ("text_encoder", "hidden_size"),
                                           ("vae", "block_out_channels")])
def test_config_lacking_a_size_is_one_clear_error(distilled_dir, tmp_path, component, key):
    """A component config without one of its sizes: a WeightsError naming the file and the key, when the
    folder is opened (never a silent default size)."""
    import json
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(distilled_dir, broken)
    path = broken / component / "config.json"
    config = json.loads(path.read_text())
    del config[key]
    path.write_text(json.dumps(config))
    with pytest.raises(weights.WeightsError, match=f"{component}.*{key}"):
        Pipeline.from_pretrained(str(broken))


def test_a_klein_recipe_reruns_exactly(base_dir):
    """A [klein] image's recipe (as PNGs and the history store it) names its model; loading that model and
    running the recipe again gives the same images, the variant's defaults (true CFG, repelled steps,
    the scale from the diversity knob) included."""
    import json
    from mlx_crepulse import Recipe
    first = loaded(base_dir).generate(PROMPT, n=2, seed=5, diversity=0.5, output_type="np")
    stored = json.loads(json.dumps(first.recipe.to_dict()))
    assert stored["model"] == str(base_dir) and stored["true_cfg"] == 4.0 and stored["method"]["repelled_steps"] == 7
    again = Pipeline.from_pretrained(stored["model"]).generate(Recipe.from_dict(stored), output_type="np")
    np.testing.assert_array_equal(again.images, first.images)


def test_cli_makes_and_remakes_a_klein_batch(distilled_dir, tmp_path):
    """The command line on a [klein] folder: a varied batch written with recipes that name the folder,
    and `--from` on one of its images writes the same pixels again (the recipe names the model, so the
    family comes back with it)."""
    import subprocess
    import sys

    from PIL import Image

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "mlx_crepulse", *args, "--quiet"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    made = cli("a red circle", "--model", str(distilled_dir), "-n", "2", "--steps", "2", "--seed", "3", "--no-sheet")
    again = cli("--from", made[1], "-o", "again")
    assert len(made) == 2 and len(again) == 1
    pixels = [np.asarray(Image.open(tmp_path / p)) for p in (made[1], again[0])]
    assert np.array_equal(*pixels)


def klein_lora(folder, out, seed=0, std=0.1):
    """A random LoRA on every Linear of a [klein] transformer, made by peft and saved by diffusers'
    Flux2KleinPipeline.save_lora_weights (the diffusers/PEFT format [klein] LoRAs come in)."""
    from diffusers import Flux2Transformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    tf = Flux2Transformer2DModel.from_pretrained(folder / "transformer")
    targets = [n for n, m in tf.named_modules() if isinstance(m, torch.nn.Linear)]
    tf.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    with torch.no_grad():
        for n, p in tf.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * std)
    Flux2KleinPipeline.save_lora_weights(out.parent, weight_name=out.name,
                                         transformer_lora_layers=get_peft_model_state_dict(tf))
    return out


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_klein_lora_matches_diffusers(distilled_dir, tmp_path, scale):
    """A [klein] LoRA (peft-made, saved by diffusers) at scales 0.5 and 1: our images equal
    Flux2KleinPipeline with load_lora_weights from the same latents within 2e-3, and the LoRA acted."""
    path = klein_lora(distilled_dir, tmp_path / "k.safetensors", seed=3)
    L = latents(seed=4)
    ours = Pipeline.from_pretrained(str(distilled_dir), loras=[(str(path), scale)])
    got = ours.generate(PROMPT, n=2, latents=L, output_type="np", steps=4).images
    ref = tiny_klein.reference(distilled_dir)  # a fresh one: the cached reference stays without the LoRA
    ref.load_lora_weights(str(path), adapter_name="k")
    ref.set_adapters(["k"], [scale])
    want = ref(prompt=PROMPT, latents=to_torch(L), num_inference_steps=4, guidance_scale=1.0, height=tiny_klein.SIZE,
               width=tiny_klein.SIZE, max_sequence_length=tiny_klein.SEQ, text_encoder_out_layers=tiny_klein.LAYERS,
               output_type="np", num_images_per_prompt=2).images
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=0)
    assert np.abs(got - diffusers_images(distilled_dir, L)).max() > 1e-2
