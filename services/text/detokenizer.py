"""Streaming detokenization that never emits a broken UTF-8 character.

A token may end in the middle of a multi-byte character; its text then ends in U+FFFD
and is held back until the following tokens complete it. Decoding a short window that
starts a few tokens back keeps each step cheap and spacing right.
"""

from __future__ import annotations

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.token_ids: list[int] = []
        self._prefix_offset = 0  # start of the decoding window
        self._read_offset = 0    # tokens before this were already emitted as text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, new_ids: list[int]) -> str:
        """Add tokens; return the new text they complete (possibly empty)."""
        self.token_ids.extend(new_ids)
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """At the end of the stream: whatever text is still held back."""
        prefix = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.token_ids)
        return full[len(prefix) :]
