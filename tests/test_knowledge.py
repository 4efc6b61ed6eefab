"""Knowledge store: versions, provenance, atomic publish, offline embeddings, retrieval in the graph."""
import socket

import pytest

from knowledge.schema import Insight
from knowledge.store import KnowledgeStore
from knowledge.transfer import diff, export_jsonl, import_jsonl


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a non-loopback socket fails the test."""
    real = socket.socket.connect

    def guarded(self, addr):
        host = addr[0] if isinstance(addr, tuple) else addr
        if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
            raise AssertionError(f"network access attempted: {addr}")
        return real(self, addr)

    monkeypatch.setattr(socket.socket, "connect", guarded)


def _ins(text, disease="pneumonia", kind="general", **kw):
    return Insight(text=text, disease=disease, kind=kind, source_model="test-model", provenance=["c1", "c2"], **kw)


def test_versions_and_provenance(tmp_path):
    s = KnowledgeStore(tmp_path)
    assert s.current_version() == 0 and s.query("fever and consolidation") == []
    v1 = s.publish([_ins("Lobar consolidation with fever favours pneumonia."),
                    _ins("Effusion volume above 200 mL", "heart_failure", "statistic", finding="pleural_effusion",
                         rate_with=0.8, rate_without=0.1, support=10)])
    v2 = s.publish([_ins("Air bronchograms within consolidation suggest infection.")])
    assert (v1, v2) == (1, 2) and s.current_version() == 2
    assert [i.text for i in s.insights()] == ["Air bronchograms within consolidation suggest infection."]
    old = s.insights(1)
    assert len(old) == 2 and all(i.version == 1 and i.provenance == ["c1", "c2"] for i in old)
    assert all(i.id.startswith("insight:v1:") for i in old)
    only_a, only_b = diff(s, 1, 2)
    assert len(only_a) == 2 and len(only_b) == 1
    s.set_current(1)
    hit = s.query("fever, productive cough, lobar consolidation", domain="chest", k=1)
    assert hit[0].text.startswith("Lobar consolidation")


def test_crash_mid_publish_keeps_previous_version(tmp_path, monkeypatch):
    s = KnowledgeStore(tmp_path)
    s.publish([_ins("criterion one")])
    import knowledge.store as ks

    def crash(self, m):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ks.KnowledgeStore, "_write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        s.publish([_ins("half-written criterion")])
    monkeypatch.undo()
    s2 = KnowledgeStore(tmp_path)  # a fresh process's view
    assert s2.current_version() == 1 and [i.text for i in s2.insights()] == ["criterion one"]
    assert all("half-written" not in i.text for i in s2.query("criterion", k=5))
    v = s2.publish([_ins("criterion two")])  # the stray entries of the unfinished version are cleaned
    assert v == 2 and s2.count(2) == 1 and s2.count(1) == 1
    assert {c if isinstance(c, str) else c.name for c in s2.client.list_collections()} == {"insights_v1", "insights_v2"}


def test_export_import_moves_knowledge(tmp_path):
    a = KnowledgeStore(tmp_path / "a")
    a.publish([_ins("Cavitation in an upper-lobe lesion suggests tuberculosis.", "tuberculosis", "rare")])
    n = export_jsonl(a, tmp_path / "k.jsonl")
    b = KnowledgeStore(tmp_path / "b")
    v = import_jsonl(b, tmp_path / "k.jsonl")
    got = b.insights(v)
    assert n == 1 and got[0].disease == "tuberculosis" and got[0].source_model == "test-model"
    (tmp_path / "bad.jsonl").write_text('{"text": ""}\n')
    from core.errors import CaseDataError

    with pytest.raises(CaseDataError, match="line 1"):
        import_jsonl(b, tmp_path / "bad.jsonl")


def test_learned_statistics_change_the_evidence_term():
    from agents.evidence import learned_rates, log_likelihood, observations
    from core.catalogue import load_catalogue

    cat = load_catalogue()
    results = [{"id": "t:ct", "status": "ok", "findings": [{"label": "pleural_effusion", "present": True}]}]
    obs = observations(results, cat)
    hf = cat.diseases["heart_failure"]
    before = log_likelihood(hf, obs)
    stat = _ins("x", "heart_failure", "statistic", finding="pleural_effusion", rate_with=0.2, rate_without=0.1,
                support=20).model_dump()
    after = log_likelihood(hf, obs, learned_rates([stat]))
    assert after < before  # the tools rarely report effusion in heart failure: weaker evidence


def _solved(cid, dx, findings, domain="chest"):
    from knowledge.learn import SolvedCase

    return SolvedCase(cid, dx, domain, "<case>x</case>", [{"id": "ct_analysis:ct", "status": "ok", "summary": "CT read",
                                                          "findings": [{"label": k, "present": v}
                                                                       for k, v in findings.items()]}])


def test_statistics_are_computed_from_tool_reports_with_their_numbers():
    from core.catalogue import load_catalogue
    from knowledge.learn import statistics

    cases = ([_solved(f"hf{i}", "heart_failure", {"pleural_effusion": i < 8, "consolidation": False})
              for i in range(10)] +
             [_solved(f"pn{i}", "pneumonia", {"pleural_effusion": i < 2, "consolidation": i < 9}) for i in range(10)])
    ins = {(i.disease, i.finding): i for i in statistics(cases, load_catalogue())}
    hf = ins[("heart_failure", "pleural_effusion")]
    assert (hf.rate_with, hf.rate_without, hf.support) == (0.8, 0.2, 10)
    assert "80%" in hf.text and "20%" in hf.text and set(hf.provenance) == {f"hf{i}" for i in range(10)}
    assert ins[("pneumonia", "consolidation")].rate_with == 0.9


def test_refine_drops_statistics_that_hurt_validation():
    from core.catalogue import load_catalogue
    from knowledge.learn import refine, statistics

    cat = load_catalogue()
    # enough cases that the learned rates outweigh the guideline they update (evidence.PRIOR_CASES)
    learn = ([_solved(f"hf{i}", "heart_failure", {"pleural_effusion": True, "cardiomegaly": i < 54}) for i in range(60)]
             + [_solved(f"pn{i}", "pneumonia", {"pleural_effusion": False, "consolidation": True}) for i in range(60)])
    # validation where pneumonia comes with effusion: "pneumonia never has effusion", learned above, misleads
    val = [_solved(f"v{i}", "pneumonia", {"pleural_effusion": True, "consolidation": True}) for i in range(6)]
    final, report = refine(statistics(learn, cat), val, cat)
    hurt = [dx for dx, g in report["groups"].items() if g["gain"] < 0]
    assert hurt, report
    assert not any(i.disease in hurt and i.kind == "statistic" for i in final)
    assert report["accuracy_final"] > report["accuracy_all"]


def test_graph_retrieves_and_shows_insights(tmp_path, monkeypatch):
    import json

    from agents.consult import Consultation
    from core.config import load_settings
    from knowledge.apply import StoreKnowledge
    from tests.test_graph import PNEUMONIA, Measuring, ScriptedPool
    from tools import registry

    monkeypatch.setattr(registry, "_CLASSES", {"measuring": Measuring})
    monkeypatch.setattr(registry, "TOOL_MODULES", [])
    store = KnowledgeStore(tmp_path / "k")
    store.publish([_ins("Fever with lobar consolidation and raised CRP indicates bacterial pneumonia."),
                   _ins("Tools report consolidation in 90% of pneumonia cases", kind="statistic",
                        finding="consolidation", rate_with=0.9, rate_without=0.1, support=12)])
    s = load_settings(env={})
    pool = ScriptedPool(s, [["pneumonia"]] * 3)
    prompts = []
    for b in pool.panel:
        orig = b._score
        b._score = lambda m, o, orig=orig: (prompts.append(json.dumps(m)), orig(m, o))[1]
    c = Consultation(s, tmp_path / "s.sqlite", llms=pool, knowledge=StoreKnowledge(store))
    out = c.run(PNEUMONIA)
    ins = c.state(out.thread_id)["insights"]
    assert {i["kind"] for i in ins} == {"general", "statistic"}
    assert all(i["id"] in "".join(prompts) for i in ins if i["in_prompt"])


class _Swayed:
    """A panel member whose answer the prompt's insight text decides (scripted, real LLMBackend API)."""

    @staticmethod
    def make(name):
        from agents.llm.base import LLMBackend, OptionScore
        from core.catalogue import load_catalogue

        cat = load_catalogue()

        class Swayed(LLMBackend):
            def _complete(self, messages, *, max_tokens, temperature, json_schema):
                raise AssertionError("refinement never asks for text")

            def _score(self, messages, options):
                text = messages[-1]["content"]
                if "<case>\nN/A\n</case>" in text:
                    return [OptionScore(o, -5.0, 1) for o in options], 1
                text = text.lower()
                want = ("lung_cancer" if "spiculated" in text else "pneumonia" if "bronchial breathing" in text
                        else "heart_failure")
                return [OptionScore(o, 0.0 if o == cat.diseases[want].name else -60.0, 1) for o in options], 1

        return Swayed(name=name, model=f"swayed-{name}")


