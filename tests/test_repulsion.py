"""Contextual repulsion: the entropy gradient against torch autograd, the B x B form of the ascent against
the textbook loop, and the whole pipeline against a PyTorch reference hooked into diffusers' Flux blocks."""

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_crepulse import CADS, Blend, Cancelled, ParticleGuidance, Pipeline, Repulsion, vendi_score
from mlx_crepulse import repulsion as rep
from mlx_crepulse.pipeline import Run
from tests import tiny


def torch_entropy(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The paper's H, written the obvious way in torch: cosine kernel / B, eigvalsh, clamp_min(eps)."""
    f = x.reshape(x.shape[0], -1).double()
    f = f / f.norm(dim=1, keepdim=True)
    lam = torch.linalg.eigvalsh(f @ f.T / f.shape[0]).clamp_min(eps)
    return -(lam * lam.log()).sum()


def torch_ascend(x: torch.Tensor, scale: float, iterations: int, eps: float = 1e-6) -> torch.Tensor:
    for _ in range(iterations):
        y = x.detach().double().requires_grad_(True)
        with torch.enable_grad():  # diffusers' pipeline runs under no_grad
            (g,) = torch.autograd.grad(torch_entropy(y, eps), y)
        x = (y + (scale / iterations) * g).detach().to(x.dtype)
    return x


SCALE = 1000.0  # the tiny model's text states are small; this moves its images visibly


def batches():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((1, 12, 16))
    yield "random", rng.standard_normal((4, 12, 16))
    # the real case at the first block: every sample comes from the same prompt, so they nearly agree
    yield "nearly identical", base + 1e-3 * rng.standard_normal((4, 12, 16))


@pytest.mark.parametrize("name,x", list(batches()))
def test_entropy_gradient_matches_torch_autograd(name, x):
    """dH/dx through the custom eigh VJP equals torch autograd through eigvalsh within 1e-5 relative."""
    x = x.astype(np.float32)
    got = np.array(mx.grad(lambda y: rep.entropy(y[None]))(mx.array(x)))
    xt = torch.from_numpy(x).double().requires_grad_(True)
    (want,) = torch.autograd.grad(torch_entropy(xt), xt)
    want = want.numpy()
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want) + 1e-12, (name, np.abs(got - want).max())
    h = float(rep.entropy(mx.array(x)[None]))
    assert abs(h - float(torch_entropy(torch.from_numpy(x)))) < 1e-5


def test_gram_space_ascent_equals_direct_ascent():
    """The ascent run on B x B Gram matrices gives the same activations as the paper's loop on the full
    activations (two groups at once, as with true CFG)."""
    x = mx.array(np.random.default_rng(1).standard_normal((2, 4, 10, 8)).astype(np.float32))
    fast = rep.ascend(x, scale=20.0, iterations=10)
    slow = mx.stack([rep.ascend_direct(x[g][None], 20.0, 10)[0] for g in range(2)])
    assert np.abs(np.array(fast - slow)).max() < 1e-4
    assert np.abs(np.array(fast - x)).max() > 1e-2  # and the update is not nothing


def test_entropy_rises_over_the_iterations():
    """At a small scale each inner iteration is a gradient-ascent step, so H goes up monotonically."""
    x = mx.array(np.random.default_rng(2).standard_normal((1, 4, 12, 16)).astype(np.float32))
    hs = [float(rep.entropy(x))]
    for _ in range(5):
        x = rep.ascend(x, scale=2.0, iterations=1)
        hs.append(float(rep.entropy(x)))
    assert all(b > a for a, b in zip(hs, hs[1:])), hs


def test_vendi_score_closed_forms():
    """Vendi = 1 for identical samples, n for orthogonal ones, and matches exp(H) of the kernel."""
    assert vendi_score(np.ones((5, 3))) == pytest.approx(1.0)
    assert vendi_score(np.eye(4)) == pytest.approx(4.0)
    f = np.random.default_rng(3).standard_normal((6, 9))
    assert vendi_score(f) == pytest.approx(np.exp(float(rep.entropy(mx.array(f[None].astype(np.float32)), eps=0))), rel=1e-4)


# --- the whole pipeline against diffusers with the same update hooked into its blocks -------------------------

