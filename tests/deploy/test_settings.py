"""Settings: env vars, TOML, and one-line errors that name the bad setting."""

import subprocess
import sys

import pytest

from deploy.settings import Settings, SettingsError, load_settings, settings_table


def test_env_overrides_toml(tmp_path, monkeypatch):
    cfg = tmp_path / "t.toml"
    cfg.write_text('experience_images = 500\ntopic = "from-toml"\n')
    monkeypatch.setenv("TAILORD_TOPIC", "from-env")
    s = load_settings(cfg)
    assert s.experience_images == 500
    assert s.topic == "from-env"


@pytest.mark.parametrize(("var", "value", "needle"), [
    ("TAILORD_EXPERIENCE_IMAGES", "abc", "TAILORD_EXPERIENCE_IMAGES='abc'"),
    ("TAILORD_EXPERIENCE_IMAGES", "0", "greater than or equal to 1"),
    ("TAILORD_STRATEGY", "magic", "must be one of naive"),
    ("TAILORD_METHOD", "dino", "TAILORD_METHOD"),
    ("TAILORD_PROBE_FRACTION", "0.9", "TAILORD_PROBE_FRACTION"),
])
def test_bad_value_names_setting(monkeypatch, var, value, needle):
    monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_off_loopback_needs_token(monkeypatch):
    monkeypatch.setenv("TAILORD_HTTP_HOST", "0.0.0.0")
    with pytest.raises(SettingsError, match="TAILORD_ADMIN_TOKEN"):
        load_settings()
    monkeypatch.setenv("TAILORD_ADMIN_TOKEN", "s3cret")
    assert load_settings().admin_token.get_secret_value() == "s3cret"


def test_ondisk_index_needs_ivf(monkeypatch):
    monkeypatch.setenv("TAILORD_INDEX_ONDISK", "true")
    monkeypatch.setenv("TAILORD_INDEX_KIND", "hnsw")
    with pytest.raises(SettingsError, match="invalid setting TAILORD_INDEX_ONDISK: on-disk inverted lists need TAILORD_INDEX_KIND=ivf"):
        load_settings()
    monkeypatch.setenv("TAILORD_INDEX_KIND", "ivf")
    assert load_settings().index_ondisk


def test_index_threads_reach_the_index_options(monkeypatch):
    assert load_settings().index_options().threads == 1  # the cores are training's
    monkeypatch.setenv("TAILORD_INDEX_THREADS", "4")
    assert load_settings().index_options().threads == 4
    monkeypatch.setenv("TAILORD_INDEX_THREADS", "-1")
    with pytest.raises(SettingsError, match="TAILORD_INDEX_THREADS"):
        load_settings()


def test_unknown_toml_key(tmp_path):
    cfg = tmp_path / "t.toml"
    cfg.write_text("experiance_images = 5\n")
    with pytest.raises(SettingsError, match="experiance_images"):
        load_settings(cfg)


def test_cli_exit_code_2_one_line(tmp_path):
    env = {"TAILORD_REPLAY_SHARE": "2", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "deploy.cli", "run"], env=env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "TAILORD_REPLAY_SHARE" in lines[0]


def test_table_lists_every_setting():
    table = settings_table()
    for name in Settings.model_fields:
        assert f"TAILORD_{name.upper()}" in table


def test_readme_table_is_current():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert settings_table() in readme, "regenerate with: make docs"


@pytest.mark.parametrize(("env", "boundary"), [
    ({}, "header"),
    ({"TAILORD_BOUNDARY": "drift,header"}, "header,drift"),
    ({"TAILORD_BOUNDARY": "count"}, "count"),
    ({"TAILORD_SPLIT_ON_DOMAIN": "false"}, "count"),  # the deprecated setting maps onto TAILORD_BOUNDARY
    ({"TAILORD_SPLIT_ON_DOMAIN": "true", "TAILORD_BOUNDARY": "header,drift"}, "header,drift"),
])
def test_boundary_modes(monkeypatch, env, boundary):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    settings = load_settings()
    assert settings.boundary == boundary
    assert settings.boundaries == set(boundary.split(",")) - {"count"}


@pytest.mark.parametrize(("env", "needle"), [
    ({"TAILORD_BOUNDARY": "header,magic"}, "TAILORD_BOUNDARY"),
    ({"TAILORD_BOUNDARY": "drift", "TAILORD_SPLIT_ON_DOMAIN": "true"}, "TAILORD_SPLIT_ON_DOMAIN"),
])
def test_bad_boundary_names_setting(monkeypatch, env, needle):
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(SettingsError, match=needle):
        load_settings()
