"""Refusing what memory cannot hold: the estimate from safetensors headers against the bytes a loaded pipeline
really holds, and the refusal before any weight is read, under a fake small memory."""

import shutil

import pytest
from mlx.utils import tree_flatten

from mlx_crepulse import Pipeline, footprint, memory
from mlx_crepulse.model_folder import ModelFolder
from tests import tiny_klein

COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")


def loaded_bytes(pipe) -> dict:
    return {c: sum(v.nbytes for _, v in tree_flatten(getattr(pipe, c).parameters())) for c in COMPONENTS}


@pytest.mark.parametrize("quantize", [None, 4, 8])
def test_estimate_is_what_loading_holds(wide_dir, quantize):
    """From the headers alone, each component's estimated bytes equal the bytes of every array the loaded
    (quantized) pipeline holds, component by component; and a folder saved quantized is counted as written."""
    pipe = Pipeline.from_pretrained(str(wide_dir), quantize=quantize)
    got = loaded_bytes(pipe)
    assert {c: memory.component_bytes(wide_dir / c, quantize) for c in COMPONENTS} == got
    if quantize:
        assert got["transformer"] < memory.component_bytes(wide_dir / "transformer") / 2  # really quantized


@pytest.mark.parametrize("quantize", [None, 4])
def test_klein_estimate_is_what_loading_holds(tmp_path_factory, quantize):
    """FLUX.2 [klein]'s layout (one Qwen3 encoder, whose loader drops the LM head and unused layers): the
    estimate is still the loaded bytes exactly."""
    folder = tiny_klein.build(tmp_path_factory.mktemp("klein"), distilled=True)
    pipe = Pipeline.from_pretrained(str(folder), quantize=quantize)
    layout = memory.Layout.of(ModelFolder.open(str(folder)))
    got = {c: sum(v.nbytes for _, v in tree_flatten(getattr(pipe, c).parameters())) for c in layout.components}
    assert {c: memory.component_bytes(folder / c, quantize, layout) for c in layout.components} == got


def test_saved_quantized_folder_is_counted_as_written(wide_dir, tmp_path):
    """A folder `save` wrote after quantizing: its headers give the loaded bytes, whatever quantize says."""
    Pipeline.from_pretrained(str(wide_dir), quantize=4).save(tmp_path / "q4")
    pipe = Pipeline.from_pretrained(str(tmp_path / "q4"))
    assert {c: memory.component_bytes(tmp_path / "q4" / c, 8) for c in COMPONENTS} == loaded_bytes(pipe)


def fake_memory(monkeypatch, usable: int):
    """This machine, shrunk so that `usable` bytes remain after the system's reserve."""
    total = 2 * memory.GiB + usable
    assert total - memory.reserve(total) == usable
    monkeypatch.setattr(footprint, "physical_memory", lambda: total)


def test_refuses_before_reading_a_weight(wide_dir, tmp_path, monkeypatch):
    """With memory for the 4-bit pipeline only, an unquantized load is refused with the numbers and the
    setting that fits; the weight files are cut after their headers, so a refusal that had read any weight
    would have failed on them instead. `force` skips the check (and then the cut files fail to load); the
    suggested setting passes it."""
    folder = tmp_path / "cut"
    shutil.copytree(wide_dir, folder)
    for f in folder.glob("*/*.safetensors"):
        data = f.read_bytes()
        f.write_bytes(data[:8 + int.from_bytes(data[:8], "little")])
    need = memory.estimate(folder, None)
    usable = (memory.estimate(folder, 4, True) + need) // 2
    fake_memory(monkeypatch, usable)
    with pytest.raises(memory.NotEnoughMemory) as e:
        Pipeline.from_pretrained(str(folder))
    msg = str(e.value)
    assert f"needs about {need / memory.GiB:.1f} GiB" in msg and f"{usable / memory.GiB:.1f} GiB are usable" in msg
    assert "force=True" in msg
    q, lm = next((q, lm) for q, lm in memory.OPTIONS if f"quantize={q}" + (", low_memory=True" if lm else "") +
                 " fits" in msg)
    assert memory.estimate(folder, q, lm) <= usable < need
    memory.check(folder, q, lm)  # the advice passes
    with pytest.raises(Exception) as e:
        Pipeline.from_pretrained(str(folder), force=True)
    assert not isinstance(e.value, memory.NotEnoughMemory) and "cannot read" in str(e.value)


def test_low_memory_counts_the_text_encoders_out(wide_dir, monkeypatch):
    """The low-memory mode frees T5 and CLIP after encoding: it needs the weights while loading, and the
    transformer, VAE and activations after; the refusal with no setting that fits names the smallest need."""
    sizes = {c: memory.component_bytes(wide_dir / c, 4) for c in COMPONENTS}
    total = sum(sizes.values())
    assert memory.estimate(wide_dir, 4, True) == max(total, total - sizes["text_encoder"] - sizes["text_encoder_2"]
                                                     + memory.HEADROOM)
    assert memory.estimate(wide_dir, 4) == total + memory.HEADROOM
    fake_memory(monkeypatch, 1024)
    with pytest.raises(memory.NotEnoughMemory, match="no setting fits: even quantize=4, low_memory=True needs"):
        Pipeline.from_pretrained(str(wide_dir), quantize=4, low_memory=True)
