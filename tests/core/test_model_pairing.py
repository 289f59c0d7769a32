"""Pairing checkpoints: a draft whose vocabulary differs from the target's is refused, naming
what differs; a compatible pair passes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from support.tiny_models import TinyPair, tiny_llama, tiny_tokenizer

from edgespec.core.models import IncompatiblePairError, check_pair, model_info


def test_compatible_pair_passes(tiny_pair: TinyPair) -> None:
    check_pair(tiny_pair.target_dir, tiny_pair.draft_dir)
    info = model_info(tiny_pair.target_dir)
    assert info.model_type == "llama"
    assert info.num_parameters and info.num_parameters > 0


def test_different_tokenizer_is_refused_naming_the_difference(
    tiny_pair: TinyPair, tmp_path: Path
) -> None:
    draft = tmp_path / "draft"
    shutil.copytree(tiny_pair.draft_dir, draft)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (draft / name).unlink(missing_ok=True)
    # Same size, different merges and ids: trained on other text.
    tiny_tokenizer(("zebra quartz jukebox " * 20, "xylophone wizard " * 20)).save_pretrained(draft)
    with pytest.raises(IncompatiblePairError, match="tokenizer vocabularies differ"):
        check_pair(tiny_pair.target_dir, draft)


def test_different_logit_width_is_refused(tiny_pair: TinyPair, tmp_path: Path) -> None:
    draft = tmp_path / "draft"
    shutil.copytree(tiny_pair.draft_dir, draft)
    wide = tiny_llama(vocab_size=model_info(tiny_pair.target_dir).vocab_size + 64)
    wide.save_pretrained(draft)
    with pytest.raises(IncompatiblePairError, match=r"vocab_size differs: target \d+, draft \d+"):
        check_pair(tiny_pair.target_dir, draft)


def test_missing_checkpoint_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        check_pair(tmp_path / "nope", tmp_path / "nope2")
