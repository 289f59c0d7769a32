"""The protocol between the two transport-free halves of one speculative-decoding session: the
block and verdict that cross it, and the argument that it is exact.

`Drafter` (edge half, `edgespec.core.drafter`) owns the committed token history and the draft model: it proposes a
`DraftBlock` of draft tokens and applies the `Verdict` that comes back. `Verifier` (cloud half)
owns the target model's KV cache for the session: it scores a block in one forward pass and decides
how many draft tokens are accepted plus one token of its own (the recovered token on a rejection,
the bonus token when every draft token is accepted). The edge and cloud packages wrap these in
gRPC; `generate.generate` wires them directly (co-located).

Cache convention on both sides: a runner's cache holds a prefix of the committed tokens, at most
all but the last one. Every forward feeds the committed tokens the cache lacks (usually just the
last one) followed by the new tokens, so one forward yields the logits for every position needed.
(The draft's cache may also hold draft tokens still awaiting their verdict; `apply` rolls it back
to the part that was committed.)

Two extensions of the plain round:

- **Cloud-only decoding** (`Drafter.propose_decode`): a block with no draft tokens and
  ``decode_tokens = n`` asks the verifier to decode n tokens alone. The verifier answers with one
  verdict per token (`Verifier.continue_decode` after the first); each is a k = 0 round, its token
  drawn from the target's own distribution, so the output is the target's.
- **Pipelined drafting** (`Drafter.propose_ahead`): while block n's verdict travels, the drafter
  guesses the verdict's bonus token g (the draft's most likely next token after the whole block)
  and drafts block n+1 after it, with ``base_len = base_n + k_n + 1`` and ``anchor_token = g``.
  The verifier applies block n+1 only if its committed length is base_len AND its last committed
  token is g; otherwise the block is stale (no forward, nothing changes). On the verdict of
  block n, the drafter keeps block n+1 (a *hit*: every draft token accepted and the bonus equals
  g) or drops it and rolls its cache back to the committed prefix (a *miss*). After a token
  tree the guess is a path: the tree's likeliest deepest path (`GrownTree.guess`), then g after
  it; the block ahead also carries the path's tokens (``anchor_prefix``), since another path of
  the same depth may end in g, and is applied only if the committed tokens end with them and g.
  Either side's rule is the same (committed length and suffix), so they agree on every hit.

  Why this is exact. Greedy: a block is verified against the target's argmax whatever its
  origin, and only on the prefix it names, so the committed tokens are the target's. Sampling:
  the bonus token of block n is drawn by the verifier from p exactly, independently of g (the
  guess only decides whether block n+1 is used). Block n+1 proceeds only if the committed prefix
  ends in g, which is the prefix its draft tokens were drawn on, each from its own q (sent with
  the block) with the draft's randomness, independent of the verifier's draws. So conditioned on
  the committed prefix, block n+1 is an ordinary block drafted from q on that prefix, and
  rejection sampling against p commits tokens distributed as the target alone would produce
  them (a tree's nodes likewise, each sibling drawn from its q on that prefix). A dropped block
  consumed only draft randomness, which no committed token depends on.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

from edgespec.core.rejection import DraftProbs
from edgespec.core.tree import check_parents, node_depths
from edgespec.core.validation import check_int, check_ms, is_int

FINISH_STOP = "stop"  # a stop token was generated (it is part of the output)
FINISH_LENGTH = "length"  # max_new_tokens were generated


class StaleBlockError(Exception):
    """A block was drafted on a prefix the verifier has moved past (or an older seq was resent).

    Not a `ValueError`: the block is well formed, just late; services answer it as stale.
    """

    def __init__(self, seq: int, base_len: int, committed_len: int, last_seq: int | None) -> None:
        super().__init__(
            f"stale block: seq={seq} base_len={base_len}, verifier committed_len={committed_len} "
            f"last seq={last_seq}"
        )
        self.seq = seq
        self.base_len = base_len
        self.committed_len = committed_len
        self.last_seq = last_seq


@dataclass(frozen=True)
class DraftBlock:
    """Draft tokens proposed by the edge for one verification round (edge -> cloud)."""

    seq: int  # round sequence number: 0 for the first block, +1 per block
    base_len: int  # committed length (prompt + generated) the draft tokens extend
    tokens: tuple[int, ...]  # the draft tokens, k >= 0 of them
    # The distributions the draft tokens were drawn from; None for greedy drafting (q one-hot).
    draft_probs: DraftProbs | None = None
    # Cloud-only streaming: k = 0 and the verifier decodes this many tokens alone (0 = a round).
    decode_tokens: int = 0
    # Pipelined drafting: the token assumed at position base_len - 1 (the guessed bonus token of
    # the block before); the block is stale unless the verifier's last token is this. None = any.
    anchor_token: int | None = None
    # A token tree (`edgespec.core.tree`): parents[i] is the index of node i's parent (an earlier
    # node) or -1 (a child of the last committed token). None: a chain (each token the child of
    # the one before). A tree's verdict names its accepted path (`Verdict.path`).
    parents: tuple[int, ...] | None = None
    # Pipelined drafting after a tree: the tokens assumed before the anchor (the tree's guessed
    # path), positions base_len - 1 - len(anchor_prefix) .. base_len - 2; stale unless the
    # committed tokens end with them and the anchor. () = the anchor alone. Needs anchor_token.
    anchor_prefix: tuple[int, ...] = ()
    # Other guesses at the prefix, sent in the same message (`resolve`): blocks of the same seq,
    # each with its own base_len and anchor, tokens and parents (and q); the verifier applies
    # the first of (this block, *alternatives) drafted on its committed prefix, and the block
    # is STALE only if none was. No alternative has alternatives or decode_tokens.
    alternatives: tuple[DraftBlock, ...] = ()

    def __post_init__(self) -> None:
        check_int("seq", self.seq, 0)
        check_int("base_len", self.base_len, 1)
        tokens = tuple(self.tokens)
        for t in tokens:
            if not is_int(t) or t < 0:
                raise ValueError(f"tokens must hold only ints >= 0, got {t!r}")
        object.__setattr__(self, "tokens", tokens)
        check_int("decode_tokens", self.decode_tokens, 0)
        if self.decode_tokens and tokens:
            raise ValueError(
                f"decode_tokens must be 0 for a block with draft tokens (k = {len(tokens)}), "
                f"got {self.decode_tokens}"
            )
        if self.anchor_token is not None:
            check_int("anchor_token", self.anchor_token, 0)
        prefix = tuple(self.anchor_prefix)
        if prefix and self.anchor_token is None:
            raise ValueError(f"anchor_prefix needs an anchor_token, got {prefix}")
        for t in prefix:
            if not is_int(t) or t < 0:
                raise ValueError(f"anchor_prefix must hold only ints >= 0, got {t!r}")
        object.__setattr__(self, "anchor_prefix", prefix)
        if self.parents is not None:
            object.__setattr__(self, "parents", check_parents(self.parents, len(tokens)))
        alternatives = tuple(self.alternatives)
        if alternatives and self.decode_tokens:
            raise ValueError("alternatives must be empty in a decode block (decode_tokens > 0)")
        for i, alt in enumerate(alternatives):
            if not isinstance(alt, DraftBlock):
                raise ValueError(f"alternatives[{i}] must be a DraftBlock, got {type(alt)}")
            if alt.seq != self.seq or alt.alternatives or alt.decode_tokens:
                raise ValueError(
                    f"alternatives[{i}] must have the block's seq ({self.seq}), no alternatives "
                    f"and no decode_tokens, got seq {alt.seq}, {len(alt.alternatives)} "
                    f"alternatives, decode_tokens {alt.decode_tokens}"
                )
        object.__setattr__(self, "alternatives", alternatives)

    @functools.cached_property
    def choices(self) -> tuple[DraftBlock, ...]:
        """This block without its alternatives, then each alternative: the guesses the message
        carries, in the order the verifier tries them (`resolve`). Built once per block (the
        verifier's path asks for it several times per block)."""
        if not self.alternatives:
            return (self,)
        return (replace(self, alternatives=()), *self.alternatives)

    def fits(self, committed: Sequence[int]) -> bool:
        """Whether the block (alternatives aside) was drafted on the committed tokens
        `committed`: its base_len is their count and they end with its anchor. The one rule
        both sides apply to a block drafted ahead, so they agree on every hit."""
        if self.base_len != len(committed):
            return False
        anchor = self.anchor
        return not anchor or tuple(committed[-len(anchor) :]) == anchor

    def resolve(self, committed: Sequence[int]) -> tuple[int, DraftBlock] | None:
        """The first of `choices` drafted on `committed` (`fits`), with its index (0: this
        block, i: alternatives[i - 1]); None when none was (the block is STALE)."""
        for i, choice in enumerate(self.choices):
            if choice.fits(committed):
                return i, choice
        return None

    @property
    def identity(self) -> tuple:
        """What defines the block (a resend must match it); q is excluded (a re-decoded copy)."""
        return (
            self.base_len,
            self.tokens,
            self.decode_tokens,
            self.anchor_token,
            self.parents,
            self.anchor_prefix,
            tuple(alt.identity for alt in self.alternatives),
        )

    @property
    def anchor(self) -> tuple[int, ...]:
        """The committed tokens the block assumes end the prefix (anchor_prefix + the anchor);
        () when it assumes none."""
        if self.anchor_token is None:
            return ()
        return (*self.anchor_prefix, self.anchor_token)

    @property
    def depth(self) -> int:
        """Levels of draft tokens: the most draft tokens one verdict can accept (k for a chain)."""
        if self.parents is None:
            return len(self.tokens)
        return max(node_depths(self.parents), default=-1) + 1


@dataclass(frozen=True)
class Verdict:
    """The verifier's answer to one `DraftBlock` (cloud -> edge)."""

    seq: int  # seq of the block this answers
    accepted: int  # draft tokens accepted, 0..k
    token: int  # recovered token (accepted < k) or bonus token (accepted == k)
    is_bonus: bool
    committed_len: int  # verifier's committed length after this verdict: base_len + accepted + 1
    verify_ms: float  # verifier compute time for the block (prepare + forward + rejection)
    # A tree block's accepted nodes, root child first (`accepted` of them); None for a chain,
    # whose accepted tokens are its first `accepted`.
    path: tuple[int, ...] | None = None
    # Which of the block's `DraftBlock.choices` was applied: 0 the block itself, i its
    # alternatives[i - 1].
    alternative: int = 0

    def __post_init__(self) -> None:
        check_int("seq", self.seq, 0)
        check_int("accepted", self.accepted, 0)
        check_int("alternative", self.alternative, 0)
        if self.path is not None:
            path = tuple(self.path)
            if len(path) != self.accepted:
                raise ValueError(f"path must hold accepted={self.accepted} nodes, got {len(path)}")
            for node in path:
                check_int("path[i]", node, 0)
            object.__setattr__(self, "path", path)
        check_int("token", self.token, 0)
        check_int("committed_len", self.committed_len, 1)
        if not isinstance(self.is_bonus, bool):
            raise ValueError(f"is_bonus must be a bool, got {self.is_bonus!r}")
        check_ms("verify_ms", self.verify_ms)


def derive_seed(seed: int | None, role: str) -> int | None:
    """A per-role seed from the session seed, so the draft and target streams are independent.

    None stays None (nondeterministic). Result is in [0, 2**63).
    """
    if seed is None:
        return None
    digest = hashlib.blake2b(f"{seed}:{role}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def check_prompt_ids(prompt_ids: Sequence[int], vocab_size: int) -> list[int]:
    """The prompt as a list: at least one token, every one an int in [0, vocab_size)."""
    prompt = list(prompt_ids)
    if not prompt:
        raise ValueError("prompt_ids must hold at least 1 token, got 0")
    for t in prompt:
        if not is_int(t) or not 0 <= t < vocab_size:
            raise ValueError(f"prompt_ids must be ints in [0, {vocab_size}), got {t!r}")
    return prompt
