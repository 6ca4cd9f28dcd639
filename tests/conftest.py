"""Shared pytest fixtures."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    """A tiny random-weight flan-t5-like encoder + real T5 tokenizer in Hugging Face folder layout."""
    from echogen_core.text_encoder import build_tiny_t5

    return build_tiny_t5(tmp_path_factory.mktemp("tiny_t5"), d_model=64, seed=0)
