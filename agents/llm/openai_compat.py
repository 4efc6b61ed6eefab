"""Any OpenAI-compatible server: `vllm serve`, `python -m llama_cpp.server`, hosted APIs.

Structured output goes through the server's own constrained decoding (`structured_mode`):
OpenAI/vLLM `response_format={"type": "json_schema", ...}`, llama.cpp's
`{"type": "json_object", "schema": ...}`, or vLLM's extras: `structured_outputs` (vLLM >= 0.10.2)
or `guided_json` (vLLM < 0.12, where it was removed). Option scoring uses
`/v1/completions` with `echo` + `logprobs` over a client-rendered chat prompt (vLLM: also
`prompt_logprobs`), so it needs the served model's template family in `prompt_template`.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from agents.llm.base import (Completion, LLMBackend, LLMError, LLMTimeout, LLMUnavailable, Message, OptionScore)
from agents.llm.prompting import render_chat


@dataclass
class OpenAIBackend(LLMBackend):
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 120.0
    seed: int = 0
    structured_mode: str = "json_schema"
    prompt_template: str = "chatml"
    _client: Any = field(default=None, repr=False)

    @property
    def client(self):
        if self._client is None:
            try:
                import openai
            except ImportError as e:  # pragma: no cover - openai is a core dependency
                raise LLMUnavailable("the `openai` package is missing: pip install openai") from e
            key = os.environ.get(self.api_key_env) or "not-needed"  # local servers accept any key
            self._client = openai.OpenAI(base_url=self.base_url, api_key=key, timeout=self.timeout_s, max_retries=0)
        return self._client

    def _call(self, fn, *args, **kw):
        with self._errors():
            return fn(*args, **kw)

    @contextlib.contextmanager
    def _errors(self):
        """The client's exceptions as this package's: LLMTimeout, LLMUnavailable (with what to do), LLMError."""
        import openai

        try:
            yield
        except openai.APITimeoutError as e:
            raise LLMTimeout(f"{self.name}: no answer from {self.base_url} within {self.timeout_s:g} s") from e
        except openai.APIConnectionError as e:
            raise LLMUnavailable(f"{self.name}: cannot reach {self.base_url} ({e.__cause__ or e}); "
                                 "is the server running? (e.g. `vllm serve MODEL` or "
                                 "`python -m llama_cpp.server --model FILE`)") from e
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            state = "set" if os.environ.get(self.api_key_env) else "unset"
            raise LLMUnavailable(f"{self.name}: {self.base_url} rejected the API key (read from "
                                 f"${self.api_key_env}, which is {state}): {e.status_code}") from e
        except openai.NotFoundError as e:
            raise LLMUnavailable(f"{self.name}: {self.base_url} has no model {self.model!r} or endpoint: {e}") from e
        except openai.APIStatusError as e:
            raise LLMError(f"{self.name}: server error {e.status_code}: {str(e)[:300]}") from e

    def _format_kwargs(self, schema: dict) -> dict:
        if self.structured_mode == "json_object":
            return {"response_format": {"type": "json_object", "schema": schema}}
        if self.structured_mode == "guided_json":  # vLLM < 0.12 (deprecated in 0.10.2, removed in 0.12)
            return {"extra_body": {"guided_json": schema}}
        if self.structured_mode == "structured_outputs":  # vLLM >= 0.10.2, its replacement for guided_json
            return {"extra_body": {"structured_outputs": {"json": schema}}}
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": schema.get("title", "answer"), "schema": schema}}}

    def _complete(self, messages, *, max_tokens, temperature, json_schema) -> Completion:
        kw: dict = dict(model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature,
                        seed=self.seed)
        if json_schema is not None:
            kw.update(self._format_kwargs(json_schema))
        t0 = time.perf_counter()
        r = self._call(self.client.chat.completions.create, **kw)
        dt = time.perf_counter() - t0
        ch = r.choices[0]
        u = r.usage
        return Completion(ch.message.content or "", getattr(u, "prompt_tokens", 0) or 0,
                          getattr(u, "completion_tokens", 0) or 0, dt, ch.finish_reason or "stop")

    def _stream(self, messages, *, max_tokens, temperature) -> Iterator[str]:
        with self._errors():  # a server that stalls or drops mid-stream is an LLMError too, not a raw client error
            it = self.client.chat.completions.create(model=self.model, messages=messages, max_tokens=max_tokens,
                                                     temperature=temperature, stream=True)
            for chunk in it:
                if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content

    def _score(self, messages: list[Message], options: list[str]) -> tuple[list[OptionScore], int]:
        prompt = render_chat(messages, self.prompt_template)
        n_prompt_chars = len(prompt)
        out, n_prompt = [], 0
        for opt in options:
            r = self._call(self.client.completions.create, model=self.model, prompt=prompt + opt, max_tokens=1,
                           temperature=0.0, echo=True, logprobs=0)
            lp = r.choices[0].logprobs
            if lp is None or not lp.token_logprobs:
                raise LLMError(f"{self.name}: server returned no prompt logprobs; option scoring needs "
                               "`echo`+`logprobs` (llama.cpp: start the server with --logits_all true)")
            # Servers detokenise the echo without special tokens, so character offsets do not map onto our
            # prompt string; the option is instead the run of tokens just before the one generated token.
            toks, lps = list(lp.tokens[:-1]), list(lp.token_logprobs[:-1])
            total, n, chars = 0.0, 0, 0
            while toks and chars < len(opt.rstrip()):
                chars += len(toks.pop())
                total += float(lps.pop() or 0.0)
                n += 1
            if n == 0 or not toks:
                raise LLMError(f"{self.name}: could not align option {opt!r} with the returned tokens")
            in_prompt = len(toks)
            n_prompt = in_prompt
            out.append(OptionScore(opt, total, n))
        return out, n_prompt
