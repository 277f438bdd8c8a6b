"""The paper's table in miniature, on the bundled demo model.

    python scripts/evaluate.py                     # every prompt of the grammar, 4 groups of 4 images each
    python scripts/evaluate.py --groups 1 --prompts 4 --plot out.png

For each method (the base model, contextual repulsion at several scales, particle guidance, CADS and
image-token repulsion, all at the model's default guidance) it generates `--groups` batches of 4 images
for every caption of the shapes grammar, each batch from its own seeds (none that a test uses; every
method gets the same seeds), and reads them back with the oracle (scripts/shapes.py):
- Vendi (free): Vendi score of the free attributes (position, size, background) within each batch of
  4, averaged over batches: how varied the batch is in what the prompt leaves open;
- Vendi (pixels): the same on raw pixels (in [-1, 1]);
- fidelity: the share of images whose colour and shape are the prompt's;
- clean: the share the oracle calls clean (one crisp object on a flat background);
- s/batch: seconds per batch of 4.
Then each method against the base model, with the standard error of the difference: batches are
paired (same seeds), so the error is that of the mean per-batch difference. It is large: the noise
fixes most of a 32x32 picture's layout, so one batch of 4 is one draw, and 24 batches (one per
caption) leave a Vendi change with a standard error of about 5 percentage points and a fidelity change
with one of about 4 points; the default 96 batches halve that (measured: 2.4-3.2% and 1.7-2.2 points).
It prints the tables and saves a plot of diversity against fidelity, one curve per method.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_crepulse import CADS, ParticleGuidance, Pipeline, vendi_score  # noqa: E402
from scripts import shapes  # noqa: E402

SEED0 = 900_000  # far from every seed the tests use


def batch_seed(group: int, caption: int, captions: int, base: int = SEED0) -> int:
    """First seed of a caption's batch: every batch its own 4 seeds; group 0 is base + 4 * caption."""
    return base + 4 * (group * captions + caption)


def methods(pipe, quick=False):
    """(family, label, method or None, extra generate() arguments) for every row of the table."""
    d = pipe.defaults
    # the diversity knob at 0, 0.5 (recommended) and 1, and half as far again past the range (1.5)
    contextual = [d.repulsion(x) for x in ((0.0, 0.5, 1.0) if quick else (0.0, 0.5, 1.0, 1.5))]
    rows = [("base", "base", None, {}), ("guidance 1", "base, guidance 1", None, {"true_cfg": 1.0})]
    for rep in contextual:
        rows.append(("contextual", f"contextual {rep.scale:.3g}", rep, {}))
    for s in ([0.1, 0.3, 1.0] if quick else [0.1, 0.3, 1.0, 3.0]):
        rows.append(("particle", f"particle {s:g}", ParticleGuidance(scale=float(s)), {}))
    for s in ([0.25, 0.5, 1.0] if quick else [0.1, 0.25, 0.5, 1.0]):
        rows.append(("cads", f"CADS {s:g}", CADS(noise_scale=s), {}))
    image_tokens = d.repulsion(0.5, blocks="double", tokens="image")
    rows.append(("image tokens", f"image tokens {image_tokens.scale:.3g}", image_tokens, {}))
    return rows


def read_batches(pipe, prompts, groups=4, seed0=SEED0, **kw):
    """Yield (images, oracle readings with "faithful" set, seconds) for every caption's `groups` batches
    of 4; `kw` goes to generate()."""
    for g in range(groups):
        for k, prompt in enumerate(prompts):
            t = time.perf_counter()
            images = pipe.generate(prompt, n=4, seed=batch_seed(g, k, len(prompts), seed0), output_type="np",
                                   **kw).images
            seconds = time.perf_counter() - t
            colour, shape = shapes.parse_caption(prompt)
            group = [shapes.read(img) for img in images]
            for r in group:
                r["faithful"] = r["colour"] == colour and r["shape"] == shape
            yield images, group, seconds


def evaluate(pipe, prompts, method, extra, groups=4, seed0=SEED0):
    """Summary of one method plus its per-batch values (for the paired comparisons)."""
    batch = {"vendi_free": [], "fidelity": [], "clean": []}
    readings, vendi_px, seconds = [], [], []
    for images, group, s in read_batches(pipe, prompts, groups, seed0, method=method, **extra):
        seconds.append(s)
        readings += group
        batch["vendi_free"].append(vendi_score([shapes.free_attributes(r) for r in group]))
        batch["fidelity"].append(np.mean([r["faithful"] for r in group]))
        batch["clean"].append(np.mean([r["clean"] for r in group]))
        vendi_px.append(vendi_score(images.reshape(4, -1) * 2 - 1))
    return dict(vendi_free=float(np.mean(batch["vendi_free"])), vendi_pixels=float(np.mean(vendi_px)),
                fidelity=float(np.mean(batch["fidelity"])), clean=float(np.mean(batch["clean"])),
                typical=float(np.mean([all(r.get(a) == v for a, v in shapes.TYPICAL.items()) for r in readings])),
                seconds=float(np.median(seconds)), batches={k: np.array(v) for k, v in batch.items()})


