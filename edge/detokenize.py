"""Incremental detokenisation of a generation's token stream (`TextStream`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TextStream:
    """The text each batch of new tokens adds.

    Decodes a short window of recent tokens and holds text back while it ends in an incomplete
    UTF-8 sequence (U+FFFD), so multi-byte characters split across tokens come out whole.
    `tokenizer` None (token-id prompts only) yields no text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, new_ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        self.ids.extend(new_ids)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""
