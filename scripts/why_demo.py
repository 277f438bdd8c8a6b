"""Why the demo model's results fall where they do (README, "Results on the demo model").

    python scripts/why_demo.py clean        # is repulsion's cleanliness drop a change of mix or dirtier pictures?
    python scripts/why_demo.py guidance     # where guidance moves the free attributes
    python scripts/why_demo.py named        # can the model draw the rarer kinds cleanly when the caption names them?
    python scripts/why_demo.py variants [--model FOLDER]   # hook variants, paired, on the selection seeds
    python scripts/why_demo.py steps        # how many of the first steps to repel, at which scales
    python scripts/why_demo.py scales [--model FOLDER]     # the shipped settings on another model (training length)
    python scripts/why_demo.py favourites   # a repelled favourite alone, and its variations, with its edits replayed

`clean`, `guidance` and `named` use evaluate.py's seeds (4 batches per caption; `named` 2); `variants`,
`steps` and `scales` use the seeds the defaults were chosen on (800000 on; 2 batches per caption for
`variants`, 4 for the others), so evaluate.py's stay unseen by choices; `favourites` seeds of its own.
"""

import argparse
import collections
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_crepulse import Blend, Pipeline, Repulsion, mix_noise, weights  # noqa: E402
from mlx_crepulse import Defaults  # noqa: E402
from mlx_crepulse.model_folder import ModelFolder  # noqa: E402
from mlx_crepulse.repulsion import ascend  # noqa: E402
from scripts import evaluate, shapes  # noqa: E402

SELECTION_SEED0 = 800_000  # the seeds the demo's defaults were chosen on (evaluate.py's stay unseen)


def readings(pipe, **kw):
    """Oracle readings of every caption's 4 batches, seeded as evaluate.py seeds them."""
    return [r for _, group, _ in evaluate.read_batches(pipe, shapes.prompts(), **kw) for r in group]


def kind(a):
    return a["size"], "centre" if a["position"] == "centre" else "corner"


def clean(pipe):
    """Clean and faithful shares per kind of picture (size, centre or corner), for the base model and
    repulsion at the recommended scale, beside the VAE's own round trip of every rendered combination."""
    combos = shapes.all_attribute_combinations()
    rendered = np.stack([shapes.render(**a) for a in combos]).astype(np.float32) / 127.5 - 1
    decoded = np.clip(np.array(pipe.vae.decode(pipe.vae.encode(mx.array(rendered)))) / 2 + 0.5, 0, 1)
    vae = collections.defaultdict(list)
    for a, im in zip(combos, decoded):
        vae[kind(a)].append(shapes.read(im)["clean"])
    rep = pipe.defaults.repulsion(0.5)
    runs = {"base": readings(pipe), f"repulsion {rep.scale:.3g}": readings(pipe, method=rep)}
    tables = {name: collections.defaultdict(list) for name in runs}
    for name, rs in runs.items():
        for r in rs:
            if r["size"] is not None:
                tables[name][kind(r)].append(r)
    share = lambda rs, key: f"{np.mean([r[key] for r in rs]):6.1%}" if rs else "     -"
    print(f"{'size, position':18s} {'VAE clean':>9s} | " + " | ".join(f"{n}: images  clean faithful" for n in runs))
    for k in sorted(vae, key=lambda k: (list(shapes.SIZES).index(k[0]), k[1])):
        cells = [f"{len(t[k]):6d} {share(t[k], 'clean')} {share(t[k], 'faithful'):>8s}" for t in tables.values()]
        print(f"{k[0] + ', ' + k[1]:18s} {np.mean(vae[k]):9.1%} | " + " | ".join(cells))
    base_name, rep_name = list(runs)
    for name, rs in runs.items():
        print(f"{name}: clean {np.mean([r['clean'] for r in rs]):.1%}, faithful {np.mean([r['faithful'] for r in rs]):.1%}")
    counted = sum(len(v) for v in tables[base_name].values())  # images with an object found
    mix = {k: len(v) / counted for k, v in tables[base_name].items()}
    for key in ("clean", "faithful"):
        at_mix = sum(w * np.mean([r[key] for r in tables[rep_name][k]]) for k, w in mix.items() if tables[rep_name][k])
        print(f"{rep_name} {key} at the base model's mix of kinds: {at_mix:.1%}")