def paired(r, ref, key):
    """Mean per-batch difference r - ref of `key` and its standard error (batches share seeds)."""
    d = r["batches"][key] - ref["batches"][key]
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")


def comparison(label, r, ref):
    """One line: Vendi change in % of the reference, fidelity and cleanliness changes in points, +- 1 s.e."""
    dv, sv = paired(r, ref, "vendi_free")
    df, sf = paired(r, ref, "fidelity")
    dc, sc = paired(r, ref, "clean")
    v0 = ref["vendi_free"]
    return (f"{label:26s} {100 * dv / v0:+6.1f}% +- {100 * sv / v0:4.1f}  {100 * df:+6.1f} +- {100 * sf:4.1f}  "
            f"{100 * dc:+6.1f} +- {100 * sc:4.1f}")


def plot(results, path):
    """Diversity (free-attribute Vendi) against fidelity, one polyline per method family."""
    W, H, m = 720, 480, 60
    img = Image.new("RGB", (W, H), "white")
    g = ImageDraw.Draw(img)
    xs = [r["vendi_free"] for _, _, r in results]
    ys = [r["fidelity"] for _, _, r in results]
    x0, x1 = min(xs) - 0.05, max(xs) + 0.05
    y0, y1 = max(0.0, min(ys) - 0.05), min(1.0, max(ys) + 0.02)
    px = lambda x: m + (x - x0) / (x1 - x0) * (W - 2 * m)
    py = lambda y: H - m - (y - y0) / (y1 - y0) * (H - 2 * m)
    g.rectangle([m, m, W - m, H - m], outline="black")
    for i in range(5):
        x, y = x0 + i * (x1 - x0) / 4, y0 + i * (y1 - y0) / 4
        g.text((px(x) - 12, H - m + 6), f"{x:.2f}", fill="black")
        g.text((8, py(y) - 6), f"{y:.0%}", fill="black")
    g.text((W // 2 - 120, H - 24), "diversity: Vendi of the free attributes", fill="black")
    g.text((8, 12), "fidelity (colour and shape right)", fill="black")
    colours = {"base": "black", "guidance 1": "gray", "contextual": "red", "particle": "blue", "cads": "green",
               "image tokens": "orange"}
    families = []
    for fam, _, _ in results:
        if fam not in families:
            families.append(fam)
    for j, fam in enumerate(families):
        pts = [(px(r["vendi_free"]), py(r["fidelity"])) for f, _, r in results if f == fam]
        if len(pts) > 1:
            g.line(pts, fill=colours[fam], width=2)
        for x, y in pts:
            g.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colours[fam])
        g.text((W - m - 150, m + 8 + 16 * j), f"-- {fam}", fill=colours[fam])
    img.save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--prompts", type=int, default=None, help="only the first N captions (default: all 24)")
    parser.add_argument("--groups", type=int, default=4, help="batches of 4 per caption, each from its own seeds")
    parser.add_argument("--quick", action="store_true", help="fewer scales per method")
    parser.add_argument("--plot", default="docs/diversity-vs-fidelity.png")
    args = parser.parse_args()

    pipe = Pipeline.from_pretrained(args.model)
    prompts = shapes.prompts()[:args.prompts]
    d = pipe.defaults
    print(f"model {args.model}: {len(prompts)} prompts x {args.groups} batches of 4 images, {d.steps} steps, "
          f"true CFG {d.true_cfg}, seeds from {SEED0}")
    header = f"{'method':26s} {'Vendi free':>10s} {'Vendi px':>9s} {'fidelity':>9s} {'clean':>6s} {'typical':>8s} {'s/batch':>8s}"
    print(header)
    results = []
    for fam, label, method, extra in methods(pipe, args.quick):
        r = evaluate(pipe, prompts, method, extra, args.groups)
        results.append((fam, label, r))
        print(f"{label:26s} {r['vendi_free']:10.3f} {r['vendi_pixels']:9.3f} {r['fidelity']:9.1%} "
              f"{r['clean']:6.1%} {r['typical']:8.1%} {r['seconds']:8.2f}", flush=True)
    base = results[0][2]
    print(f"\n{'against the base model':26s} {'Vendi free':>14s}  {'fidelity, pts':>14s}  {'clean, pts':>14s}")
    for _, label, r in results[1:]:
        print(comparison(label, r, base))
    unguided = next(r for fam, _, r in results if fam == "guidance 1")
    print(comparison("base against guidance 1", base, unguided))
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
        plot([x for x in results if x[0] != "guidance 1"] + [x for x in results if x[0] == "guidance 1"], args.plot)
        print(f"plot: {args.plot}")
    return results


if __name__ == "__main__":
    main()
