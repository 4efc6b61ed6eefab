"""A vision-language panel member sees the tools' images, ROIs zoomed in; text-only engines never get images.

The OpenAI-compatible path runs against a small stand-in HTTP server that records every request (what a served
VLM would receive); the graph path runs a real consultation on an example CT case with tools on.
"""
from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from agents.consult import Consultation
from agents.diagnostician import PERSONAS, diagnose
from agents.llm.base import Completion, LLMBackend, OptionScore, text_of
from agents.llm.factory import BackendPool, backend_from_config
from agents.views import View, case_views, with_views
from core.case import Modality
from core.catalogue import load_catalogue
from core.config import BackendConfig, load_settings
from core.synth.chest import PlantedFinding
from tests.test_tool_ct import phantom
from tools.base import RunContext
from tools.ct_analysis import CTAnalysis

CAT = load_catalogue()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "cases"


def _png(b64_url: str) -> Image.Image:
    assert b64_url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(b64_url.split(",", 1)[1])))


@pytest.fixture(scope="module")
def nodule_ct(tmp_path_factory):
    """ct_analysis on a phantom with a 20 mm right nodule: its result and its artefact folder."""
    out = tmp_path_factory.mktemp("art")
    vol, _ = phantom([PlantedFinding("lung_nodule", side="right", size_mm=20)], seed=6)
    res = CTAnalysis(device="cpu").run(vol, {"write_overlay": True},
                                       ctx=RunContext(study_id="ct", modality=Modality.CT, artefact_dir=out))
    assert res.status == "ok", res.error
    return res.model_dump(), out


def test_ct_overlay_marks_the_nodule_as_its_region_of_interest(nodule_ct):
    res, out = nodule_ct
    [art] = res["artefacts"]
    x0, y0, x1, y1 = art["roi"]
    px = np.asarray(Image.open(out / art["path"]))
    red = (px[..., 0] > 200) & (px[..., 1] < 80) & (px[..., 2] < 80)  # the lesion outline
    ys, xs = np.nonzero(red)
    assert len(xs) > 10
    assert x0 - 1 <= xs.min() and xs.max() <= x1 + 1 and y0 - 1 <= ys.min() and ys.max() <= y1 + 1
    assert 0 <= x0 < x1 <= px.shape[1] and 0 <= y0 < y1 <= px.shape[0]
    assert (x1 - x0) < px.shape[1] / 3  # a region, not the whole slice


def test_case_views_zoom_the_roi_order_and_limit(nodule_ct, tmp_path):
    res, out = nodule_ct
    plain = Image.new("RGB", (1200, 600), (40, 40, 40))
    plain.save(out / "other.png")
    other = {"id": "cxr_analysis:xr", "status": "ok", "artefacts": [
        {"id": "cxr_analysis:xr:overlay", "kind": "png", "path": "other.png", "description": "radiograph"},
        {"id": "cxr_analysis:xr:gone", "kind": "png", "path": "missing.png"},
        {"id": "cxr_analysis:xr:nii", "kind": "nifti", "path": "x.nii.gz"}]}
    failed = {"id": "mar:ct", "status": "failed", "artefacts": [
        {"id": "mar:ct:slice", "kind": "png", "path": "other.png"}]}
    views = case_views([other, failed, res], out, max_side=512)
    assert [v.artefact for v in views] == ["ct_analysis:ct:overlay", "cxr_analysis:xr:overlay"]  # ROI first
    assert [v.cite for v in views] == ["ct_analysis:ct", "cxr_analysis:xr"] and views[0].zoomed
    assert max(_png(views[1].data_url()).size) == 512  # large images are shrunk
    raw = np.asarray(Image.open(out / res["artefacts"][0]["path"]).convert("RGB"))
    shown = np.asarray(_png(views[0].data_url()).convert("RGB"))
    assert shown.shape == raw.shape and (shown != raw).any(axis=-1).mean() > 0.05  # the inset is embedded
    assert len(case_views([other, res], out, max_images=1)) == 1
    assert case_views([res], None) == []
    # a truncated PNG is passed over; an ROI outside its image is shown without the inset, never an error
    (out / "broken.png").write_bytes((out / "other.png").read_bytes()[:100])
    bad = {"id": "saint:ct", "status": "ok", "artefacts": [
        {"id": "saint:ct:coronal", "kind": "png", "path": "broken.png", "roi": [1, 1, 5, 5]},
        {"id": "saint:ct:outside", "kind": "png", "path": "other.png", "roi": [1100, 10, 1300, 90]}]}
    [v] = case_views([bad], out, max_side=2000)
    assert v.artefact == "saint:ct:outside" and not v.zoomed
    assert np.array_equal(np.asarray(_png(v.data_url()).convert("RGB")), np.asarray(plain))


def test_views_go_only_into_the_last_user_message():
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "case text"}]
    assert with_views(msgs, []) is msgs
    v = View("t:s", "t:s:overlay", "a slice", b"\x89PNG", zoomed=True)
    out = with_views(msgs, [v])
    assert out[0] == msgs[0] and msgs[1]["content"] == "case text"  # the caller's list is untouched
    parts = out[1]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text"]
    assert "[t:s]" in parts[0]["text"] and "inset" in parts[0]["text"] and parts[2]["text"] == "case text"
    assert text_of(parts) == parts[0]["text"] + "\ncase text"


class VLMServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible stand-in for a served MedReason-R1 checkpoint: records requests, reasons, answers."""

    seen: list[dict] = []
    answer = "lung cancer"

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, **body})
        if self.path.endswith("/chat/completions"):
            wants_json = "response_format" in body
            text = ('{"claims": [{"statement": "A spiculated right nodule is seen", "cites": ["ct_analysis:ct"]}]}'
                    if wants_json else "<think>Nothing to see.</think><answer>community-acquired pneumonia</answer>"
                    if "N/A" in json.dumps(body["messages"])  # the content-free calibration prompt
                    else f"<think>The inset shows a nodule.</think><answer>{self.answer}</answer>")
            reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": text}}],
                     "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        elif self.path.endswith("/completions"):  # likelihoods (echo + logprobs): a flat -1 per character
            toks = [*body["prompt"], "."]
            reply = {"id": "y", "object": "text_completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "text": ".", "finish_reason": "length",
                                  "logprobs": {"tokens": toks, "token_logprobs": [-1.0] * len(toks),
                                               "top_logprobs": None, "text_offset": list(range(len(toks)))}}],
                     "usage": {"prompt_tokens": len(toks) - 1, "completion_tokens": 1, "total_tokens": len(toks)}}
        else:
            self.send_response(404)
            self.end_headers()
            return
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


@pytest.fixture()
def vlm_server():
    VLMServer.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), VLMServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_a_served_reasoning_vlm_sees_the_zoomed_images_and_answers(nodule_ct, vlm_server):
    res, out = nodule_ct
    be = backend_from_config("vlm", BackendConfig(kind="openai", model="medreason-r1", base_url=vlm_server,
                                                  vision=True, reasoning=True))
    assert be.vision
    views = case_views([res], out)
    op = diagnose(agent="radiologist-1", persona=PERSONAS[0], llm=be, cat=CAT, domain="chest",
                  summary="<case>\n64-year-old smoker with haemoptysis.\n</case>", tool_results=[res], insights=[],
                  round_=1, peers=[], previous=None, views=views)
    with_images = [r for r in VLMServer.seen if any(isinstance(m["content"], list) for m in r.get("messages", []))]
    assert with_images, "no request carried the images"
    for r in with_images:
        parts = next(m["content"] for m in r["messages"] if isinstance(m["content"], list))
        urls = [p["image_url"]["url"] for p in parts if p["type"] == "image_url"]
        assert len(urls) == 1 and _png(urls[0]).size == Image.open(out / res["artefacts"][0]["path"]).size
        assert any("[ct_analysis:ct]" in p.get("text", "") for p in parts)
    assert all("N/A" in r["prompt"] for r in VLMServer.seen if "prompt" in r)  # only the calibration is scored
    ranking = [r for r in with_images if "<answer>" in str(r["messages"][-1]["content"])]
    assert ranking, "the reasoning call that ranks the candidates did not carry the images"
    assert op.images == ["ct_analysis:ct:overlay"]
    assert op.diagnosis == "lung_cancer"  # the model's answer (its only say in the ranking here) plus the evidence
    assert any(c.cites == ["ct_analysis:ct"] and "nodule" in c.statement for c in op.rationale)


class Recorder(LLMBackend):
    """Records what the engine is handed; leans to pneumonia."""

    def __init__(self, name: str, vision: bool):
        super().__init__(name=name, model=f"rec-{name}", vision=vision)
        self.got: list[list[dict]] = []

    def _complete(self, messages, *, max_tokens, temperature, json_schema):
        self.got.append(messages)
        return Completion('{"tools": []}' if json_schema and "tools" in json_schema.get("properties", {})
                          else '{"claims": []}' if json_schema else "ok", 1, 1, 0.0)

    def _score(self, messages, options):
        self.got.append(messages)
        return [OptionScore(o, 0.0 if o == "Pneumonia" else -30.0, 1) for o in options], 1


class Pool(BackendPool):
    def __init__(self, settings, panel):
        super().__init__(settings)
        self.panel = panel

    def for_role(self, role):
        return self.panel if role == "diagnosticians" else [self.panel[1]]


def _images_in(calls: list[list[dict]]) -> int:
    return sum(p.get("type") == "image_url" for msgs in calls for m in msgs
               if isinstance(m["content"], list) for p in m["content"])


def test_consultation_shows_images_to_the_vision_member_only(tmp_path):
    s = load_settings(env={})
    panel = [Recorder("vlm", vision=True), Recorder("text", vision=False), Recorder("text2", vision=False)]
    c = Consultation(s, tmp_path / "state.sqlite", artefact_root=tmp_path / "art", llms=Pool(s, panel))
    out = c.run(EXAMPLES / "s2026-0002")
    assert _images_in(panel[0].got) > 0
    assert _images_in(panel[1].got) == 0 and _images_in(panel[2].got) == 0
    assert all(isinstance(m["content"], str) for msgs in panel[1].got for m in msgs)
    shown = {a for msgs in panel[0].got for m in msgs if isinstance(m["content"], list)
             for p in m["content"] if p["type"] == "text" and p["text"].startswith("Image [")
             for a in [p["text"].split("]")[0][7:]]}
    assert shown and all(":" in a for a in shown)  # labelled with the evidence ids the rationale can cite
    assert out.verdict.diagnosis == "lung_cancer"  # the case's truth: the tools' evidence outweighs the scripts


def test_text_only_engines_get_text_even_if_handed_images():
    rec = Recorder("t", vision=False)
    msgs = with_views([{"role": "user", "content": "case"}],
                      [View("a:b", "a:b:c", "d", b"x", False)])
    rec.chat(msgs)
    rec.score_options(msgs, ["Pneumonia", "Normal"])
    assert all(isinstance(m["content"], str) and m["content"].endswith("case") for call in rec.got for m in call)


@pytest.mark.parametrize("kind", ["llama_cpp", "transformers"])
def test_vision_needs_a_served_vlm(kind):
    with pytest.raises(ValidationError, match="vision = true needs kind"):
        BackendConfig(kind=kind, vision=True)
    assert BackendConfig(kind="vllm", model="m", vision=True).max_images == 4
