"""The one interface every agent uses to talk to an LLM.

`chat` returns text; `structured` returns a validated pydantic instance (constrained decoding where
the engine supports it, then validation, then a retry that shows the model its validation error,
then `StructuredOutputError`); `score_options` ranks candidate answers by length-normalised
log-likelihood. Every call appends a `CallRecord` (tokens, latency) to `backend.calls`.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator, Literal, TypeVar

from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)
Role = Literal["system", "user", "assistant"]
Message = dict  # {"role": Role, "content": str | list of OpenAI-style parts (text, image_url) for vision backends}


def text_of(content: str | list[dict]) -> str:
    """A message's text: itself, or its text parts joined (images dropped) for an engine that reads text only."""
    if isinstance(content, str):
        return content
    return "\n".join(p["text"] for p in content if p.get("type") == "text")


def text_only(messages: list[Message]) -> list[Message]:
    return [m if isinstance(m["content"], str) else {**m, "content": text_of(m["content"])} for m in messages]


class LLMError(RuntimeError):
    """An LLM call that could not be completed; the message says what to do about it."""


class LLMUnavailable(LLMError):
    """Server down, model file missing, engine not installed."""


class LLMTimeout(LLMError):
    pass


class StructuredOutputError(LLMError):
    def __init__(self, schema: str, attempts: int, last_error: str, last_text: str):
        self.schema, self.attempts, self.last_error, self.last_text = schema, attempts, last_error, last_text
        super().__init__(f"no valid {schema} after {attempts} attempt(s): {last_error[:300]}")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str = "stop"


@dataclass
class CallRecord:
    kind: Literal["chat", "structured", "score"]
    model: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    ok: bool = True
    error: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class OptionScore:
    option: str
    logprob: float  # sum over the option's tokens
    n_tokens: int

    @property
    def mean_logprob(self) -> float:
        return self.logprob / max(self.n_tokens, 1)


@dataclass
class ScoredOptions:
    scores: list[OptionScore]

    @property
    def best(self) -> str:
        return max(self.scores, key=lambda s: s.mean_logprob).option

    def probabilities(self) -> dict[str, float]:
        """Softmax over length-normalised log-likelihoods: a calibrated-enough ranking, not a posterior."""
        m = max(s.mean_logprob for s in self.scores)
        w = {s.option: math.exp(s.mean_logprob - m) for s in self.scores}
        z = sum(w.values())
        return {k: v / z for k, v in w.items()}


def schema_of(model: type[BaseModel]) -> dict:
    return model.model_json_schema()


def _retry_message(error: str) -> Message:
    return {"role": "user", "content": "Your reply was not valid for the required JSON schema: "
            f"{error[:500]}\nReply again with only the corrected JSON object."}