def guidance(pipe):
    """Shares of every free attribute's values: the data's (all of it, and the images whose caption names
    nothing but colour and shape, as the evaluation's prompts), then the model's at true CFG 1 and its default."""
    rows = [("data, all captions", shapes.sample_attributes(0, 20000)),
            ("data, bare captions", shapes.bare_caption_attributes(0, 20000))]
    for cfg in (1.0, pipe.defaults.true_cfg):
        rows.append((f"CFG {cfg:g}", readings(pipe, true_cfg=cfg)))
    for name, rs in rows:
        parts = []
        for a in shapes.FREE_ATTRIBUTES:
            c = collections.Counter(r[a] for r in rs)
            parts.append(", ".join(f"{v} {c[v] / len(rs):.0%}" for v in shapes.DISTRIBUTIONS[a]))
        print(f"{name:19s} " + " | ".join(parts))


class ConditionalOnly(Repulsion):
    """Repulsion on the conditional branch of true CFG only (the unconditional one runs untouched)."""

    def _ascend(self, x, groups):
        b = x.shape[0] // groups
        head = ascend(x[:b][None], self.scale, self.iterations, self.eps)[0]
        return mx.concatenate([head, x[b:]], axis=0)


class BranchesAsOne(Repulsion):
    """Both branches of true CFG pushed by one transform: each sample is its conditional and unconditional
    activations side by side, so the guided difference between the branches is not pushed apart."""

    def _ascend(self, x, groups):
        b = x.shape[0] // groups
        joint = x.reshape(groups, b, -1).transpose(1, 0, 2).reshape(1, b, -1)
        joint = ascend(joint, self.scale, self.iterations, self.eps)
        return joint.reshape(b, groups, -1).transpose(1, 0, 2).reshape(x.shape)


def bundled_defaults() -> Defaults:
    """The bundled demo's defaults (its repulsion settings), to run on any model so that models compare alike."""
    return ModelFolder.open("demo").defaults


def variants(pipe):
    """Hook variants against the base model, paired, on the seeds the defaults were chosen on. The
    bundled demo's repulsion settings whatever the model, so that two models are compared alike."""
    d = bundled_defaults()
    recommended = d.repulsion(0.5)  # --diversity 0.5
    rows = [("base", None)] + [(f"{name} {rep.scale:.3g}", rep) for name, rep in (
        ("all blocks", d.repulsion(0.0)), ("all blocks", recommended),
        ("first step only", d.repulsion(0.5, repelled_steps=1, scale=3.54e4)),  # the previous default
        ("conditional only", ConditionalOnly(**vars(recommended))),
        ("branches as one", BranchesAsOne(**vars(recommended))),
        ("double blocks", d.repulsion(0.5, blocks="double")), ("double blocks", d.repulsion(1.0, blocks="double")))]
    results = [(label, evaluate.evaluate(pipe, shapes.prompts(), m, {}, groups=2, seed0=SELECTION_SEED0))
               for label, m in rows]
    for label, r in results[1:]:
        print(evaluate.comparison(label, r, results[0][1]))


def scales(pipe):
    """The bundled demo's repulsion at --diversity 0, 0.5 and 1 against the model's own base, paired, on the
    selection seeds (4 batches per caption), whatever the model: how a differently trained model (--model
    FOLDER) trades diversity for fidelity and cleanliness under the same settings."""
    d = bundled_defaults()
    base = evaluate.evaluate(pipe, shapes.prompts(), None, {}, groups=4, seed0=SELECTION_SEED0)
    print(f"base: Vendi free {base['vendi_free']:.3f}, fidelity {base['fidelity']:.1%}, clean {base['clean']:.1%}")
    for diversity in (0.0, 0.5, 1.0):
        rep = d.repulsion(diversity)
        r = evaluate.evaluate(pipe, shapes.prompts(), rep, {}, groups=4, seed0=SELECTION_SEED0)
        print(evaluate.comparison(f"repulsion {rep.scale:.3g}", r, base))


def steps(pipe):
    """Repelled steps and scales against the base model, paired, on the selection seeds (4 batches per
    caption): the sweep the demo's repulsion_steps and scale range were chosen from."""
    base = evaluate.evaluate(pipe, shapes.prompts(), None, {}, groups=4, seed0=SELECTION_SEED0)
    for tau, scale in ((1, 2.5e4), (1, 3.54e4), (2, 8e3), (3, 3.5e3), (3, 7e3), (3, 1.4e4), (4, 6e3), (6, 4.5e3)):
        rep = pipe.defaults.repulsion(0.5, steps=tau, scale=scale)
        r = evaluate.evaluate(pipe, shapes.prompts(), rep, {}, groups=4, seed0=SELECTION_SEED0)
        print(evaluate.comparison(f"first {tau} repelled {scale:.3g}", r, base))


