"""Backends from configuration: `backend_from_config`, and `BackendPool` (one instance per backend, `for_role`)."""
from __future__ import annotations

from agents.llm.base import LLMBackend
from core.config import BackendConfig, Settings


def backend_from_config(name: str, cfg: BackendConfig) -> LLMBackend:
    engine = _engine(name, cfg)
    if not cfg.reasoning:
        return engine
    from agents.llm.reasoning import ReasoningBackend

    return ReasoningBackend(name=name, model=engine.model, inner=engine, max_tokens=cfg.max_tokens,
                            temperature=cfg.temperature, structured_retries=cfg.structured_retries, vision=cfg.vision)


def _engine(name: str, cfg: BackendConfig) -> LLMBackend:
    common = dict(name=name, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                  structured_retries=cfg.structured_retries, vision=cfg.vision)
    if cfg.kind == "llama_cpp":
        from agents.llm.llama_cpp import LlamaCppBackend

        return LlamaCppBackend(model=cfg.model or "", n_ctx=cfg.n_ctx, n_threads=cfg.n_threads, seed=cfg.seed,
                               chat_format=cfg.chat_format, lora=cfg.lora, lora_scale=cfg.lora_scale, **common)
    if cfg.kind == "transformers":
        from agents.llm.hf import TransformersBackend

        return TransformersBackend(model=cfg.model or "", seed=cfg.seed, n_threads=cfg.n_threads, **common)
    if cfg.kind == "openai":
        from agents.llm.openai_compat import OpenAIBackend

        if not cfg.model:
            raise ValueError(f"backend {name!r}: kind 'openai' needs `model` (the served model name)")
        return OpenAIBackend(model=cfg.model, base_url=cfg.base_url or "http://127.0.0.1:8000/v1",
                             api_key_env=cfg.api_key_env, timeout_s=cfg.timeout_s, seed=cfg.seed,
                             structured_mode=cfg.structured_mode, prompt_template=cfg.prompt_template, **common)
    if cfg.kind == "vllm":
        from agents.llm.vllm_inproc import VLLMBackend

        if not cfg.model:
            raise ValueError(f"backend {name!r}: kind 'vllm' needs `model`")
        return VLLMBackend(model=cfg.model, seed=cfg.seed, gpu_memory_utilization=cfg.gpu_memory_utilization,
                           max_model_len=cfg.n_ctx, **common)
    raise ValueError(f"unknown backend kind {cfg.kind!r}")


class BackendPool:
    """One instance per configured backend, shared by every role that names it (models load once)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._live: dict[str, LLMBackend] = {}

    def get(self, name: str) -> LLMBackend:
        if name not in self._live:
            self._live[name] = backend_from_config(name, self.settings.llm.backends[name])
        return self._live[name]

    def for_role(self, role: str) -> list[LLMBackend]:
        return [self.get(n) for n, _ in self.settings.llm.backend_for(role)]

    def calls(self) -> dict[str, list]:
        return {n: b.calls for n, b in self._live.items()}

    def close(self) -> None:
        for b in self._live.values():
            b.close()
        self._live.clear()
