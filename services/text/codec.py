"""Text <-> token ids for one model folder: its tokenizer.json and chat template."""

from __future__ import annotations

import json
import re
import uuid
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer


@dataclass(frozen=True)
class Message:
    role: str
    content: str


def _raise(message: str) -> None:
    raise TemplateError(message)


# Markers stand in for message contents in a second rendering of the template, to find where contents
# land. A thin space pads each marker: a template that strips contents (`| trim`, `.strip()`) drops it.
_PAD = "\u2009"


class TextCodec:
    def __init__(self, model_dir: Path) -> None:
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        # Encodes special-token text as ordinary text. A second instance, because the flag is state on the
        # tokenizer and encodes run on several threads at once.
        self._literal = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self._literal.encode_special_tokens = True
        specials = {i: t.content for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special}
        self._special_ids, self._special_texts = set(specials), set(specials.values())
        self._marker = uuid.uuid4().hex
        self._marker_pattern = re.compile(self._marker + r"(\d+)\.")
        config_path = model_dir / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.bos_token: str | None = _token_text(config.get("bos_token"))
        self.eos_token: str | None = _token_text(config.get("eos_token"))
        self.add_bos_token = bool(config.get("add_bos_token", False))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = _raise
        self._template = environment.from_string(template) if template else None

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def render_chat(self, messages: list[Message]) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template; send prompt instead of messages")
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos_token and self.bos_token is not None:
            bos = self.tokenizer.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos, *ids]
        return ids

    def encode_chat(self, messages: list[Message], allow_special_tokens: bool = False) -> list[int]:
        """The chat prompt's ids. Only the template's own special tokens are special: control-token text
        typed into a message stays text (so no one forges a turn), unless a trusted caller allows it."""
        text = self.render_chat(messages)
        # The template writes the BOS token itself where the model wants it.
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        # Every special token the tokenizer matched; those that lie in a message's content were typed there.
        found = [(i, encoding.token_to_chars(i)) for i, t in enumerate(encoding.ids) if t in self._special_ids]
        if allow_special_tokens or not found:
            return encoding.ids
        spans = self._content_spans(messages, text)
        if spans is None:
            if any(token in m.content for m in messages for token in self._special_texts):
                raise ValueError("messages: this model's chat template alters message contents, so special-token "
                                 "text in them can't be kept literal")
            return encoding.ids
        starts = [start for start, _ in spans]
        kept = [(i, span) for i, span in found if not _overlaps(_core(text, span), spans, starts)]
        if len(kept) == len(found):
            return encoding.ids
        # Cut where the tokenizer matched the template's special tokens, as it does itself, and encode the
        # text between them as text: for contents free of special-token text this is what it returns.
        ids: list[int] = []
        position = 0
        for i, (start, end) in kept:
            ids += self._literal.encode(text[position:start], add_special_tokens=False).ids
            ids.append(encoding.ids[i])
            position = end
        return ids + self._literal.encode(text[position:], add_special_tokens=False).ids

    def _content_spans(self, messages: list[Message], text: str) -> list[tuple[int, int]] | None:
        """Where message contents lie in `text`, their rendering, in order; None when the template changes
        contents beyond stripping whitespace, so that they can't be told apart from its own text."""
        markers = [Message(m.role, f"{_PAD}{self._marker}{i}.{_PAD}") for i, m in enumerate(messages)]
        marked = self.render_chat(markers)  # holds no sender's text, so no one can forge a marker in it
        spans: list[tuple[int, int]] = []
        rebuilt: list[str] = []
        length = position = 0
        for match in self._marker_pattern.finditer(marked):
            start, end = match.span()
            content = messages[int(match[1])].content
            if marked[start - 1:start] == _PAD:
                start -= 1
            else:
                content = content.lstrip()
            if marked[end:end + 1] == _PAD:
                end += 1
            else:
                content = content.rstrip()
            rebuilt += [marked[position:start], content]
            length += start - position
            spans.append((length, length + len(content)))
            length += len(content)
            position = end
        rebuilt.append(marked[position:])
        # Trust the spans only if putting the contents back in place of the markers gives the real prompt.
        return spans if "".join(rebuilt) == text else None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _core(text: str, span: tuple[int, int]) -> tuple[int, int]:
    """A matched special token's span without the whitespace that its lstrip/rstrip options absorbed."""
    start, end = span
    piece = text[start:end]
    return start + len(piece) - len(piece.lstrip()), end - len(piece) + len(piece.rstrip())


def _overlaps(span: tuple[int, int], spans: list[tuple[int, int]], starts: list[int]) -> bool:
    """Whether `span` overlaps any of `spans`, sorted and disjoint, whose starts are `starts`."""
    index = bisect_left(starts, span[1]) - 1  # the last one starting before `span` ends
    return index >= 0 and spans[index][1] > span[0]


def _token_text(token: object) -> str | None:
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None
