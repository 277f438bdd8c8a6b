"""The quick preview (preview.py): a least-squares latent-to-RGB map fitted on the pipeline's own decodes."""

import numpy as np
import pytest

from mlx_crepulse import Pipeline
from mlx_crepulse.preview import LatentRGB


def affine_pairs(rng, n=3, h=6, w=5, c=4, scale=2):
    """Latents and images whose every patch has exactly the mean colour z @ W + b (with detail inside
    each patch that averages out), so the map to find is known."""
    weight, bias = rng.normal(size=(c, 3)) * 0.1, np.array([0.4, 0.5, 0.6])
    z = rng.normal(size=(n, h, w, c))
    mean = z @ weight + bias
    img = np.repeat(np.repeat(mean, scale, axis=1), scale, axis=2)
    detail = rng.normal(size=(n, h, scale, w, scale, 3)) * 0.05
    detail -= detail.mean(axis=(2, 4), keepdims=True)  # zero mean within each patch
    return z, img + detail.reshape(img.shape), mean, weight, bias


def test_fit_recovers_a_known_affine_map_from_patch_means():
    """Closed form: when each patch's mean colour is affine in its latent pixel, least squares finds that
    map (up to the small ridge), whatever detail the patch holds around its mean."""
    rng = np.random.default_rng(0)
    z, img, mean, weight, bias = affine_pairs(rng)
    fit = LatentRGB(4)
    assert not fit.ready
    fit.add(z, img)
    assert fit.ready and fit.samples == 3 * 6 * 5
    np.testing.assert_allclose(fit.weights[:-1], weight, atol=2e-3)
    np.testing.assert_allclose(fit.weights[-1], bias, atol=2e-3)
    np.testing.assert_allclose(fit(z), np.clip(mean, 0, 1), atol=2e-3)  # previews are clipped to [0, 1]


def test_fit_accumulates_across_calls_like_one_big_fit():
    """The running sums are the normal equations: two halves added one after the other give the map one
    call with all the pairs gives."""
    rng = np.random.default_rng(1)
    z, img = rng.normal(size=(4, 5, 5, 3)), rng.uniform(size=(4, 10, 10, 3))
    whole, parts = LatentRGB(3), LatentRGB(3)
    whole.add(z, img)
    parts.add(z[:2], img[:2])
    parts.add(z[2:], img[2:])
    np.testing.assert_allclose(parts.weights, whole.weights, rtol=1e-10, atol=1e-12)


def test_pairs_that_do_not_match_are_refused():
    fit = LatentRGB(4)
    with pytest.raises(ValueError, match="do not pair up"):
        fit.add(np.zeros((1, 4, 4, 3)), np.zeros((1, 8, 8, 3)))  # 3 channels, not 4
    with pytest.raises(ValueError, match="do not pair up"):
        fit.add(np.zeros((1, 4, 4, 4)), np.zeros((1, 9, 8, 3)))  # 9 rows is no whole multiple of 4
    with pytest.raises(ValueError, match="no images yet"):
        fit(np.zeros((1, 4, 4, 4)))


def test_demo_quick_preview_follows_its_decodes():
    """On the demo model (a trained VAE): before any decode a quick preview falls back to a full decode;
    after some batches it is ready, has the latent image's resolution, and on batches it never saw it is
    far closer to the decoded images' patch colours than the mean colour of what it was fitted on is (it
    carries each picture, not an average). The demo's 4-channel VAE is far from linear; FLUX's VAEs are
    closer, and on the demo the app keeps full previews anyway, as they are cheap (worker.QUICK_WHEN)."""
    pipe = Pipeline.from_pretrained("demo")
    seen = {}

    def first(p):
        seen.setdefault("ready", p.quick_ready)
        seen.setdefault("shape", p.preview(quick=True).shape)
    pipe.generate("a red circle", n=2, seed=0, steps=2, output_type="np", callback=first)
    assert seen == {"ready": False, "shape": (2, 32, 32, 3)}

    def patches(images):
        return images.reshape(len(images), 16, 2, 16, 2, 3).mean(axis=(2, 4))
    fitted = [patches(pipe.generate(prompt, n=4, seed=k, output_type="np").images) for k, prompt in
              enumerate(["a blue square on black", "a large green triangle at top left on grey",
                         "a yellow diamond on pale blue"])]
    average = np.concatenate(fitted).mean(axis=(0, 1, 2))
    map_error = average_error = 0.0
    for k, prompt in enumerate(["a purple circle", "an orange square on black", "a green circle on pale blue"]):
        last = {}

        def final(p):
            if p.step == p.steps:
                last["quick"], last["full"] = p.preview(quick=True), p.preview()
        pipe.generate(prompt, n=4, seed=100 + k, output_type="np", callback=final)
        assert last["quick"].shape == (4, 16, 16, 3) and last["quick"].dtype == np.float32
        truth = patches(last["full"])
        map_error += np.abs(last["quick"] - truth).mean()
        average_error += np.abs(average - truth).mean()
    assert map_error < 0.5 * average_error


def test_flux_quick_preview_maps_sixteen_channels_at_an_eighth(schnell_dir):
    """FLUX.1's layout: 16 latent channels; the quick preview is the image's size over the VAE's scale."""
    pipe = Pipeline.from_pretrained(str(schnell_dir))
    assert pipe.preview_map.channels == pipe.vae.config["latent_channels"]
    shapes = []
    pipe.generate("a red circle", n=2, seed=0, steps=3, width=64, height=64, output_type="np",
                  callback=lambda p: shapes.append((p.quick_ready, p.preview(quick=True).shape)))
    s = 64 // pipe.vae_scale
    assert shapes == [(False, (2, 64, 64, 3)), (True, (2, s, s, 3)), (True, (2, s, s, 3))]
