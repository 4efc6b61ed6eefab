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
