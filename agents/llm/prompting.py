"""Client-side chat templates, for engines that score a raw prompt (completions APIs, vLLM prompt logprobs)."""
from __future__ import annotations

from agents.llm.base import Message, text_of


def render_chat(messages: list[Message], template: str = "chatml") -> str:
    """The prompt text the model sees before its reply (generation prompt included); images are dropped, so a
    vision backend scores options on the text (its chat calls carry the images)."""
    messages = [{**m, "content": text_of(m["content"])} for m in messages]
    if template == "chatml":  # SmolLM2, Qwen2/2.5/3, many others
        body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return body + "<|im_start|>assistant\n"
    if template == "llama3":
        body = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
        return "<|begin_of_text|>" + body + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    if template == "plain":
        return "".join(f"{m['role'].upper()}: {m['content']}\n" for m in messages) + "ASSISTANT: "
    raise ValueError(f"unknown prompt template {template!r}")
