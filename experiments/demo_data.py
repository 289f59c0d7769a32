"""The demo pair's data and run configuration: `TrainConfig` (the shipped sizes, `SMOKE` for a
pipeline check), the corpus (the Python standard library's own sources, split by a hash of each
path), the byte-level BPE tokenizer trained on it, and the token stream the models train on.

Used by `experiments.train_demo_models` (training) and `experiments.measure_demo_pair`.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"


@dataclass(frozen=True)
class TrainConfig:
    """Sizes and schedule. Defaults are the shipped pair; ``--smoke`` shrinks everything."""

    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    # target: Llama, ~12M parameters (about 4 ms per decoded token on a 2-core CPU)
    target_hidden: int = 384
    target_layers: int = 6
    target_heads: int = 6
    target_ffn: int = 1024
    target_steps: int = 600
    target_lr: float = 1e-3
    # draft: Llama, ~1.4M parameters (<= 1/8 of the target, most of it the embedding)
    draft_hidden: int = 160
    draft_layers: int = 2
    draft_heads: int = 2
    draft_ffn: int = 512
    draft_steps: int = 700
    draft_lr: float = 2e-3
    warmup_steps: int = 60
    weight_decay: float = 0.1
    max_positions: int = 1024
    val_fraction_per_mille: int = 30  # ~3% of the files held out
    seed: int = 1234
    eval_prompts: int = 32  # held-out prompts for the acceptance estimate
    eval_new_tokens: int = 48


SMOKE = dict(
    vocab_size=512,
    target_hidden=64,
    target_layers=2,
    target_heads=2,
    target_ffn=128,
    target_steps=20,
    draft_hidden=32,
    draft_layers=1,
    draft_heads=1,
    draft_ffn=64,
    draft_steps=20,
    warmup_steps=5,
    batch_size=4,
    seq_len=64,
    eval_prompts=4,
    eval_new_tokens=8,
)


def corpus_files() -> tuple[Path, list[Path]]:
    """The standard library's Python sources, sorted, without tests, site-packages and idlelib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_parts = {"site-packages", "test", "tests", "idlelib", "__pycache__"}
    files = [
        p
        for p in sorted(root.rglob("*.py"))
        if not skip_parts.intersection(p.relative_to(root).parts)
    ]
    return root, files


def split_corpus(cfg: TrainConfig) -> tuple[list[str], list[str], dict]:
    """Return (train documents, validation documents, provenance record)."""
    root, files = corpus_files()
    train, val = [], []
    digest = hashlib.sha256()
    val_names = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        text = path.read_text(encoding="utf-8", errors="replace")
        digest.update(rel.encode() + b"\0" + text.encode("utf-8") + b"\0")
        # Held out by a hash of the path: stable under file additions elsewhere.
        bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 1000
        doc = f"# file: {rel}\n{text}"
        if bucket < cfg.val_fraction_per_mille:
            val.append(doc)
            val_names.append(rel)
        else:
            train.append(doc)
    provenance = {
        "source": "Python standard library sources (*.py, without test/, tests/, idlelib/, site-packages/)",
        "python_version": platform.python_version(),
        "stdlib_path": str(root),
        "files_total": len(files),
        "files_validation": len(val),
        "validation_files": val_names,
        "bytes_train": sum(len(d.encode()) for d in train),
        "bytes_validation": sum(len(d.encode()) for d in val),
        "corpus_sha256": digest.hexdigest(),
    }
    return train, val, provenance


def train_tokenizer(docs: list[str], vocab_size: int):
    """Byte-level BPE (as GPT-2 uses): any byte sequence is encodable, so no unknown tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


def encode_docs(tokenizer, docs: list[str]) -> torch.Tensor:
    """One long stream: document tokens joined by EOS. (N,) int64."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)
