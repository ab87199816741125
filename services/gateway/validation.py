"""Checks on a GenerateRequest; each failure names the offending field."""

from __future__ import annotations

from dataclasses import dataclass

from inflight import sampling
from inflight.v1 import common_pb2, generation_pb2
from services.text.codec import Message

ROLES = frozenset({"system", "user", "assistant", "tool"})
DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_INPUT_CHARS = 1_000_000
# GenerateRequest's sampling fields: those a client may leave unset (proto3 optional), and those whose
# zero is their default.
UNSET_ABLE = ("temperature", "top_p", "min_p", "repetition_penalty", "seed")
ZERO_IS_DEFAULT = ("top_k", "presence_penalty", "frequency_penalty", "min_tokens", "top_logprobs")
MAX_MESSAGES = 1024


class InvalidField(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class ValidLimits:
    max_model_len: int
    vocab_size: int


def input_field(request: generation_pb2.GenerateRequest) -> str:
    """The field that holds the request's input, for error messages."""
    return "messages" if request.messages else "prompt"


def check_request(request: generation_pb2.GenerateRequest, max_messages: int = MAX_MESSAGES) -> list[Message]:
    """Checks that need no tokenizer; returns the chat messages (empty for a raw prompt).

    The cheap checks on sizes come first, so an oversized request costs no more than its parse.
    """
    if len(request.messages) > max_messages:
        raise InvalidField("messages", f"at most {max_messages} messages")
    if request.prompt and request.messages:
        raise InvalidField("prompt", "set either prompt or messages, not both")
    if not request.prompt and not request.messages:
        raise InvalidField("prompt, messages", "one of them must be set (prompt: raw text; messages: chat turns)")
    size = len(request.prompt) + sum(len(m.content) + len(m.role) for m in request.messages)
    if size > MAX_INPUT_CHARS:
        raise InvalidField(input_field(request), f"input over {MAX_INPUT_CHARS} characters")
    for index, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise InvalidField(f"messages[{index}].role", f"unknown role {message.role!r}; use one of {sorted(ROLES)}")
    check_sampling(request)
    return [Message(m.role, m.content) for m in request.messages]


def check_token_ids(prompt_ids: list[int], vocab_size: int) -> None:
    """A prompt that arrives tokenized (its router tokenized it): ids inside the vocabulary, and some."""
    if len(prompt_ids) > MAX_INPUT_CHARS:
        raise InvalidField("prompt token ids", f"over {MAX_INPUT_CHARS} tokens")
    bad = next((i for i, token in enumerate(prompt_ids) if not 0 <= token < vocab_size), None)
    if bad is not None:
        raise InvalidField(f"prompt token ids[{bad}]", f"{prompt_ids[bad]} is outside the vocabulary ({vocab_size})")


def check_sampling(request: generation_pb2.GenerateRequest) -> None:
    """The sampling, stopping and id fields, whatever the input."""
    problem = sampling.out_of_range(sampling_params(request))
    if problem is not None:
        raise InvalidField(*problem)
    if request.max_tokens and request.min_tokens > request.max_tokens:
        raise InvalidField("min_tokens", "must not exceed max_tokens")
    if len(request.request_id) > 128:
        raise InvalidField("request_id", "at most 128 characters")
    if len(request.cache_salt) > 256:
        raise InvalidField("cache_salt", "at most 256 characters")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise InvalidField("stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for index, stop in enumerate(request.stop):
        if not stop or len(stop) > MAX_STOP_STRING_CHARS:
            raise InvalidField(f"stop[{index}]", f"must have 1 to {MAX_STOP_STRING_CHARS} characters")


def max_new_tokens(request: generation_pb2.GenerateRequest, num_prompt_tokens: int, limits: ValidLimits) -> int:
    """Checks that need the prompt's length; returns how many tokens may be generated."""
    room = limits.max_model_len - num_prompt_tokens
    field = input_field(request)
    if num_prompt_tokens == 0:
        raise InvalidField(field, "tokenizes to no tokens")
    if room <= 0:
        raise InvalidField(field, f"{num_prompt_tokens} tokens leave no room in the context length {limits.max_model_len}")
    if request.max_tokens > room:
        raise InvalidField("max_tokens", f"{field} ({num_prompt_tokens} tokens) plus max_tokens ({request.max_tokens}) "
                                         f"exceeds the context length {limits.max_model_len}")
    for index, token_id in enumerate(request.stop_token_ids):
        if token_id >= limits.vocab_size:
            raise InvalidField(f"stop_token_ids[{index}]", f"{token_id} is outside the vocabulary ({limits.vocab_size})")
    allowed = request.max_tokens or min(DEFAULT_MAX_TOKENS, room)
    if request.min_tokens > allowed:
        raise InvalidField("min_tokens", f"{request.min_tokens} exceeds the {allowed} tokens this request may generate "
                                         "(max_tokens, or its default)")
    return allowed


def sampling_params(request: generation_pb2.GenerateRequest) -> common_pb2.SamplingParams:
    """The request's sampling fields, each one it leaves unset at its default (inflight.sampling)."""
    given = {name: getattr(request, name) for name in UNSET_ABLE if request.HasField(name)}
    return sampling.resolved(**{name: getattr(request, name) for name in ZERO_IS_DEFAULT}, **given)
