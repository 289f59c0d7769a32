"""Loading a target/draft pair of Hugging Face checkpoints and checking that they can be paired.

Speculative decoding compares the two models' distributions token id by token id, so the pair
must share one vocabulary: the same ids for the same strings, the same special tokens, and logits
of the same width. ``check_pair`` says exactly what differs when they do not.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


class IncompatiblePairError(ValueError):
    """The draft cannot be paired with the target; the message lists every difference."""


@dataclass(frozen=True)
class ModelInfo:
    """What a checkpoint folder declares, read without loading weights."""

    path: Path
    model_type: str
    vocab_size: int  # width of the logits (config.vocab_size)
    num_parameters: int | None  # from the safetensors headers, when present


def _read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face checkpoint folder: it has no config.json"
        )
    return json.loads(config_file.read_text())


def _count_safetensors_params(path: Path) -> int | None:
    """Sum of tensor sizes from the safetensors headers (no weights loaded); None if absent."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                shape = f.get_slice(name).get_shape()
                n = 1
                for dim in shape:
                    n *= dim
                total += n
    return total


def model_info(path: str | Path) -> ModelInfo:
    """Read a checkpoint folder's config (and parameter count) without loading the model."""
    path = Path(path)
    config = _read_config(path)
    text_config = config.get("text_config", config)
    return ModelInfo(
        path=path,
        model_type=str(config.get("model_type", "?")),
        vocab_size=int(text_config["vocab_size"]),
        num_parameters=_count_safetensors_params(path),
    )


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, loaded offline from the folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def check_pair(target_path: str | Path, draft_path: str | Path) -> None:
    """Raise ``IncompatiblePairError`` naming every difference that makes the pair unusable.

    Checked: logits width (config vocab_size), the tokenizers' token-to-id maps, and their
    special tokens (eos/bos/pad ids). Differences in architecture or size are fine.
    """
    target, draft = model_info(target_path), model_info(draft_path)
    problems: list[str] = []
    if target.vocab_size != draft.vocab_size:
        problems.append(f"vocab_size differs: target {target.vocab_size}, draft {draft.vocab_size}")
    t_tok, d_tok = load_tokenizer(target_path), load_tokenizer(draft_path)
    t_vocab, d_vocab = t_tok.get_vocab(), d_tok.get_vocab()
    if t_vocab != d_vocab:
        only_t = sorted(set(t_vocab) - set(d_vocab))[:5]
        only_d = sorted(set(d_vocab) - set(t_vocab))[:5]
        moved = [tok for tok in t_vocab if tok in d_vocab and t_vocab[tok] != d_vocab[tok]][:5]
        detail = [f"{len(t_vocab)} vs {len(d_vocab)} tokens"]
        if only_t:
            detail.append(f"only in target: {only_t}")
        if only_d:
            detail.append(f"only in draft: {only_d}")
        if moved:
            detail.append(f"different ids for: {moved}")
        problems.append("tokenizer vocabularies differ (" + "; ".join(detail) + ")")
    for name in ("eos_token_id", "bos_token_id", "pad_token_id"):
        t_id, d_id = getattr(t_tok, name), getattr(d_tok, name)
        if t_id != d_id:
            problems.append(f"{name} differs: target {t_id}, draft {d_id}")
    if problems:
        raise IncompatiblePairError(
            f"draft {draft_path} cannot be paired with target {target_path}: " + "; ".join(problems)
        )
