"""Settings: defaults < grandrounds.toml < env vars < --set, and clear errors naming where."""
import pytest

from core.config import load_settings
from core.errors import ConfigError


def test_defaults_run_everything_on_the_embedded_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings(env={})
    assert s.llm.backends["local"].kind == "llama_cpp"
    assert [n for n, _ in s.llm.backend_for("diagnosticians")] == ["local"] * 3


def test_file_env_and_cli_layer_in_order(tmp_path):
    f = tmp_path / "grandrounds.toml"
    f.write_text("""
[llm.backends.server]
kind = "openai"
model = "Qwen/Qwen2.5-7B-Instruct"
base_url = "http://127.0.0.1:8000/v1"

[llm.roles]
diagnosticians = ["local", "server", "server"]
""")
    s = load_settings(f, env={})
    assert s.llm.backends["local"].kind == "llama_cpp"  # defaults kept alongside the file's backend
    assert [n for n, _ in s.llm.backend_for("diagnosticians")] == ["local", "server", "server"]
    s = load_settings(f, env={"GRANDROUNDS__LLM__ROLES__PLANNER": "server", "GRANDROUNDS__MAX_ROUNDS": "4"})
    assert s.llm.roles["planner"] == "server" and s.max_rounds == 4
    s = load_settings(f, ["llm.roles.planner=local", "llm.backends.server.timeout_s=5"],
                      env={"GRANDROUNDS__LLM__ROLES__PLANNER": "server"})
    assert s.llm.roles["planner"] == "local" and s.llm.backends["server"].timeout_s == 5


@pytest.mark.parametrize("overrides,field", [
    (["llm.roles.planner=nowhere"], "llm"),
    (["llm.backends.local.kind=gpt"], "llm.backends.local.kind"),
    (["max_rounds=0"], "max_rounds"),
    (["no_such_key=1"], "no_such_key"),
])
def test_bad_values_name_the_field(tmp_path, monkeypatch, overrides, field):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_settings(overrides=overrides, env={})
    assert e.value.field.startswith(field)


def test_bad_file_names_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[llm\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_settings(f, env={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", env={})
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_settings(overrides=["planner"], env={})


PANEL_TOML = """
[llm.backends.alt]            # a second local GGUF, another model family
kind = "llama_cpp"
model = "{gguf}"

[llm.backends.gpu]            # a bigger model behind `vllm serve` (any OpenAI-compatible server)
kind = "openai"
model = "Qwen/Qwen2.5-7B-Instruct"
base_url = "http://127.0.0.1:8000/v1"
structured_mode = "structured_outputs"

[llm.roles]
diagnosticians = ["local", "alt", "gpu"]
"""


def test_three_diagnosticians_can_be_three_models_from_file_env_or_cli(tmp_path, monkeypatch):
    """Each role names backends; each backend its kind and model: three diagnosticians, three different models."""
    from agents.llm.factory import BackendPool

    monkeypatch.chdir(tmp_path)
    gguf = tmp_path / "other-model.Q4_K_M.gguf"
    gguf.write_bytes(b"GGUF")  # constructing a backend does not load it; only its existence is checked
    want = [("local", "llama_cpp", None), ("alt", "llama_cpp", str(gguf)),
            ("gpu", "openai", "Qwen/Qwen2.5-7B-Instruct")]

    f = tmp_path / "grandrounds.toml"
    f.write_text(PANEL_TOML.format(gguf=gguf))
    env = {"GRANDROUNDS__LLM__BACKENDS__ALT__KIND": "llama_cpp", "GRANDROUNDS__LLM__BACKENDS__ALT__MODEL": str(gguf),
           "GRANDROUNDS__LLM__BACKENDS__GPU__KIND": "openai",
           "GRANDROUNDS__LLM__BACKENDS__GPU__MODEL": "Qwen/Qwen2.5-7B-Instruct",
           "GRANDROUNDS__LLM__BACKENDS__GPU__BASE_URL": "http://127.0.0.1:8000/v1",
           "GRANDROUNDS__LLM__ROLES__DIAGNOSTICIANS": '["local", "alt", "gpu"]'}
    cli = [f'llm.backends.alt={{kind="llama_cpp", model="{gguf}"}}',
           'llm.backends.gpu={kind="openai", model="Qwen/Qwen2.5-7B-Instruct", base_url="http://127.0.0.1:8000/v1"}',
           'llm.roles.diagnosticians=["local", "alt", "gpu"]']
    for s in (load_settings(f, env={}), load_settings(env=env), load_settings(overrides=cli, env={})):
        got = [(n, c.kind, c.model) for n, c in s.llm.backend_for("diagnosticians")]
        assert got == want
        panel = BackendPool(s).for_role("diagnosticians")
        assert len({id(b) for b in panel}) == 3
        assert [b.model for b in panel] == ["SmolLM2-135M-Instruct.Q4_1.gguf", gguf.name, "Qwen/Qwen2.5-7B-Instruct"]
    assert load_settings(f, env={}).llm.backends["gpu"].structured_mode == "structured_outputs"
