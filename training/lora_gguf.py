"""A PEFT LoRA adapter of a Llama-architecture model as a llama.cpp GGUF adapter (what `Llama(lora_path=)` loads).

The layout is llama.cpp's `convert_lora_to_gguf.py`: `general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha`, and per adapted weight `<gguf name>.lora_a` (r x in) and `.lora_b` (out x r).
Llama GGUFs store Q and K with their rows permuted for llama.cpp's rotary layout (and transformers
un-permutes them when it loads a GGUF), so B of q_proj/k_proj gets the same row permutation.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

HF_TO_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_KEY = re.compile(r"(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's `LlamaModel.permute` on the rows of `w` (n_head = heads of that projection)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def export_lora_gguf(adapter_dir: Path, out: Path, *, n_head: int | None = None, n_head_kv: int | None = None,
                     architecture: str = "llama") -> Path:
    """Write `adapter_dir` (PEFT `save_pretrained`: adapter_config.json + adapter_model.safetensors) to `out`.
    Head counts default to the embedded SmolLM2's (read from its GGUF)."""
    import gguf
    from safetensors.numpy import load_file

    adapter_dir, out = Path(adapter_dir), Path(out)
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if n_head is None or n_head_kv is None:
        n_head, n_head_kv = base_heads()
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, t in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        m = _KEY.search(key)
        if not m or m.group(2) not in HF_TO_GGUF:
            raise ValueError(f"{adapter_dir}: adapter tensor {key!r} is not a Llama attention/MLP LoRA weight")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t.astype(np.float32)
    w = gguf.GGUFWriter(str(out), architecture)
    w.add_string("general.type", "adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", float(cfg["lora_alpha"]))
    for (layer, proj), ab in sorted(pairs.items()):
        a, b = ab["A"], ab["B"]
        if proj == "q_proj":
            b = permute_rows(b, n_head)
        elif proj == "k_proj":
            b = permute_rows(b, n_head_kv)
        name = f"blk.{layer}.{HF_TO_GGUF[proj]}.weight"
        w.add_tensor(name + ".lora_a", np.ascontiguousarray(a))
        w.add_tensor(name + ".lora_b", np.ascontiguousarray(b))
    out.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def base_heads(path: Path | None = None) -> tuple[int, int]:
    """(attention heads, KV heads) of a llama GGUF (default: the embedded SmolLM2)."""
    import gguf

    from agents.llm.llama_cpp import default_gguf
    r = gguf.GGUFReader(str(path or default_gguf()))

    def val(k: str) -> int:
        f = r.fields[k]
        return int(f.parts[f.data[0]][0])

    return val("llama.attention.head_count"), val("llama.attention.head_count_kv")