@dataclass
class LLMBackend(ABC):
    """Subclasses implement `_complete` (optionally with a JSON schema) and `_score`."""

    name: str
    model: str
    max_tokens: int = 512
    temperature: float = 0.0
    structured_retries: int = 2
    vision: bool = False  # takes image parts (a served VLM); other engines get the messages' text only
    calls: list[CallRecord] = field(default_factory=list, repr=False)

    # -- engine hooks
    @abstractmethod
    def _complete(self, messages: list[Message], *, max_tokens: int, temperature: float,
                  json_schema: dict | None) -> Completion: ...

    def _stream(self, messages: list[Message], *, max_tokens: int, temperature: float) -> Iterator[str]:
        yield self._complete(messages, max_tokens=max_tokens, temperature=temperature, json_schema=None).text

    @abstractmethod
    def _score(self, messages: list[Message], options: list[str]) -> tuple[list[OptionScore], int]:
        """(scores, prompt tokens)."""

    @property
    def likelihood_engine(self) -> "LLMBackend":
        """The engine whose option scores are likelihoods (itself; a reasoning wrapper's inner engine)."""
        return self

    def last_scores_were_an_answer(self) -> bool:
        """True when the last `score_options` gave the model's chosen answer (0 vs a reject score), not likelihoods."""
        return False

    def exclusive(self) -> contextlib.AbstractContextManager:
        """Hold the engine for a run of related calls, so one engine's prompt cache serves them all
        (an in-process engine that reuses the KV cache of a shared prompt prefix overrides this)."""
        return contextlib.nullcontext()

    # -- public API
    def _readable(self, messages: list[Message]) -> list[Message]:
        return messages if self.vision else text_only(messages)

    def chat(self, messages: list[Message], *, max_tokens: int | None = None,
             temperature: float | None = None) -> str:
        messages = self._readable(messages)
        return self._record("chat", lambda: self._complete(
            messages, max_tokens=max_tokens or self.max_tokens,
            temperature=self.temperature if temperature is None else temperature, json_schema=None)).text

    def stream(self, messages: list[Message], *, max_tokens: int | None = None) -> Iterator[str]:
        """Text pieces as they arrive; the call is recorded with its piece count (≈ tokens) once it ends."""
        t0, n = time.perf_counter(), 0
        messages = self._readable(messages)
        try:
            for piece in self._stream(messages, max_tokens=max_tokens or self.max_tokens,
                                      temperature=self.temperature):
                n += 1
                yield piece
        except LLMError as e:
            self.calls.append(CallRecord("chat", self.model, 0, n, time.perf_counter() - t0, False, str(e)))
            raise
        self.calls.append(CallRecord("chat", self.model, 0, n, time.perf_counter() - t0))

    def structured(self, messages: list[Message], schema: type[T], *, max_tokens: int | None = None,
                   retries: int | None = None) -> T:
        js = schema_of(schema)
        messages = self._readable(messages)
        convo = list(messages)
        attempts = 1 + (self.structured_retries if retries is None else retries)
        err, text = "", ""
        limit = max_tokens or self.max_tokens
        for _ in range(attempts):
            comp = self._record("structured", lambda: self._complete(
                convo, max_tokens=limit, temperature=self.temperature, json_schema=js))
            text = comp.text
            try:
                return schema.model_validate_json(_strip_fences(text))
            except ValidationError as e:
                err = "; ".join(f"{'.'.join(map(str, x['loc'])) or '(root)'}: {x['msg']}" for x in e.errors()[:5])
                if comp.finish_reason == "length":  # grammar or not, a reply cut off mid-object is not JSON
                    err = f"reply cut off at max_tokens={limit} (too long): {err}"
            convo = [*messages, {"role": "assistant", "content": text}, _retry_message(err)]
        raise StructuredOutputError(schema.__name__, attempts, err, text)

    def score_options(self, messages: list[Message], options: list[str]) -> ScoredOptions:
        if not options:
            raise ValueError("score_options needs at least one option")
        t0 = time.perf_counter()
        try:
            scores, n_prompt = self._score(self._readable(messages), list(options))
        except LLMError as e:
            self.calls.append(CallRecord("score", self.model, 0, 0, time.perf_counter() - t0, False, str(e)))
            raise
        self.calls.append(CallRecord("score", self.model, n_prompt, sum(s.n_tokens for s in scores),
                                     time.perf_counter() - t0))
        return ScoredOptions(scores)

    def close(self) -> None:
        pass

    def _record(self, kind, fn) -> Completion:
        t0 = time.perf_counter()
        try:
            comp = fn()
        except LLMError as e:
            self.calls.append(CallRecord(kind, self.model, 0, 0, time.perf_counter() - t0, False, str(e)))
            raise
        self.calls.append(CallRecord(kind, self.model, comp.prompt_tokens, comp.completion_tokens, comp.seconds))
        return comp


def _strip_fences(text: str) -> str:
    t = text.strip()
    if t.startswith("```"):
        t = t.split("\n", 1)[1] if "\n" in t else ""
        t = t.rsplit("```", 1)[0]
    return t.strip()


def parse_json_object(text: str) -> dict | None:
    """The JSON object in a reply, or None (used to measure unconstrained validity honestly)."""
    try:
        v = json.loads(_strip_fences(text))
    except json.JSONDecodeError:
        return None
    return v if isinstance(v, dict) else None
