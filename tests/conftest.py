"""Shared pytest fixtures, and one CPU thread for the whole suite."""
from __future__ import annotations

import os

# The tests run tiny models whose ops are far too small to split across threads: on a 2-core CI machine the
# suite took 6.5 min with torch's default of 2 threads (threads waiting at barriers) and 2.7 min with one.
# ECHOGEN_TEST_THREADS overrides; subprocesses (CLI, DDP, a ComfyUI server) inherit it through OMP_NUM_THREADS.
THREADS = os.environ.get("ECHOGEN_TEST_THREADS", "1")
os.environ["OMP_NUM_THREADS"] = THREADS

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(THREADS))


@pytest.fixture(scope="session")
def tiny_t5_dir(tmp_path_factory):
    """A tiny random-weight flan-t5-like encoder + real T5 tokenizer in Hugging Face folder layout."""
    from echogen_core.text_encoder import build_tiny_t5

    return build_tiny_t5(tmp_path_factory.mktemp("tiny_t5"), d_model=64, seed=0)