def named(pipe):
    """Clean share at the default guidance for the bare captions and for captions that name a large size,
    a corner, or both: whether the rarer kinds are beyond the model or only beyond its bare captions."""
    for extra in ({}, {"size": "large"}, {"position": "top-left"}, {"size": "large", "position": "top-left"}):
        prompts = [shapes.caption(c, s, **extra) for c in shapes.COLOURS for s in shapes.SHAPES]
        rs = [r for _, group, _ in evaluate.read_batches(pipe, prompts, groups=2) for r in group]
        as_named = np.mean([all(r[k] == v for k, v in extra.items()) for r in rs])
        label = shapes.caption("<colour>", "<shape>", **extra)
        print(f"{label:42s} clean {np.mean([r['clean'] for r in rs]):6.1%}  faithful "
              f"{np.mean([r['faithful'] for r in rs]):6.1%}  as named {as_named:6.1%}  ({len(rs)} images)")


FAVOURITE_SEED0 = 600_000  # seeds no other question uses


def favourites(pipe):
    """Favourites from repelled batches (every caption, 2 batches of 4 at --diversity 0.5): how many come
    back as another picture when regenerated alone from their noise (what blending and varying did before
    recording), and how often the app's variations (3 each: subtle mixes in 0.3 new noise, strong 0.65 and
    repels at 0.5) keep the favourite's free attributes, with and without its recorded edits replayed."""
    rep = pipe.defaults.repulsion(0.5)
    stats = collections.defaultdict(list)
    for k, prompt in enumerate(shapes.prompts()):
        for g in range(2):
            seed = FAVOURITE_SEED0 + 8 * (2 * k + g)
            batch = pipe.generate(prompt, n=4, seed=seed, method=rep, output_type="np")
            recordings = pipe.record(prompt, [0, 1, 2, 3], record_steps=0, n=4, seed=seed, method=rep)
            for i, rec in enumerate(recordings):
                fav = shapes.free_attributes(shapes.read(batch.images[i]))
                alone = pipe.generate(prompt, n=1, latents=batch.noise[i:i + 1], output_type="np").images[0]
                moved = shapes.free_attributes(shapes.read(alone)) != fav
                stats["moved"].append(moved)
                new = pipe.noise([seed + 100 + j for j in range(3)])
                # desktop/refine.py's SUBTLE and STRONG (the scripts do not import the app)
                for name, mix, diversity in (("subtle", 0.3, 0.0), ("strong", 0.65, 0.5)):
                    latents = np.stack([mix_noise(batch.noise[i], new[j], mix) for j in range(3)])
                    for how, blend in (("alone", None), ("edits replayed", Blend([0.0], blended_steps=0, sources=(rec, rec)))):
                        out = pipe.generate(prompt, n=3, latents=latents, method=pipe.defaults.repulsion(diversity),
                                            blend=blend, output_type="np").images
                        reads = [shapes.read(o) for o in out]
                        keep = np.mean([shapes.free_attributes(r) == fav for r in reads])
                        stats[(moved, name, how)].append((keep, np.mean([r["clean"] for r in reads])))
    moved = stats.pop("moved")
    print(f"{sum(moved)} of {len(moved)} favourites are another picture regenerated alone ({np.mean(moved):.1%})")
    for (was_moved, name, how), v in sorted(stats.items()):
        keep, clean = np.mean(v, axis=0)
        print(f"{'moved' if was_moved else 'kept':5s} {name:6s} {how:14s} variations keep its free attributes "
              f"{keep:6.1%}, clean {clean:6.1%}  ({len(v)} favourites)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    questions = {"clean": clean, "guidance": guidance, "named": named, "variants": variants, "steps": steps,
                 "scales": scales, "favourites": favourites}
    p.add_argument("question", choices=list(questions))
    p.add_argument("--model", default="demo")
    args = p.parse_args()
    questions[args.question](Pipeline.from_pretrained(args.model))


if __name__ == "__main__":
    main()