def test_panel_refine_keeps_criteria_that_help_and_drops_those_that_mislead():
    from core.catalogue import load_catalogue
    from knowledge.learn import panel_refine

    cat = load_catalogue()
    panel = [_Swayed.make(f"d{i}") for i in range(3)]
    val = [_solved(f"v{i}", "pneumonia", {}) for i in range(4)]
    helps = _ins("Bronchial breathing over one lobe points to pneumonia.", disease="pneumonia")
    misleads = _ins("A spiculated margin on any opacity means lung cancer.", disease="lung_cancer", kind="rare")
    unused = _ins("Keratin pearls mark squamous cell carcinoma.", disease="lung_squamous_cell_carcinoma", kind="general",
                  domain="pathology")
    final, rep = panel_refine([helps, misleads, unused], val, cat, panel)
    assert rep["accuracy_all"] == 0.0 and rep["accuracy_statistics"] == 0.0  # misled / unhelped: heart failure
    g = rep["criteria_groups"]
    assert g["lung_cancer"]["kept"] is False and g["lung_cancer"]["gain"] < 0
    assert g["pneumonia"]["kept"] is True and g["lung_squamous_cell_carcinoma"]["affected"] == 0 and not g["lung_squamous_cell_carcinoma"]["kept"]
    assert [i.text for i in final] == [helps.text] and rep["accuracy_final"] == 1.0


