"""transformers engine: the training path (GRPO tunes this model) and models llama.cpp cannot run.

Loads the same GGUF as the embedded default (`gguf_file=`, dequantised to float32) unless `model`
names a local HF folder. Structured output is grammar-constrained with xgrammar's logits processor
(the engine vLLM uses), so schema validity does not depend on the model's skill.
"""
from __future__ import annotations

import copy
import inspect
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from agents.llm.base import Completion, LLMBackend, LLMUnavailable, Message, OptionScore


@dataclass
class TransformersBackend(LLMBackend):
    seed: int = 0
    n_threads: int | None = None
    device: str = "cpu"
    _model: Any = field(default=None, repr=False)
    _tok: Any = field(default=None, repr=False)
    _grammar: Any = field(default=None, repr=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def __post_init__(self) -> None:
        from agents.llm.llama_cpp import default_gguf

        self.path = Path(self.model) if self.model else default_gguf()
        if not self.path.exists():
            raise LLMUnavailable(f"{self.name}: model {self.path} does not exist")
        self.model = self.path.name

    def _load(self):
        with self._lock:
            return self._load_locked()

    def _load_locked(self):
        if self._model is None:
            try:
                from transformers import AutoModelForCausalLM, AutoTokenizer
            except ImportError as e:
                raise LLMUnavailable("transformers is not installed: pip install transformers gguf") from e
            if self.n_threads:
                torch.set_num_threads(self.n_threads)
            kw = {"gguf_file": self.path.name} if self.path.is_file() else {}
            kw["local_files_only"] = True  # a local file or folder only: never the hub
            src = str(self.path.parent if self.path.is_file() else self.path)
            try:
                self._tok = AutoTokenizer.from_pretrained(src, **kw)
                self._model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **kw).to(self.device)
            except (OSError, ValueError) as e:
                raise LLMUnavailable(f"{self.name}: transformers could not load {self.path}: {e}") from e
            self._model.eval()
        return self._model, self._tok

    def _prompt_ids(self, messages: list[Message]) -> torch.Tensor:
        _, tok = self._load()
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return ids["input_ids"].to(self.device)

    def _json_processor(self, schema: dict):
        try:
            import xgrammar as xgr
        except ImportError as e:
            raise LLMUnavailable("xgrammar is not installed: pip install xgrammar") from e
        import json

        model, tok = self._load()
        if self._grammar is None:
            info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=model.config.vocab_size)
            self._grammar = xgr.GrammarCompiler(info)
        compiled = self._grammar.compile_json_schema(json.dumps(schema))
        return xgr.contrib.hf.LogitsProcessor(compiled)

    def _complete(self, messages, *, max_tokens, temperature, json_schema) -> Completion:
        model, tok = self._load()
        ids = self._prompt_ids(messages)
        kw: dict = dict(max_new_tokens=max_tokens, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        if temperature > 0:
            torch.manual_seed(self.seed)
            kw.update(do_sample=True, temperature=temperature)
        else:
            kw.update(do_sample=False)
        if json_schema is not None:
            kw["logits_processor"] = [self._json_processor(json_schema)]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        dt = time.perf_counter() - t0
        new = out[0, ids.shape[1]:]
        text = tok.decode(new, skip_special_tokens=True)
        finish = "length" if len(new) >= max_tokens else "stop"
        return Completion(text, int(ids.shape[1]), int(len(new)), dt, finish)

    def _score(self, messages: list[Message], options: list[str]) -> tuple[list[OptionScore], int]:
        """log P(option | prompt): the prompt is run once, each option continues from a copy of its KV cache
        (a copy, not a crop: the cache's crop API has changed across transformers versions)."""
        model, tok = self._load()
        prompt = self._prompt_ids(messages)
        n = prompt.shape[1]
        out = []
        # transformers renamed `past_key_values` to `cache` (5.x, old name removed in 5.40): use what forward takes
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with self._lock, torch.inference_mode():
            res = model(prompt, use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(res.logits[0, -1].double(), dim=-1)
            cache = res[key]
            for opt in options:
                oid = tok(opt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)
                total = first[oid[0, 0]].item()
                if oid.shape[1] > 1:  # logits after each option token but the last score the next one
                    r = model(oid[:, :-1], use_cache=True, **{key: copy.deepcopy(cache)})
                    logp = torch.log_softmax(r.logits[0].double(), dim=-1)
                    total += logp.gather(1, oid[0, 1:, None]).sum().item()
                out.append(OptionScore(opt, float(total), int(oid.shape[1])))
        return out, int(n)