def torch_reference(folder, prompt, latents, scale, iterations, steps, blocks, true_cfg=1.0):
    """diffusers' FluxPipeline, with the paper's update applied by forward hooks on its own blocks."""
    pipe = tiny.reference(folder)
    state = {"step": 0}
    handles = []

    def double_hook(module, args, kwargs, output):
        if state["step"] >= steps:
            return output
        enc, hid = output
        return torch_ascend(enc, scale, iterations), hid

    def single_hook(module, args, kwargs, output):
        if state["step"] >= steps:
            return output
        enc, hid = output
        x = torch_ascend(torch.cat([enc, hid], dim=1), scale, iterations)
        return x[:, :enc.shape[1]], x[:, enc.shape[1]:]

    if blocks in ("double", "all"):
        handles += [b.register_forward_hook(double_hook, with_kwargs=True) for b in pipe.transformer.transformer_blocks]
    if blocks in ("single", "all"):
        handles += [b.register_forward_hook(single_hook, with_kwargs=True)
                    for b in pipe.transformer.single_transformer_blocks]

    def on_step_end(p, i, t, kw):
        state["step"] = i + 1
        return kw

    extra = dict(negative_prompt="a blue square", true_cfg_scale=true_cfg) if true_cfg > 1 else {}
    out = pipe(prompt, latents=torch.from_numpy(latents), num_inference_steps=4, height=tiny.SIZE, width=tiny.SIZE,
               max_sequence_length=tiny.SEQ, output_type="np", num_images_per_prompt=len(latents),
               callback_on_step_end=on_step_end, **extra).images
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("blocks,true_cfg", [("double", 1.0), ("all", 1.0), ("double", 3.0), ("all", 3.0)])
def test_pipeline_repulsion_matches_diffusers_with_hooked_update(schnell_dir, blocks, true_cfg):
    """Images with repulsion equal diffusers' images with the same update (torch autograd through eigvalsh)
    hooked into its blocks, within 2e-3; and repulsion really changed them."""
    pipe = Pipeline.from_pretrained(str(schnell_dir))
    latents = np.random.default_rng(4).standard_normal((3, 64, 16)).astype(np.float32)
    r = Repulsion(scale=SCALE, iterations=5, repelled_steps=2, blocks=blocks)
    kw = dict(negative_prompt="a blue square", true_cfg=true_cfg) if true_cfg > 1 else {}
    got = pipe.generate("a red circle", n=3, latents=latents, output_type="np", method=r, steps=4, **kw).images
    plain = pipe.generate("a red circle", n=3, latents=latents, output_type="np", steps=4, **kw).images
    want = torch_reference(schnell_dir, "a red circle", latents, SCALE, 5, 2, blocks, true_cfg)
    assert np.abs(got - want).max() <= 2e-3
    assert np.abs(got - plain).max() > 5e-3


def test_scale_zero_is_plain_generation_to_the_last_bit(dev_dir):
    """scale=0 runs the hook and changes nothing: images equal plain generation bit for bit."""
    pipe = Pipeline.from_pretrained(str(dev_dir))
    plain = pipe.generate("a red circle", n=3, seed=7, output_type="np").images
    zero = pipe.generate("a red circle", n=3, seed=7, output_type="np", method=Repulsion(scale=0.0)).images
    some = pipe.generate("a red circle", n=3, seed=7, output_type="np", method=Repulsion(scale=SCALE, iterations=5)).images
    assert np.array_equal(plain, zero)
    assert np.abs(some - plain).max() > 1e-2


def test_repulsion_raises_contextual_entropy(schnell_dir):
    """Recorded after the middle double block, the batch's signatures are more spread with repulsion."""
    pipe = Pipeline.from_pretrained(str(schnell_dir))
    plain = pipe.generate("a red circle", n=4, seed=1, output_type="np")
    pushed = pipe.generate("a red circle", n=4, seed=1, output_type="np", method=Repulsion(scale=SCALE, iterations=10))
    assert vendi_score(pushed.signatures) > vendi_score(plain.signatures)


@pytest.mark.parametrize("bad,match", [
    (dict(scale=-1.0), "scale"), (dict(iterations=0), "iterations"), (dict(blocks=[0, 9]), "out of range"),
    (dict(blocks="middle"), "blocks"), (dict(tokens="pixels"), "tokens"),
])
def test_bad_settings_fail_before_any_work(schnell_dir, bad, match):
    pipe = Pipeline.from_pretrained(str(schnell_dir))
    calls = []
    with pytest.raises(ValueError, match=match):
        pipe.generate("a red circle", n=2, method=Repulsion(**bad), callback=lambda p: calls.append(p))
    assert not calls


def test_repulsion_needs_two_images_but_plain_n1_works(schnell_dir):
    pipe = Pipeline.from_pretrained(str(schnell_dir))
    with pytest.raises(ValueError, match="at least 2"):
        pipe.generate("a red circle", n=1, method=Repulsion())
    assert len(pipe.generate("a red circle", n=1, seed=0).images) == 1


# --- baselines -------------------------------------------------------------------------------------------------

