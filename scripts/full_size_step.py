"""One measured step on a full-size checkpoint, run in its own process by scripts/measure_full_size.sh.

    python scripts/full_size_step.py load FOLDER [-q 4|8] [--low-memory]   load, print the weights' bytes
    python scripts/full_size_step.py save FOLDER OUT -q 4                   load quantized, save, fingerprint
    python scripts/full_size_step.py verify OUT                             reload; fingerprints identical?
    python scripts/full_size_step.py block FOLDER --tokens 1 4 16 --text 4  one double + one single block
    python scripts/full_size_step.py forward FOLDER --image 64 --text 16    all 19 + 38 blocks, one step
    python scripts/full_size_step.py forward FOLDER -q 4 --batch 2 --repulsion   ... repelled, quantizing

Each prints one JSON line (seconds inside the process, bytes of the weights as loaded); the shell script
adds wall time and peak resident memory from /usr/bin/time -v.
"""

import argparse
import hashlib
import json
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from mlx_crepulse import Pipeline, Repulsion, sampling, weights
from mlx_crepulse.models.flux import FluxTransformer

FINGERPRINTS = "fingerprints.json"


def model_bytes(pipe) -> dict:
    parts = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder,
             "text_encoder_2": pipe.text_encoder_2, "vae": pipe.vae}
    return {k: sum(v.nbytes for _, v in tree_flatten(m.parameters())) for k, m in parts.items()}


def fingerprints(pipe) -> dict:
    """blake2b of every array's bytes, per component and name (one array at a time)."""
    out = {}
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        for key, v in tree_flatten(getattr(pipe, name).parameters()):
            raw = v.view(mx.uint16) if v.dtype == mx.bfloat16 else v
            out[f"{name}/{key}"] = f"{v.dtype}{tuple(v.shape)}:" + hashlib.blake2b(np.array(raw).tobytes(),
                                                                                  digest_size=16).hexdigest()
    return out


def load(args):
    t = time.perf_counter()
    pipe = Pipeline.from_pretrained(args.folder, quantize=args.quantize, low_memory=args.low_memory)
    seconds = time.perf_counter() - t
    return dict(load_s=seconds, weights_bytes=model_bytes(pipe)), pipe


def save(args):
    result, pipe = load(args)
    t = time.perf_counter()
    pipe.save(args.out)
    result["save_s"] = time.perf_counter() - t
    (Path(args.out) / FINGERPRINTS).write_text(json.dumps(fingerprints(pipe)))
    return result


def verify(args):
    args.folder, args.quantize, args.low_memory = args.out, None, False
    result, pipe = load(args)
    want = json.loads((Path(args.out) / FINGERPRINTS).read_text())
    got = fingerprints(pipe)
    result.update(arrays=len(got), identical=got == want,
                  differing=sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))[:5])
    return result


def transformer(folder: Path, depth=None, quantize=None):
    """The transformer of a folder, as from_pretrained loads it (quantized if the folder is, or to
    `quantize` bits while loading); `depth` (double, single) keeps only that many blocks, loading only
    their weights."""
    config = weights.read_json(folder / "transformer" / "config.json")
    if depth:
        config = dict(config, num_layers=depth[0], num_single_layers=depth[1])
    model = FluxTransformer(config)
    files = weights.weight_files(folder / "transformer")
    if depth:  # only the tensors of the kept blocks: a filtered copy of the weight files' views
        model = _load_subset(model, files, config)
    else:
        saved = config.get("quantization")
        weights.load_into(model, folder / "transformer", None, None if saved else quantize, saved)
    return model


def _load_subset(model, files, config):
    import mlx.nn as nn
    q = config.get("quantization")
    if q:
        nn.quantize(model, q["group_size"], q["bits"], class_predicate=weights.quantize_predicate(q["group_size"]))
    want = dict(tree_flatten(model.parameters()))
    for f in files:
        model.load_weights([(k, v) for k, v in weights.read_safetensors(f).items() if k in want], strict=False)
    mx.eval(model.parameters())
    return model


def run_forward(model, image_px: int, text_tokens: int, batch: int = 1, repel: bool = False):
    """One velocity evaluation at image_px x image_px with text_tokens T5 states (one prompt), a batch of
    `batch` noises; with `repel`, Repulsion's own hook (50 iterations, every block) acts in the forward,
    else an identity hook (the same path through every block)."""
    side = image_px // 16
    c = model.config
    rng = np.random.default_rng(0)
    normal = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.bfloat16)
    img = normal(batch, side * side, c["in_channels"])
    txt = mx.broadcast_to(normal(1, text_tokens, c["joint_attention_dim"]), (batch, text_tokens, c["joint_attention_dim"]))
    pooled = mx.broadcast_to(normal(1, c["pooled_projection_dim"]), (batch, c["pooled_projection_dim"]))
    pe = model.pos_embed(mx.zeros((text_tokens, 3)), sampling.image_ids(side, side))
    guidance = mx.full((batch,), 3.5) if model.config.get("guidance_embeds") else None
    calls, moved = [], []
    inner = None
    if repel:
        rep = Repulsion(scale=1e8, iterations=50, repelled_steps=1, blocks="all")
        rep.check(batch)
        inner = rep.hook(0, 1, len(model.transformer_blocks) // 2)

    def hook(kind, index, t, i):  # through every block; with repulsion, how far it moved the text tokens
        calls.append((kind, index))
        if inner is None:
            return t, i
        new_t, new_i = inner(kind, index, t, i)
        if kind == "double":
            moved.append(float(mx.linalg.norm((new_t - t).astype(mx.float32)) /
                               mx.linalg.norm(t.astype(mx.float32))))
        return new_t, new_i
    t = time.perf_counter()
    vec = model.conditioning(mx.full((batch,), 1.0), pooled, guidance)
    out = model(img, txt, vec, pe, hook)
    mx.eval(out)
    seconds = time.perf_counter() - t
    a = np.array(out.astype(mx.float32))
    return dict(forward_s=seconds, image_tokens=side * side, text_tokens=text_tokens, shape=list(a.shape),
                finite=bool(np.isfinite(a).all()), std=float(a.std()),
                hooked_double=sum(k == "double" for k, _ in calls), hooked_single=sum(k == "single" for k, _ in calls),
                peak_mlx_bytes=mx.get_peak_memory(), batch=batch, repulsion=repel,
                text_moved_per_double_block=[round(m, 6) for m in moved])


def block(args):
    model = transformer(Path(args.folder), depth=(1, 1))
    size = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return dict(weights_bytes={"transformer": size},
                runs=[run_forward(model, 16 * int(round(n ** 0.5)), args.text) for n in args.tokens])


def forward(args):
    t = time.perf_counter()
    model = transformer(Path(args.folder), quantize=args.quantize)
    loaded = time.perf_counter() - t
    size = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    return dict(load_s=loaded, weights_bytes={"transformer": size}, **run_forward(model, args.image, args.text, args.batch, args.repulsion))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("load", "save", "verify", "block", "forward"))
    p.add_argument("folder")
    p.add_argument("out", nargs="?")
    p.add_argument("-q", "--quantize", type=int, choices=(4, 8))
    p.add_argument("--low-memory", action="store_true")
    p.add_argument("--tokens", type=int, nargs="+", default=[4, 16])
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--text", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repulsion", action="store_true", help="forward: Repulsion's hook (needs --batch 2 or more)")
    args = p.parse_args()
    if args.step == "verify":
        args.out = args.folder
    result = {"load": lambda a: load(a)[0], "save": save, "verify": verify, "block": block, "forward": forward}[args.step](args)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
