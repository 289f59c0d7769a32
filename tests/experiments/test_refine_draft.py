"""The draft refinement's pieces (`experiments.refine_draft`) on tiny random Llama models: the
teacher data is the target's greedy continuation, and fine-tuning moves the draft towards the
target on it (with a zero learning rate as the control that it is the training that does)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from experiments.demo_data import TrainConfig
from experiments.refine_draft import RefineConfig, refine, teacher_sequences

VOCAB = 64
CPU = torch.device("cpu")


def _llama(seed: int, hidden: int, layers: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


RC = RefineConfig(
    teacher_sequences=6, prompt_tokens=5, teacher_new_tokens=7, generate_batch=4, batch_size=4
)
STREAM = torch.randint(1, VOCAB, (400,), generator=torch.Generator().manual_seed(0))


def test_teacher_sequences_are_the_targets_greedy_continuations() -> None:
    target = _llama(1, 32, 2)
    seqs = teacher_sequences(target, STREAM, RC, CPU)
    assert seqs.shape == (RC.teacher_sequences, RC.prompt_tokens + RC.teacher_new_tokens)
    with torch.no_grad():
        picks = target(seqs).logits[:, RC.prompt_tokens - 1 : -1].argmax(-1)
    assert torch.equal(picks, seqs[:, RC.prompt_tokens :])
    # the prompts are windows of the stream
    text = STREAM.tolist()
    for row in seqs[:, : RC.prompt_tokens].tolist():
        assert any(text[i : i + len(row)] == row for i in range(len(text)))


def _kl(draft, target, seqs: torch.Tensor) -> float:
    with torch.no_grad():
        p = F.log_softmax(target(seqs).logits, -1).flatten(0, 1)
        q = F.log_softmax(draft(seqs).logits, -1).flatten(0, 1)
    return F.kl_div(q, p, log_target=True, reduction="batchmean").item()


def test_refining_moves_the_draft_towards_the_target_on_its_continuations() -> None:
    target = _llama(1, 32, 2)
    teacher = teacher_sequences(target, STREAM, RC, CPU)
    cfg = TrainConfig(seq_len=12)
    kls = {}
    for lr in (0.0, 1e-2):
        draft = _llama(2, 16, 1)
        before = _kl(draft, target, teacher)
        log = refine(draft, target, teacher, STREAM, cfg, replace(RC, steps=40, lr=lr), CPU)
        kls[lr] = (before, _kl(draft, target, teacher))
        assert log[-1]["step"] == 39 and not draft.training
    unchanged, trained = kls[0.0], kls[1e-2]
    assert unchanged[1] == unchanged[0]  # the control: no learning, no change
    assert trained[1] < 0.7 * trained[0], trained