def test_particle_guidance_raises_pairwise_latent_distance(schnell_dir):
    """Particle guidance (RBF repulsion on latents) makes the final latents of a batch farther apart."""
    pipe = Pipeline.from_pretrained(str(schnell_dir))
    latents = np.random.default_rng(5).standard_normal((4, 64, 16)).astype(np.float32)

    def spread(method):
        recipe = pipe.resolve("a red circle", n=4, seed=0, method=method, max_sequence_length=tiny.SEQ)
        x = mx.array(latents)
        run = Run(recipe, x, x, [1.0, 0.75, 0.5, 0.25, 0.0], *pipe.encode("a red circle", tiny.SEQ), None, 8, 8)
        for _, x, _, _ in pipe.sample(run):
            pass
        f = np.array(x).reshape(4, -1)
        return np.mean([np.linalg.norm(f[i] - f[j]) for i in range(4) for j in range(i + 1, 4)])

    assert spread(ParticleGuidance(scale=0.5)) > spread(None) * 1.05


def test_rbf_repulsion_points_away_from_the_others():
    """The PG direction for each sample has a positive component along (x_i - mean of the others)."""
    x = mx.array(np.random.default_rng(6).standard_normal((4, 20)).astype(np.float32))
    r = np.array(rep.rbf_repulsion(x))
    xs = np.array(x)
    for i in range(4):
        away = xs[i] - np.delete(xs, i, 0).mean(0)
        assert r[i] @ away > 0


def test_cads_anneals_the_condition():
    """CADS: full noise above tau2, none below tau1, the rescaled condition keeps y's mean and std, and
    each image gets its own noise."""
    c = CADS(noise_scale=0.5, tau1=0.6, tau2=0.9, psi=1.0)
    txt = mx.array(np.random.default_rng(7).standard_normal((3, 5, 8)).astype(np.float32))
    pooled = mx.array(np.random.default_rng(8).standard_normal((1, 8)).astype(np.float32))
    assert c.gamma(0.95) == 0 and c.gamma(0.5) == 1 and c.gamma(0.75) == pytest.approx(0.5)
    same = c.condition(0, 0.5, txt, pooled, 3)
    assert same[0] is txt
    noisy_txt, noisy_pooled = c.condition(0, 0.95, txt, pooled, 3)
    a = np.array(noisy_txt)
    assert not np.allclose(a, np.array(txt))
    assert np.allclose(a.reshape(3, -1).mean(1), np.array(txt).reshape(3, -1).mean(1), atol=1e-5)
    assert np.allclose(a.reshape(3, -1).std(1), np.array(txt).reshape(3, -1).std(1), rtol=1e-4)
    assert noisy_pooled.shape == (3, 8) and not np.allclose(np.array(noisy_pooled)[0], np.array(noisy_pooled)[1])


def test_image_token_repulsion_is_another_method(schnell_dir):
    """Repelling image tokens instead of text tokens changes the images, differently from text repulsion."""
    pipe = Pipeline.from_pretrained(str(schnell_dir))
    base = pipe.generate("a red circle", n=3, seed=2, output_type="np").images
    text = pipe.generate("a red circle", n=3, seed=2, output_type="np", method=Repulsion(scale=SCALE, iterations=5, blocks="double")).images
    image = pipe.generate("a red circle", n=3, seed=2, output_type="np",
                          method=Repulsion(scale=SCALE, iterations=5, blocks="double", tokens="image")).images
    assert np.abs(image - base).max() > 1e-3 and np.abs(image - text).max() > 1e-3


# --- exploring beyond what was seen, and blending ----------------------------------------------------------------