def test_nothing_is_published_when_the_panel_does_better_without_knowledge():
    from core.catalogue import load_catalogue
    from knowledge.learn import panel_refine

    cat = load_catalogue()
    panel = [_Swayed.make(f"d{i}") for i in range(3)]
    # without knowledge the panel answers heart failure: right on these cases
    val = [_solved(f"v{i}", "heart_failure", {"consolidation": True}) for i in range(4)]
    stat = _ins("Tools report consolidation with bronchial breathing in 90% of pneumonia cases.", kind="statistic",
                finding="consolidation", rate_with=0.9, rate_without=0.2, support=12)
    final, rep = panel_refine([stat], val, cat, panel)
    assert rep["accuracy_none"] == 1.0 and rep["accuracy_statistics"] == 0.0
    assert final == [] and rep["nothing_beats_no_knowledge"] and rep["accuracy_final"] == 1.0
    # the same statistic on cases it does help is kept
    val_pn = [_solved(f"p{i}", "pneumonia", {"consolidation": True}) for i in range(4)]
    final, rep = panel_refine([stat], val_pn, cat, panel)
    assert [i.text for i in final] == [stat.text] and "nothing_beats_no_knowledge" not in rep
    # a tie (the statistic never reaches a prompt: its finding is not reported) is no evidence either
    val_tie = [_solved(f"t{i}", "heart_failure", {"pleural_effusion": True}) for i in range(4)]
    final, rep = panel_refine([stat], val_tie, cat, panel)
    assert rep["accuracy_none"] == rep["accuracy_statistics"] == 1.0 and final == []
    # one case won is no evidence either (sign test p = 0.5); four of four is (p = 0.0625 <= 0.1)
    final, rep = panel_refine([stat], val_pn[:1] + val_tie[:3], cat, panel)
    assert rep["accuracy_statistics"] == 1.0 > rep["accuracy_none"] == 0.75 and final == []
    assert rep["paired"] == {"gained": 1, "lost": 0, "p": 0.5, "alpha": 0.1} and rep["nothing_beats_no_knowledge"]
    final, rep = panel_refine([stat], val_pn, cat, panel)
    assert rep["paired"]["gained"] == 4 and rep["paired"]["p"] == pytest.approx(0.0625) and len(final) == 1


