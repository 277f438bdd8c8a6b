"""Measure the demo model with the shapes oracle: prompt fidelity, cleanliness and free-attribute diversity.

    python -m scripts.eval_demo [FOLDER] [--groups 4] [--out build/demo_train/eval.json]

For each setting, every caption of the grammar (24) is generated in `--groups` groups of 4 images,
each group from its own 4 seeds (group g of caption k starts at base + 4 (24 g + k); the base, 1000, is
not the training seed). Groups must not share seeds across captions: the noise fixes most of the layout
whatever the caption, so shared seeds make 24 captions one correlated draw. Each image is read by `scripts/shapes.read`:
- fidelity: share of images whose colour and shape are the caption's;
- clean: share of images the oracle calls clean (one crisp object on a flat background);
- vendi: the Vendi score of each group's free-attribute one-hot vectors (position, size,
  background; `shapes.free_attributes`), averaged over groups (1 = four identical pictures, 4 at most);
- typical: share of images in the typical mode on all three free attributes (centre, medium, white).

The main run sweeps guidance (true CFG), then contextual repulsion scales at the default guidance, and
writes everything to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mlx_crepulse import Pipeline, Repulsion, vendi_score  # noqa: E402
from scripts import shapes  # noqa: E402

EVAL_SEED = 1000


def readings(pipe, prompts, groups: int, n: int = 4, base: int = EVAL_SEED, **kw) -> list:
    """[(caption, [oracle readings of its n images])] for every caption and group."""
    out = []
    for k, prompt in enumerate(prompts):
        for g in range(groups):
            seed = base + n * (g * len(prompts) + k)
            images = pipe.generate(prompt, n=n, seed=seed, output_type="np", **kw).images
            out.append((prompt, [shapes.read(im) for im in images]))
    return out


def score(groups: list) -> dict:
    fid = clean = typical = total = 0
    vendis = []
    for prompt, rs in groups:
        colour, shape = shapes.parse_caption(prompt)
        for r in rs:
            fid += r["colour"] == colour and r["shape"] == shape
            clean += bool(r["clean"])
            typical += all(r[k] == shapes.TYPICAL[k] for k in shapes.FREE_ATTRIBUTES)
            total += 1
        vendis.append(vendi_score([shapes.free_attributes(r) for r in rs]))
    return {"fidelity": fid / total, "clean": clean / total, "vendi": float(np.mean(vendis)),
            "typical": typical / total, "images": total}


def measure(pipe, prompts=None, groups: int = 4, **kw) -> dict:
    t = time.time()
    r = score(readings(pipe, prompts or shapes.prompts(), groups, **kw))
    r["seconds"] = round(time.time() - t, 1)
    return r


def data_vendi(groups: int = 4000, n: int = 4, seed: int = 0) -> dict:
    """The grammar's own statistics for groups of n drawn from the training distribution."""
    out = {}
    for name, attrs in (("all captions", shapes.sample_attributes(seed, groups * n)),
                        ("bare captions", shapes.bare_caption_attributes(seed, 2 * groups * n)[:groups * n])):
        v = [vendi_score([shapes.free_attributes(a) for a in attrs[i * n:(i + 1) * n]]) for i in range(groups)]
        typical = np.mean([all(a[k] == shapes.TYPICAL[k] for k in shapes.FREE_ATTRIBUTES) for a in attrs])
        out[name] = {"vendi": float(np.mean(v)), "typical": float(typical)}
    return out


def quick(folder, guidances=(1.0, 4.0), steps: int = 12) -> dict:
    """One group of 4 per caption at a few guidances: a progress check during training."""
    pipe = Pipeline.from_pretrained(str(folder))
    out = {}
    for g in guidances:
        r = measure(pipe, groups=1, steps=steps, true_cfg=g, negative_prompt="", width=32, height=32)
        out[f"cfg{g:g}"] = {k: round(v, 3) for k, v in r.items() if k != "images"}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default="demo")
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidances", default="1,2,3,4,5,6")
    p.add_argument("--guidance", type=float, default=None, help="guidance of the repulsion sweep (default: the model's)")
    p.add_argument("--scales", default="", help="repulsion scales, comma-separated")
    p.add_argument("--repulsion-steps", default="1", help="comma-separated")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--blocks", default="all")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    pipe = Pipeline.from_pretrained(args.folder)
    d = pipe.defaults
    steps = args.steps or d.steps
    results = {"folder": str(args.folder), "steps": steps, "groups": args.groups, "data": data_vendi(),
               "guidance": {}, "repulsion": {}}
    print(f"data distribution: {results['data']}", flush=True)
    for g in [float(x) for x in args.guidances.split(",") if x]:
        r = measure(pipe, groups=args.groups, steps=steps, true_cfg=g)
        results["guidance"][f"{g:g}"] = r
        print(f"cfg {g:g}: {json.dumps(r)}", flush=True)
    cfg = args.guidance if args.guidance is not None else d.true_cfg
    blocks = args.blocks if args.blocks in ("all", "double", "single") else [int(b) for b in args.blocks.split(",")]
    for rs in [int(x) for x in args.repulsion_steps.split(",") if x]:
        for s in [float(x) for x in args.scales.split(",") if x]:
            rep = Repulsion(scale=s, iterations=args.iterations, repelled_steps=rs, blocks=blocks)
            r = measure(pipe, groups=args.groups, steps=steps, true_cfg=cfg, method=rep)
            results["repulsion"][f"cfg{cfg:g}/steps{rs}/scale{s:g}"] = r
            print(f"cfg {cfg:g} repulsion steps {rs} scale {s:g}: {json.dumps(r)}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
