"""A reasoning model (MedReason-R1-style: `<think>...</think><answer>...</answer>`) as a panel backend.

Wraps any engine (vLLM serving a GRPO-trained checkpoint through `openai`, or the embedded llama.cpp
model with its GRPO adapter). `chat` returns the answer part and keeps the reasoning in
`last_reasoning`; `score_options` lets the model reason first and answer one of the options, which
then takes the whole likelihood (the others get `REJECT_LOGPROB`); a reply with no valid answer
falls back to the engine's own option likelihoods. Structured output goes straight to the engine
(its grammar, no reasoning).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from agents.llm.base import Completion, LLMBackend, Message, OptionScore

FORMAT = "Think briefly inside <think></think>, then give exactly one option inside <answer></answer>."
REJECT_LOGPROB = math.log(0.02)
_THINK = re.compile(r"<think>(.*?)</think>", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def split_reasoning(text: str) -> tuple[str, str | None]:
    """(reasoning, answer or None)."""
    t, a = _THINK.search(text), _ANSWER.search(text)
    return (t.group(1).strip() if t else ""), (a.group(1).strip() if a else None)


@dataclass
class ReasoningBackend(LLMBackend):
    inner: LLMBackend | None = None
    reasoning_tokens: int = 256
    last_reasoning: str = field(default="", repr=False)
    answered: int = 0  # score calls the model answered validly
    fell_back: int = 0  # score calls that fell back to the engine's likelihoods
    _last_answered: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.inner is None:
            raise ValueError("ReasoningBackend needs an inner engine")
        self.model = f"{self.inner.model} (reasoning)"

    def exclusive(self):
        return self.inner.exclusive()

    @property
    def likelihood_engine(self) -> LLMBackend:
        return self.inner

    def last_scores_were_an_answer(self) -> bool:
        return self._last_answered

    def _complete(self, messages: list[Message], *, max_tokens: int, temperature: float,
                  json_schema: dict | None) -> Completion:
        if json_schema is not None:
            return self.inner._complete(messages, max_tokens=max_tokens, temperature=temperature,
                                        json_schema=json_schema)
        comp = self.inner._complete(messages, max_tokens=max(max_tokens, self.reasoning_tokens),
                                    temperature=temperature, json_schema=None)
        think, answer = split_reasoning(comp.text)
        self.last_reasoning = think
        return Completion(answer if answer is not None else comp.text, comp.prompt_tokens, comp.completion_tokens,
                          comp.seconds, comp.finish_reason)

    def _score(self, messages: list[Message], options: list[str]) -> tuple[list[OptionScore], int]:
        from training.grpo_rewards import match_choice

        msgs = [dict(m) for m in messages]
        ask = f"Options: {'; '.join(options)}.\n{FORMAT}"
        last = msgs[-1]["content"]  # a vision model's message is a list of parts: it keeps its images
        msgs[-1]["content"] = f"{last}\n{ask}" if isinstance(last, str) else [*last, {"type": "text", "text": ask}]
        comp = self.inner._complete(msgs, max_tokens=self.reasoning_tokens, temperature=0.0, json_schema=None)
        think, answer = split_reasoning(comp.text)
        self.last_reasoning = think
        chosen = match_choice(answer, options)
        self._last_answered = chosen is not None
        if chosen is None:
            self.fell_back += 1
            return self.inner._score(messages, options)
        self.answered += 1
        return [OptionScore(o, 0.0 if o == chosen else REJECT_LOGPROB, 1) for o in options], comp.prompt_tokens
