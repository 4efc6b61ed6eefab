"""vLLM in-process (`vllm.LLM`) for batch runs on a GPU host: batched generation, guided JSON, prompt logprobs.

vLLM is CUDA-only and pins its own torch, so it lives in its own environment (`pip install vllm`);
on a machine without it this backend says so instead of failing deep inside an import.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from agents.llm.base import Completion, LLMBackend, LLMUnavailable, Message, OptionScore, text_only

INSTALL_HINT = ("vLLM is not installed in this environment. On a CUDA host: `pip install vllm` in a separate "
                "virtualenv (it pins its own torch), or run `vllm serve MODEL` and use a backend of kind 'openai'.")


def _import_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise LLMUnavailable(INSTALL_HINT) from e
    return vllm


def _sampling(vllm, *, max_tokens: int, temperature: float, seed: int, json_schema: dict | None = None,
              prompt_logprobs: int | None = None):
    kw: dict[str, Any] = dict(max_tokens=max_tokens, temperature=temperature, seed=seed)
    if prompt_logprobs is not None:
        kw["prompt_logprobs"] = prompt_logprobs
    if json_schema is not None:
        sp = vllm.sampling_params
        if hasattr(sp, "StructuredOutputsParams"):  # vLLM >= 0.11
            kw["structured_outputs"] = sp.StructuredOutputsParams(json=json_schema)
        else:
            kw["guided_decoding"] = sp.GuidedDecodingParams(json=json_schema)
    return vllm.SamplingParams(**kw)


@dataclass
class VLLMBackend(LLMBackend):
    seed: int = 0
    gpu_memory_utilization: float = 0.85
    max_model_len: int = 4096
    _llm: Any = field(default=None, repr=False)

    @property
    def llm(self):
        if self._llm is None:
            vllm = _import_vllm()
            self._llm = vllm.LLM(model=self.model, gpu_memory_utilization=self.gpu_memory_utilization,
                                 max_model_len=self.max_model_len, seed=self.seed)
        return self._llm

    def chat_batch(self, conversations: list[list[Message]], *, json_schema: dict | None = None,
                   max_tokens: int | None = None) -> list[Completion]:
        """Many conversations in one batched call: the reason to run vLLM in-process."""
        vllm = _import_vllm()
        sp = _sampling(vllm, max_tokens=max_tokens or self.max_tokens, temperature=self.temperature,
                       seed=self.seed, json_schema=json_schema)
        t0 = time.perf_counter()
        outs = self.llm.chat(conversations, sp, use_tqdm=False)
        dt = (time.perf_counter() - t0) / max(len(outs), 1)
        return [Completion(o.outputs[0].text, len(o.prompt_token_ids), len(o.outputs[0].token_ids), dt,
                           o.outputs[0].finish_reason or "stop") for o in outs]

    def _complete(self, messages, *, max_tokens, temperature, json_schema) -> Completion:
        return self.chat_batch([messages], json_schema=json_schema, max_tokens=max_tokens)[0]

    def _score(self, messages: list[Message], options: list[str]) -> tuple[list[OptionScore], int]:
        """All options in one batch. Prompt and option are tokenised apart and sent as token ids, so the
        option's tokens are exactly the tail (a text prompt would get a second BOS from the tokenizer on
        Llama-style templates, and could merge tokens across the prompt/option boundary)."""
        vllm = _import_vllm()
        tok = self.llm.get_tokenizer()
        prompt = tok.apply_chat_template(text_only(messages), tokenize=False, add_generation_prompt=True)
        p_ids = list(tok(prompt, add_special_tokens=False)["input_ids"])  # the template writes its own BOS
        o_ids = [list(tok(o, add_special_tokens=False)["input_ids"]) for o in options]
        sp = _sampling(vllm, max_tokens=1, temperature=0.0, seed=self.seed, prompt_logprobs=0)
        outs = self.llm.generate([{"prompt_token_ids": p_ids + ids} for ids in o_ids], sp, use_tqdm=False)
        n_prompt = len(p_ids)
        scores = []
        for opt, o in zip(options, outs):
            ids = list(o.prompt_token_ids)
            lps = o.prompt_logprobs  # aligned with ids; the first entry is None; each holds the actual token
            total = sum(lps[i][ids[i]].logprob for i in range(n_prompt, len(ids)))
            scores.append(OptionScore(opt, float(total), len(ids) - n_prompt))
        return scores, n_prompt