def test_reference_set_pushes_a_new_batch_away_from_what_was_seen(schnell_dir):
    """With earlier signatures as a fixed reference set, the new batch's signatures end up less similar
    to them than without. 1,000 signatures take well under a few MB."""
    pipe = Pipeline.from_pretrained(str(schnell_dir))
    seen = pipe.generate("a red circle", n=4, seed=10, output_type="np").signatures
    def nearest(sig):
        a = sig / np.linalg.norm(sig, axis=1, keepdims=True)
        b = seen / np.linalg.norm(seen, axis=1, keepdims=True)
        return (a.astype(np.float32) @ b.astype(np.float32).T).max(1).mean()
    plain = pipe.generate("a red circle", n=4, seed=20, output_type="np").signatures
    away = pipe.generate("a red circle", n=4, seed=20, output_type="np",
                         method=Repulsion(scale=0.0, iterations=10, reference=seen, reference_scale=30.0)).signatures
    assert nearest(away) < nearest(plain)
    assert np.zeros((1000, rep.SIGNATURE_DIM), np.float16).nbytes < 1_000_000
    assert rep.signature(mx.zeros((1, 4, 3072))).shape == (1, rep.SIGNATURE_DIM)


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_blend_of_repelled_images_reproduces_them_and_moves_between(schnell_dir, true_cfg):
    """Two images of a repelled batch, recorded (`Pipeline.record`) and blended: the rows with A's and B's
    noise at weights 0 and 1 are A and B again, exactly (the recorded repulsion edits replayed), where A
    regenerated alone is another picture; weight 0 on A's noise is A; larger weights move farther from A.
    With true CFG both branches are recorded and replayed."""
    pipe = Pipeline.from_pretrained(str(schnell_dir))
    r = Repulsion(scale=SCALE, iterations=5, repelled_steps=2, blocks="all")
    kw = dict(n=4, seed=3, method=r, true_cfg=true_cfg)
    batch = pipe.generate("a red circle", output_type="np", **kw)
    alone = pipe.generate("a red circle", n=1, latents=batch.noise[1:2], output_type="np", true_cfg=true_cfg).images[0]
    assert np.abs(alone - batch.images[1]).max() > 1e-2  # what blending A used to start from
    a, b = pipe.record("a red circle", [1, 3], record_steps=3, **kw)
    assert a.steps == 3 and a.context[(0, 0)].shape[0] == (2 if true_cfg > 1 else 1)
    latents = batch.noise[[1, 3, 1, 1, 1]]
    out = pipe.generate("a red circle", n=5, latents=latents, output_type="np", true_cfg=true_cfg,
                        blend=Blend([0.0, 0.5, 1.5], blended_steps=3, sources=(a, b))).images
    np.testing.assert_allclose(out[0], batch.images[1], atol=1e-5)
    np.testing.assert_allclose(out[1], batch.images[3], atol=1e-5)
    np.testing.assert_allclose(out[2], batch.images[1], atol=1e-5)
    d = [np.abs(out[i] - batch.images[1]).mean() for i in (2, 3, 4)]
    assert d[0] < d[1] < d[2]
    # A's edits alone (steps 0: no context swapped) on A's own noise bring A back as well: the app's variations
    only_edits = pipe.generate("a red circle", n=2, latents=latents[[0, 0]], output_type="np", true_cfg=true_cfg,
                               blend=Blend([], blended_steps=0, sources=(a, a))).images
    np.testing.assert_allclose(only_edits, batch.images[[1, 1]], atol=1e-5)
    # a blend of two blended images: recording the blend batch replays its own blend, so they come back too
    # (recorded over the steps that blend acts in, however few are asked for: the app's variations ask for 0)
    blended = dict(n=5, latents=latents, true_cfg=true_cfg, blend=Blend([0.0, 0.5, 1.5], blended_steps=3, sources=(a, b)))
    c, e = pipe.record("a red circle", [3, 4], record_steps=0, **blended)
    assert c.steps == 3
    again = pipe.generate("a red circle", n=3, latents=latents[[3, 4, 3]], output_type="np", true_cfg=true_cfg,
                          blend=Blend([0.5], blended_steps=3, sources=(c, e))).images
    np.testing.assert_allclose(again[:2], out[3:5], atol=1e-5)


def test_blend_and_record_refuse_what_cannot_be_replayed(schnell_dir):
    pipe = Pipeline.from_pretrained(str(schnell_dir))
    a, b = pipe.record("a red circle", [0, 1], n=2, seed=1)
    noise = pipe.noise([1, 2, 1])
    with pytest.raises(ValueError, match="alphas"):
        Blend([2.0], sources=(a, b)).check(3)
    with pytest.raises(ValueError, match="recordings"):
        pipe.generate("a red circle", n=3, latents=noise, blend=Blend([0.5]))
    with pytest.raises(ValueError, match="prompt was 'a red circle'"):  # contexts of another prompt
        pipe.generate("a blue square", n=3, latents=noise, blend=Blend([0.5], sources=(a, b)))
    with pytest.raises(ValueError, match="3 steps"):
        pipe.generate("a red circle", n=3, latents=noise, blend=Blend([0.5], blended_steps=3, sources=(a, b)))
    with pytest.raises(ValueError, match="ParticleGuidance"):
        pipe.record("a red circle", [0], n=2, method=ParticleGuidance(0.5))
    with pytest.raises(ValueError, match="rows"):
        pipe.record("a red circle", [2], n=2)
    steps = []  # the callback sees each recorded step and can stop the recording, as generate's can
    with pytest.raises(Cancelled):
        pipe.record("a red circle", [0], n=2, record_steps=3, callback=lambda p: steps.append(p.step) or p.step < 2)
    assert steps == [1, 2]
