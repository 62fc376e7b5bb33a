from pathlib import Path

import pytest

from dicom_fusion.service.config import load_settings
from dicom_fusion.service.errors import ConfigError


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOM_FUSION_CONFIG", raising=False)
    s = load_settings()
    assert s.listener.ae_title == "DFUSION"
    assert s.listener.port == 11112
    assert s.listener.allowed_calling_aes == []
    assert s.completion.quiet_seconds == 10
    assert s.completion.on_release is False
    assert s.embedded_broker
    assert s.ledger_url.startswith("sqlite:///")
    assert s.model_card_path().name == "card.toml"


def test_toml_then_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('data_dir = "/srv/df"\n[listener]\nport = 11113\nallowed_calling_aes = ["PACS1"]\n'
                   '[pacs]\nae_title = "MYPACS"\n[completion]\nquiet_seconds = 3\n')
    monkeypatch.setenv("DICOM_FUSION_CONFIG", str(cfg))
    monkeypatch.setenv("DICOM_FUSION_LISTENER__PORT", "4000")
    s = load_settings()
    assert s.listener.port == 4000  # env beats file
    assert s.listener.allowed_calling_aes == ["PACS1"]
    assert s.pacs.ae_title == "MYPACS"
    assert s.completion.quiet_seconds == 3
    assert s.spool_dir == Path("/srv/df/spool")


def test_explicit_config_beats_env_var_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("[listener]\nport = 1\n")
    b.write_text("[listener]\nport = 2\n")
    monkeypatch.setenv("DICOM_FUSION_CONFIG", str(a))
    assert load_settings(b).listener.port == 2


@pytest.mark.parametrize("body, key", [
    ("[listener]\nprot = 1\n", "listener.prot"),
    ("[listener]\nae_title = \"THIS-AE-TITLE-IS-TOO-LONG\"\n", "listener.ae_title"),
    ("[listener]\nport = 70000\n", "listener.port"),
    ("[fhir]\nauth_mode = \"magic\"\n", "fhir.auth_mode"),
])
def test_invalid_config_names_the_key(tmp_path: Path, body: str, key: str,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOM_FUSION_CONFIG", raising=False)
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(cfg)


def test_missing_config_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--config"):
        load_settings(tmp_path / "nope.toml")


def test_secrets_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOM_FUSION_CONFIG", raising=False)
    monkeypatch.setenv("DICOM_FUSION_FHIR__CLIENT_SECRET", "s3cret")
    d = load_settings().public_dict()
    assert d["fhir"]["client_secret"] == "***"
    assert "s3cret" not in str(d)


def test_model_ensemble_selects_the_packaged_ensemble(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOM_FUSION_CONFIG", raising=False)
    assert load_settings().model_card_path().parent.name == "default_model"
    monkeypatch.setenv("DICOM_FUSION_MODEL__ENSEMBLE", "true")
    path = load_settings().model_card_path()
    assert path.parent.name == "ensemble" and path.parent.parent.name == "default_model" and path.is_file()
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\ncard = "{tmp_path / "card.toml"}"\nensemble = true\n')
    with pytest.raises(ConfigError, match="set only one"):
        load_settings(cfg)
