"""Will it fit? The weights' size after quantization, from safetensors headers alone, against this machine's
memory: `Pipeline.from_pretrained` refuses before reading a gigabyte when it would not fit.

The estimate is exact for the weights (the bytes of every array the loaded pipeline holds): a tensor's
bytes are its shape times its dtype's size, except the Linear weights that loading quantizes (in the
transformer and T5, input width a multiple of the group size), which take bits/8 bytes a number plus a
scale and a bias per group of 64 in the weight's dtype. A folder saved already quantized is counted as
written. On top of the weights a generation needs its activations: HEADROOM is one image at 1024 px
(docs/performance.md: the transformer's bf16 activations about 1 GiB, a 256 px VAE tile 1.2 GiB, never at
once); a batch of 4 at 1024 px needs about 3 GiB more, which loading cannot know of. The system keeps
`reserve`.
"""

from pathlib import Path

from . import footprint, weights

GiB = 1 << 30
HEADROOM = 1.5 * GiB  # activations of a generation of one image at 1024 px, above the weights
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
               "I64": 8, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
WEIGHTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
NOT_LINEAR = ("shared", "embed_tokens", "embedding", "relative_attention_bias")  # 2-D tables, never quantized
BUFFERS = ("num_batches_tracked", "position_ids")  # torch buffers in the files that the loaders drop
OPTIONS = [(8, False), (8, True), (4, False), (4, True)]  # least lossy first


class NotEnoughMemory(weights.WeightsError):
    """The pipeline asked for cannot fit in this machine's memory; the message says what would."""


def reserve(total: int) -> int:
    """What the system and other programs keep: 2 GiB, or an eighth of a larger machine (as footprint.py,
    whose physical_memory this module uses too, so one fake memory fools both)."""
    return max(2 * GiB, total // 8)


header = weights.safetensors_header


def tensor_bytes(name: str, dtype: str, shape: list, bits) -> int:
    n = 1
    for s in shape:
        n *= s
    size = DTYPE_BYTES.get(dtype, 4)
    linear = (len(shape) == 2 and name.endswith(".weight") and shape[1] % weights.GROUP_SIZE == 0
              and not any(t in name for t in NOT_LINEAR))
    if bits and linear:  # packed numbers, then one scale and one bias per group, in the weight's dtype
        return n * bits // 8 + 2 * (n // weights.GROUP_SIZE) * size
    return n * size


class Layout:
    """Which components a family's folder has, which of them loading quantizes, and, per component, the
    tensor names its loader keeps (a filter of the header's names)."""

    def __init__(self, components=WEIGHTS, quantized=weights.QUANTIZED, keep=None):
        self.components, self.quantized, self.keep = components, quantized, keep or {}

    @classmethod
    def of(cls, files) -> "Layout":
        """The layout of an opened ModelFolder (FLUX.1, or FLUX.2 [klein] with its one Qwen3 encoder, whose
        loader drops the LM head and the unused layers)."""
        if files.family == "flux1":
            return cls()
        from .klein import QUANTIZED
        from .models import qwen3
        last = max(files.layers)
        return cls(tuple(files.configs), QUANTIZED,
                   {"text_encoder": lambda names: set(qwen3.sanitize(dict.fromkeys(names), last))})


def component_bytes(folder: Path, quantize=None, layout: Layout = Layout()) -> int:
    """Bytes of one component's weights once loaded with `quantize` (bits; ignored for a saved quantized
    folder, as loading ignores it)."""
    config = weights.read_json(folder / "config.json")
    bits = quantize if folder.name in layout.quantized and not config.get("quantization") else None
    table = {name: t for f in weights.weight_files(folder) for name, t in header(f).items()}
    keep = layout.keep.get(folder.name)
    names = [n for n in (keep(table) if keep else table) if not n.endswith(BUFFERS)]
    return sum(tensor_bytes(name, table[name]["dtype"], table[name]["shape"], bits) for name in names)


def estimate(folder: Path, quantize=None, low_memory: bool = False, layout: Layout = Layout()) -> int:
    """Peak bytes of loading and generating: all weights while loading and encoding, then (low_memory)
    without the text encoders, which are freed once a prompt is encoded, plus the activations."""
    sizes = {c: component_bytes(Path(folder) / c, quantize, layout) for c in layout.components}
    total = sum(sizes.values())
    if low_memory:
        encoders = sum(v for c, v in sizes.items() if c.startswith("text_encoder"))
        return max(total, total - encoders + HEADROOM)
    return total + HEADROOM


def check(folder: Path, quantize=None, low_memory: bool = False, force: bool = False, layout: Layout = Layout()):
    """Raise NotEnoughMemory, with the numbers and the settings that fit, when the estimate exceeds this
    machine's memory less its reserve; `force` skips it."""
    if force:
        return
    folder = Path(folder)
    total = footprint.physical_memory()
    usable = total - reserve(total)
    need = estimate(folder, quantize, low_memory, layout)
    if need <= usable:
        return
    fits = [(q, lm) for q, lm in OPTIONS if estimate(folder, q, lm, layout) <= usable]
    asked = f"quantize={quantize}" + (", low_memory=True" if low_memory else "")
    if fits:
        q, lm = fits[0]
        advice = f"quantize={q}" + (", low_memory=True" if lm else "") + " fits (CLI: -q " + str(q) + \
                 (" --low-memory" if lm else "") + ")"
    else:
        advice = "no setting fits: even quantize=4, low_memory=True needs " \
                 f"{estimate(folder, 4, True, layout) / GiB:.1f} GiB"
    raise NotEnoughMemory(
        f"{folder} with {asked} needs about {need / GiB:.1f} GiB (weights and activations), but this machine "
        f"has {total / GiB:.1f} GiB, of which {usable / GiB:.1f} GiB are usable; {advice}. Pass force=True "
        "(CLI: --force) to try anyway.")


def weights_bytes(files, quantize=None) -> int:
    """Bytes of an opened ModelFolder's weights once loaded with `quantize`, exactly."""
    layout = Layout.of(files)
    return sum(component_bytes(Path(files.folder) / c, quantize, layout) for c in layout.components)


def check_files(files, quantize=None, low_memory: bool = False, force: bool = False):
    """`check` for an opened ModelFolder (what Pipeline.from_pretrained calls before Pipeline.load)."""
    check(files.folder, quantize, low_memory, force, Layout.of(files))
