"""Shared pytest fixtures.

`tiny_pair`: a tiny random-init Llama target and a draft made from it, saved as Hugging Face
checkpoint folders (config + safetensors + tokenizer), as the services load real checkpoints.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import threading
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from scipy.stats import chisquare

TINY_VOCAB_SIZE = 300  # byte-level BPE: 256 byte tokens + 3 specials + merges
TINY_MAX_POSITIONS = 512
# A random-init model's next-token distributions are nearly uniform; scaling its output layer
# makes them peaked like a trained model's (top token ~0.3), so sampling has a clear shape.
HEAD_SCALE = 30.0
# Draft = target + Gaussian noise of this std relative to each weight tensor's own spread:
# greedy acceptance ~0.8-1.0 and sampling acceptance ~0.7-0.95 on short random prompts.
DRAFT_NOISE_REL = 0.03
SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|bos|>")

_CORPUS = (
    "The edge drafts a few tokens and the cloud verifies them in one forward pass.",
    "Speculative decoding keeps the output of the target model exactly.",
    "A draft token is accepted with probability min(1, p / q); otherwise it is rejected.",
    "def verify(block):\n    return accepted, token\n",
    "for i in range(10):\n    print(i * i)\n",
    "Round trip time decides how many tokens are worth drafting per round.",
    "the quick brown fox jumps over the lazy dog 0123456789",
)


class TinyPair(NamedTuple):
    """Checkpoint folders of a target and its draft; unpacks as (target_dir, draft_dir)."""

    target_dir: Path
    draft_dir: Path


def build_tiny_tokenizer(corpus: tuple[str, ...] = _CORPUS):
    """A byte-level BPE `PreTrainedTokenizerFast` of TINY_VOCAB_SIZE tokens trained on `corpus`
    (any text encodes; a different corpus gives different merges and ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[1],
        bos_token=SPECIAL_TOKENS[2],
    )


def build_tiny_llama(vocab_size: int, seed: int = 0, eos_token_id: int | None = None):
    """A random-init 2-layer Llama (hidden 64, 512 positions), float32, eval mode, with its
    output layer scaled by HEAD_SCALE; deterministic in `seed`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MAX_POSITIONS,
        eos_token_id=eos_token_id,
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(HEAD_SCALE)
    return model.eval()


def make_draft(target, noise_rel: float = DRAFT_NOISE_REL, seed: int = 1):
    """A copy of `target` with Gaussian noise added to every weight tensor, of std `noise_rel`
    times the tensor's std (its mean magnitude for constant tensors such as norm weights)."""
    import copy

    draft = copy.deepcopy(target)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            spread = p.std() if p.numel() > 1 and float(p.std()) > 0 else p.abs().mean()
            p.add_(torch.randn(p.shape, generator=gen) * (noise_rel * spread))
    return draft.eval()


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
    tokenizer = build_tiny_tokenizer()
    target = build_tiny_llama(len(tokenizer), seed=0, eos_token_id=tokenizer.eos_token_id)
    draft = make_draft(target)
    pair = TinyPair(root / "target", root / "draft")
    for model, folder in ((target, pair.target_dir), (draft, pair.draft_dir)):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return pair


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgespec-test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


SERVER_DEADLINE_S = 30.0


class VerifierServerThread:
    """A Verifier server on its own event loop in a background thread."""

    def __init__(self, engine, **serve_kwargs) -> None:  # engine: cloud.verifier.VerifierEngine
        from edgespec.cloud.service import serve

        self.engine = engine
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(serve(engine, **serve_kwargs), self.loop)
        self.running = future.result(timeout=SERVER_DEADLINE_S)
        self.address = self.running.address

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.running.stop(0), self.loop).result(SERVER_DEADLINE_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(SERVER_DEADLINE_S)
        self.loop.close()


def chi_square_p(observed: dict[int, int], probs: torch.Tensor, runs: int) -> float:
    """p-value of `observed` counts against `probs` (V,), tokens grouped into bins of expected
    count >= 5 (tokens in descending probability, each bin filled to >= 5)."""
    order = torch.argsort(probs, descending=True).tolist()
    obs, exp = [], []
    o_acc = e_acc = 0.0
    for t in order:
        o_acc += observed.get(t, 0)
        e_acc += float(probs[t]) * runs
        if e_acc >= 5:
            obs.append(o_acc)
            exp.append(e_acc)
            o_acc = e_acc = 0.0
    if e_acc > 0 or o_acc > 0:  # leftover mass joins the last bin
        obs[-1] += o_acc
        exp[-1] += e_acc
    assert len(obs) >= 3, "too few bins for a meaningful test"
    scale = sum(obs) / sum(exp)  # float rounding of the expected total
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)
