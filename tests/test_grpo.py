"""GRPO (issue 12): rewards, the zoom-in ROI input, the VQA builder, two GRPO steps for text and a tiny VLM,
and the LoRA adapter in llama.cpp's GGUF form."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.grpo_rewards import (accuracy_reward, completion_text, format_reward, match_choice, parse_answer,
                                   validity_reward)
from core.imaging.roi_zoom import ZoomConfig, crop_box, embed_roi

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "cases"
torch.set_num_threads(2)


def _msg(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_rewards_read_the_format_the_choice_and_the_roi():
    good = "<think>Right-sided fluid.</think><answer>B) right</answer>"
    assert format_reward([_msg(good), _msg("right"), _msg("<answer>right</answer>")]) == [1.0, 0.0, 0.0]
    choices = ["left", "right", "bilateral"]
    assert match_choice("B", choices) == "right" and match_choice("(b) right", choices) == "right"
    assert match_choice("b) left", choices) is None  # letter and text disagree
    assert match_choice(" Right. ", choices) == "right" and match_choice("middle", choices) is None
    comps = [_msg(good), _msg("<think>x</think><answer>left</answer>"), _msg("<think>x</think><answer>up</answer>")]
    kw = dict(answer=["right"] * 3, choices=[choices] * 3)
    assert accuracy_reward(comps, **kw) == [1.0, 0.0, 0.0]
    # a box on the image's left half is the patient's right: "left" is ruled out by the ROI, "up" by the options
    roi = [[10, 40, 30, 60]] * 3
    assert validity_reward(comps, roi=roi, image_width=[100] * 3, kind=["location"] * 3, **kw) == [1.0, 0.0, 0.0]
    assert validity_reward(comps, kind=["type"] * 3, **kw) == [1.0, 1.0, 0.0]
    assert completion_text("plain") == "plain" and parse_answer("no tags") is None


def test_zoom_inset_magnifies_the_region_in_the_far_corner():
    img = np.zeros((100, 100), np.uint8)
    img[70:80, 10:20] = 255  # a bright lesion, lower left
    out = np.asarray(embed_roi(img, [10, 70, 20, 80], ZoomConfig(inset_fraction=0.4, margin=0.25)))
    assert out.shape == (100, 100, 3)
    inset = out[2:42, 58:98]  # top-right corner, away from the box
    # the 10 px lesion (1% of the image) fills (10 / 18)^2 of the inset: boxes under 12 px grow to 12, + 25% margins
    assert (inset[..., 0] > 128).mean() == pytest.approx((10 / 18) ** 2, abs=0.05)
    assert out[50:65, 35:55].max() == 0  # elsewhere untouched
    left, top, right, bottom = crop_box([10, 70, 20, 80], 100, 100, ZoomConfig(margin=0.25))
    assert right - left == bottom - top and left <= 10 and right >= 20
    with pytest.raises(ValueError, match="not inside"):
        embed_roi(img, [90, 90, 120, 95])


def test_vqa_builder_writes_a_loadable_folder(tmp_path: Path):
    import datasets

    from training.vqa import box_side, build_vqa

    n = build_vqa(EXAMPLES, tmp_path, seed=1, limit=3)
    ds = datasets.load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    assert len(ds) == n > 6
    kinds = set(ds["kind"])
    assert {"presence", "type", "diagnosis"} <= kinds
    for r in ds:
        assert r["answer"] in r["choices"]
        if r["roi"]:
            w, h = r["image"].size
            assert 0 <= r["roi"][0] < r["roi"][2] <= w and 0 <= r["roi"][1] < r["roi"][3] <= h
        if r["kind"] == "location" and r["answer"] in ("right", "left"):
            assert box_side(r["roi"], r["image"].size[0]) == r["answer"]  # truth and mask agree on the side
    meta = [json.loads(x) for x in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    reports = [load for load in (EXAMPLES / "s2026-0000" / "case.yaml").read_text().splitlines() if "Impression" in load]
    assert not any(r[:40] in m["question"] for m in meta for r in reports)  # no report text leaks into questions


def _solved_rows():
    from knowledge.learn import SolvedCase
    from training.grpo_data import diagnosis_example

    res = [{"id": "cxr_analysis:xr", "tool": "cxr_analysis", "study_id": "xr", "status": "ok", "error": None,
            "summary": "pleural effusion (p=0.91), right; cardiomegaly absent (p=0.08).", "input_from": [],
            "findings": [{"label": "pleural_effusion", "present": True, "probability": 0.91}]}]
    cases = [SolvedCase(f"c{i}", dx, "chest", f"<case>\nPatient: {60 + i}-year-old\nComplaint: dyspnoea\n</case>", res)
             for i, dx in enumerate(["heart_failure", "pneumonia", "normal", "pneumothorax"])]
    return [diagnosis_example(c) for c in cases]


def test_diagnosis_prompt_carries_the_evidence_candidates_and_format():
    row = _solved_rows()[0]
    user = row["prompt"][-1]["content"]
    assert "[cxr_analysis:xr] pleural effusion (p=0.91)" in user and "<answer></answer>" in user
    assert row["answer"] == "congestive heart failure" and row["answer"] in row["choices"] and len(row["choices"]) > 5


def _diversity(completions, **kw):  # varies across random completions, so GRPO has an advantage to follow
    return [len(set(completion_text(c))) / 50 for c in completions]


def _lora_b(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}


def test_two_grpo_steps_tiny_vlm_on_zoomed_vqa(tmp_path: Path):
    from training.grpo import GrpoSettings, train
    from training.vqa import build_vqa

    build_vqa(EXAMPLES, tmp_path / "vqa", seed=0, limit=2)
    s = GrpoSettings(mode="vlm", model="tiny", data=[tmp_path / "vqa"], out=tmp_path / "run", steps=2,
                     num_generations=2, prompts_per_step=2, max_completion_length=8, limit=8, learning_rate=1e-2)
    out = train(s, extra_rewards=(_diversity,))
    tr = out["trainer"]
    assert out["steps"] == 2
    names = [k for call in tr.reward_log.calls for k in call]
    for f in ("format_reward", "accuracy_reward", "validity_reward"):
        vals = [v for call in tr.reward_log.calls for v in call.get(f, [])]
        assert names.count(f) == 2 and len(vals) == 8 and all(v in (0.0, 1.0) for v in vals)
    b = _lora_b(tr.model)
    assert b and any(t.abs().sum() > 0 for t in b.values())  # LoRA B starts at zero: GRPO moved it
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


def test_two_grpo_steps_text_mode(tmp_path: Path):
    from training.grpo import GrpoSettings, train

    data = tmp_path / "solved.jsonl"
    from dataclasses import asdict

    from knowledge.learn import SolvedCase
    rows = _solved_rows()
    data.write_text("\n".join(json.dumps(asdict(SolvedCase(r["case_id"], dx, "chest", "<case>\nx\n</case>", [])))
                              for r, dx in zip(rows, ["heart_failure", "pneumonia", "normal", "pneumothorax"])))
    s = GrpoSettings(mode="text", model="tiny", data=[data], out=tmp_path / "run", steps=2, num_generations=2,
                     prompts_per_step=2, max_completion_length=8, held_out=0.0, learning_rate=1e-2)
    out = train(s, extra_rewards=(_diversity,))
    calls = out["trainer"].reward_log.calls
    assert sum("accuracy_reward" in c for c in calls) == 2
    assert any(t.abs().sum() > 0 for t in _lora_b(out["trainer"].model).values())


def test_llama_cpp_backend_names_a_missing_adapter():
    from agents.llm.base import LLMUnavailable
    from agents.llm.llama_cpp import LlamaCppBackend

    with pytest.raises(LLMUnavailable, match="no_such_adapter.gguf"):
        LlamaCppBackend(name="local", model="", lora="checkpoints/no_such_adapter.gguf")


@pytest.mark.slow
def test_gguf_lora_export_matches_peft_in_llama_cpp(tmp_path: Path):
    """A PEFT LoRA on SmolLM2, exported, shifts llama.cpp's logits the way it shifts transformers + PEFT's; without the
    Q/K row permutation the shift points elsewhere (the layout check).

    Shifts, not raw logits, and over every position of the prompt: the GGUF is 8-bit, so llama.cpp's base logits sit
    ~25 (L2) from transformers' and a single position's comparison flipped with the LoRA's random init (CI saw it).
    Measured 2026-11-30: q/k-only cosine 0.73-0.95 exported vs -0.18-0.30 unpermuted (inits 0-5); q/k/v/o cosine
    0.81-0.93 (inits 0-11)."""
    from llama_cpp import Llama
    from peft import LoraConfig, get_peft_model

    import training.lora_gguf as lg
    from agents.llm.llama_cpp import default_gguf
    from training.grpo import load_text_model

    text = "<|im_start|>user\nWhat is the most likely diagnosis for a pleural effusion?<|im_end|>\n<|im_start|>assistant\n"

    def cpp(lora: Path | None) -> np.ndarray:
        kw = dict(lora_path=str(lora)) if lora else {}
        m = Llama(model_path=str(default_gguf()), n_ctx=256, logits_all=True, verbose=False, n_threads=2, **kw)
        toks = m.tokenize(text.encode(), add_bos=False, special=True)
        m.eval(toks)
        return np.array(m.scores[: m.n_tokens])

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        return float(a.ravel() @ b.ravel() / np.linalg.norm(a) / np.linalg.norm(b))

    def adapter(modules: list[str], scale: float, name: str) -> tuple[np.ndarray, Path]:
        """(transformers' logit shift, the saved PEFT folder); seeded, so the LoRA's A init is fixed too."""
        torch.manual_seed(0)
        model, tok = load_text_model("smollm2")
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            before = model(ids).logits[0].numpy()
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=modules))
        g = torch.Generator().manual_seed(0)
        for n, p in sorted(pm.named_parameters()):
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=g) * scale
        with torch.no_grad():
            after = pm(ids).logits[0].numpy()
        pm.save_pretrained(str(tmp_path / name))
        return after - before, tmp_path / name

    base = cpp(None)
    qk_shift, qk = adapter(["q_proj", "k_proj"], 0.1, "qk")
    good = lg.export_lora_gguf(qk, tmp_path / "good.gguf")
    orig = lg.permute_rows
    try:
        lg.permute_rows = lambda w, n: w
        bad = lg.export_lora_gguf(qk, tmp_path / "bad.gguf")
    finally:
        lg.permute_rows = orig
    c_good, c_bad = cos(cpp(good) - base, qk_shift), cos(cpp(bad) - base, qk_shift)
    assert c_good > 0.6 and c_bad < 0.45 and c_good > c_bad + 0.3, (c_good, c_bad)

    all_shift, every = adapter(["q_proj", "k_proj", "v_proj", "o_proj"], 0.05, "all")
    c_all = cos(cpp(lg.export_lora_gguf(every, tmp_path / "all.gguf")) - base, all_shift)
    assert c_all > 0.7, c_all


def test_reasoning_backend_answers_from_its_reasoning_and_falls_back():
    from agents.llm.base import Completion, LLMBackend, OptionScore
    from agents.llm.reasoning import REJECT_LOGPROB, ReasoningBackend

    class Engine(LLMBackend):
        def __init__(self, reply: str):
            super().__init__(name="e", model="m")
            self.reply, self.seen = reply, []

        def _complete(self, messages, *, max_tokens, temperature, json_schema):
            self.seen.append(messages[-1]["content"])
            return Completion(self.reply, 10, 5, 0.01)

        def _score(self, messages, options):
            return [OptionScore(o, -float(i), 1) for i, o in enumerate(options)], 10

    opts = ["pneumonia", "heart failure", "normal"]
    rb = ReasoningBackend(name="r", model="", inner=Engine("<think>Fever and consolidation.</think>"
                                                           "<answer>B) heart failure</answer>"))
    s = rb.score_options([{"role": "user", "content": "case"}], opts)
    assert s.best == "heart failure" and rb.answered == 1 and "consolidation" in rb.last_reasoning
    assert {x.option: x.logprob for x in s.scores}["normal"] == REJECT_LOGPROB
    assert "Options: pneumonia; heart failure; normal." in rb.inner.seen[-1] and "<answer>" in rb.inner.seen[-1]
    assert rb.chat([{"role": "user", "content": "q"}]) == "B) heart failure"  # the answer, reasoning kept aside
    lost = ReasoningBackend(name="r", model="", inner=Engine("I am not sure."))
    assert lost.score_options([{"role": "user", "content": "case"}], opts).best == "pneumonia"  # engine's own
    assert lost.fell_back == 1


def test_reasoning_flag_wraps_the_configured_engine():
    from agents.llm.factory import backend_from_config
    from agents.llm.reasoning import ReasoningBackend
    from core.config import BackendConfig

    be = backend_from_config("reasoner", BackendConfig(kind="openai", model="medreason-r1",
                                                       base_url="http://127.0.0.1:8000/v1", reasoning=True))
    assert isinstance(be, ReasoningBackend) and be.model == "medreason-r1 (reasoning)"


def test_a_reasoning_models_answer_survives_calibration_even_when_it_is_also_its_empty_case_answer():
    """Contextual calibration subtracts a model's likelihoods on an empty case. A reasoning model's answer is not a
    likelihood: subtracting its answer to the empty case used to cancel its real answer exactly whenever the two
    coincided. Its fall-back likelihoods are still calibrated (against its engine's)."""
    from agents.diagnostician import PERSONAS, diagnose
    from agents.llm.base import Completion, LLMBackend, OptionScore
    from agents.llm.reasoning import ReasoningBackend
    from core.catalogue import load_catalogue

    class Engine(LLMBackend):
        reply = "<think>Fever, cough.</think><answer>pulmonary tuberculosis</answer>"

        def _complete(self, messages, *, max_tokens, temperature, json_schema):
            return Completion(self.reply, 10, 5, 0.01)

        def _score(self, messages, options):  # likelihoods biased to pneumonia, on the empty case and any other
            return [OptionScore(o, 0.0 if o == "community-acquired pneumonia" else -3.0, 1) for o in options], 1

    cat = load_catalogue()
    case = dict(persona=PERSONAS[0], cat=cat, domain="chest", tool_results=[], insights=[], round_=1, peers=[],
                previous=None, write_rationale=False, summary="<case>\nCough for six weeks, night sweats.\n</case>")
    rb = ReasoningBackend(name="r", model="", inner=Engine(name="e", model="m"))
    op = diagnose(agent="a", llm=rb, **case)
    assert rb.answered == 1 and op.diagnosis == "tuberculosis" and op.differential[0].probability > 0.5
    Engine.reply = "I am not sure."  # no valid answer: its engine's likelihoods, calibrated, so the bias cancels
    op = diagnose(agent="a", llm=rb, **case)
    assert rb.fell_back == 1 and op.differential[0].probability < 0.5, op.differential


def test_shipped_adapter_makes_the_embedded_model_answer_in_format():
    """checkpoints/smollm2_grpo_lora.gguf in the embedded engine: the base model ignores the answer format, the
    adapted one reasons in tags and names one of the candidates (evals/grpo.py has the held-out numbers)."""
    from agents.llm.llama_cpp import LlamaCppBackend
    from training.grpo_rewards import THINK_ANSWER

    row = _solved_rows()[0]
    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / "smollm2_grpo_lora.gguf"
    out = {}
    for name, lora in (("base", None), ("adapted", str(ckpt))):
        be = LlamaCppBackend(name=name, model="", n_ctx=2048, n_threads=2, lora=lora, temperature=0.0)
        out[name] = be.chat(row["prompt"], max_tokens=64)
        be.close()
    assert not THINK_ANSWER.match(out["base"])
    assert THINK_ANSWER.match(out["adapted"]), out["adapted"]
    assert match_choice(parse_answer(out["adapted"]), row["choices"]) is not None


def test_vqa_cli_names_a_broken_case_file_and_keeps_earlier_output(tmp_path: Path, capsys):
    from training.vqa import main

    cases, out = tmp_path / "cases", tmp_path / "vqa"
    (cases / "bad").mkdir(parents=True)
    (cases / "bad" / "case.yaml").write_text("id: bad\npatient: {age: 200, sex: F}\npresentation: {complaint: x}\n")
    out.mkdir()
    (out / "metadata.jsonl").write_text("earlier\n")
    with pytest.raises(SystemExit) as e:
        main([str(cases), str(out)])
    assert "case.yaml" in str(e.value) and "patient.age" in str(e.value)
    assert (out / "metadata.jsonl").read_text() == "earlier\n"
