import pytest

from tests import tiny


@pytest.fixture(scope="session")
def schnell_dir(tmp_path_factory):
    """A tiny schnell-like pipeline folder written by diffusers (see tests/tiny.py)."""
    return tiny.build(tmp_path_factory.mktemp("tiny-schnell"), guidance_embeds=False)


@pytest.fixture(scope="session")
def dev_dir(tmp_path_factory):
    """A tiny dev-like pipeline folder (guidance embedding, shifted schedule) written by diffusers."""
    return tiny.build(tmp_path_factory.mktemp("tiny-dev"), guidance_embeds=True, seed=1)


@pytest.fixture(scope="session")
def wide_dir(tmp_path_factory):
    """A tiny dev-like pipeline whose transformer and T5 are 64 wide, so 4- and 8-bit quantization
    really replaces their Linear layers (the others are too narrow for groups of 64)."""
    return tiny.build(tmp_path_factory.mktemp("tiny-wide"), guidance_embeds=True, seed=2, wide=True)