def test_a_statistic_from_few_cases_updates_the_guideline_rather_than_replacing_it():
    from agents.evidence import PRIOR_CASES, learned_rates, p_finding
    from core.catalogue import load_catalogue

    hf = load_catalogue().diseases["heart_failure"]
    guideline = p_finding(hf, "pleural_effusion")

    def learned(n):
        return learned_rates([_ins("x", "heart_failure", "statistic", finding="pleural_effusion", rate_with=0.1,
                                   rate_without=0.1, support=n).model_dump()])

    few, many = p_finding(hf, "pleural_effusion", learned(5)), p_finding(hf, "pleural_effusion", learned(2000))
    assert few == pytest.approx((0.1 * 5 + guideline * PRIOR_CASES) / (5 + PRIOR_CASES))
    assert guideline > few > many and many == pytest.approx(0.1, abs=0.01)


def test_bare_labels_are_not_criteria():
    from core.catalogue import load_catalogue
    from knowledge.learn import is_criterion

    cat = load_catalogue()
    for label in ["Acute Pulmonary Embolism", "Pneumothorax (rare)", "Lung Volume", "community-acquired pneumonia"]:
        assert not is_criterion(label, cat), label
    assert is_criterion("Wedge-shaped peripheral opacity with a filling defect in a segmental artery", cat)
    assert is_criterion("Pleural effusion with cardiomegaly and septal lines", cat)


def test_in_memory_index_retrieves_what_the_store_does(tmp_path):
    from knowledge.apply import InsightIndex, StoreKnowledge

    ins = [_ins("Fever with lobar consolidation and raised CRP indicates bacterial pneumonia."),
           _ins("Pleuritic pain with a wedge-shaped opacity suggests pulmonary embolism.", disease="pulmonary_embolism"),
           _ins("Bilateral effusions with cardiomegaly favour heart failure.", disease="heart_failure", kind="rare"),
           _ins("Hyperinflation and bullae indicate COPD.", disease="copd"),
           _ins("Tools report consolidation in 90% of pneumonia cases", kind="statistic",
                finding="consolidation", rate_with=0.9, rate_without=0.1, support=12)]
    store = KnowledgeStore(tmp_path / "k")
    store.publish(ins)
    evidence = [{"id": "ct_analysis:ct", "status": "ok", "findings": [{"label": "consolidation", "present": True}]}]
    summary = "Fever, cough and lobar consolidation on CT."
    a = StoreKnowledge(store, k=2, prompt_k=2).retrieve(summary, "chest", evidence)
    b = InsightIndex(ins, k=2, prompt_k=2).retrieve(summary, "chest", evidence)
    assert [(i["text"], i["in_prompt"]) for i in a] == [(i["text"], i["in_prompt"]) for i in b]
    assert a[0]["text"].startswith("Fever with lobar") and a[-1]["kind"] == "statistic" and not a[-1]["in_prompt"]


def test_panel_verdicts_resume_from_the_cache_file(tmp_path):
    from core.catalogue import load_catalogue
    from knowledge.learn import VerdictCache, panel_refine

    cat = load_catalogue()
    panel = [_Swayed.make(f"d{i}") for i in range(3)]
    calls = []
    for b in panel:
        orig = b._score
        b._score = lambda m, o, orig=orig: (calls.append(1), orig(m, o))[1]
    val = [_solved(f"v{i}", "pneumonia", {}) for i in range(3)]
    ins = [_ins("Bronchial breathing over one lobe points to pneumonia.", disease="pneumonia"),
           _ins("A spiculated margin on any opacity means lung cancer.", disease="lung_cancer", kind="rare")]
    first = panel_refine(ins, val, cat, panel, cache=VerdictCache(tmp_path / "v.jsonl"))
    n = len(calls)
    assert n > 0
    with (tmp_path / "v.jsonl").open("a") as f:
        f.write('["cut by a crash')  # a torn last line is ignored, not fatal
    again = panel_refine(ins, val, cat, panel, cache=VerdictCache(tmp_path / "v.jsonl"))
    assert len(calls) == n and [i.text for i in again[0]] == [i.text for i in first[0]] and again[1] == first[1]
