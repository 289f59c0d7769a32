"""Fixtures shared by several test folders. The helpers they are built from live in the
`support` package (tests/ is on sys.path: pytest inserts this conftest's folder).

`tiny_pair`: a tiny random-init Llama target and a draft made from it, saved as Hugging Face
checkpoint folders (config + safetensors + tokenizer), as the services load real checkpoints.
"""

from __future__ import annotations

import pytest
import torch
from support.tiny_models import TinyPair, tiny_pair_models


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tests run torch single-threaded: on a 2-core machine shared with the test's own server
    subprocesses, intra-op threads oversubscribe the cores and a tiny forward slows ~100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> TinyPair:
    """(target_dir, draft_dir): tiny Llama checkpoints with identical tokenizers (vocab 300).

    The draft is the target's weights plus noise, so acceptance is high but below 1. Both
    folders load with `ModelRunner.from_pretrained` and `AutoTokenizer.from_pretrained` offline.
    """
    root = tmp_path_factory.mktemp("tiny_pair")
    tokenizer, target, draft = tiny_pair_models()
    pair = TinyPair(root / "target", root / "draft")
    for model, folder in ((target, pair.target_dir), (draft, pair.draft_dir)):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return pair
