from __future__ import annotations

import pytest

from service.config import SettingsError, load_settings


def test_defaults() -> None:
    settings = load_settings()
    assert settings.precision == "fp32" and settings.backend == "auto"
    assert settings.max_upload_bytes == 10 * 1024 * 1024 and settings.max_pixels == 40_000_000
    assert settings.api_key is None and settings.cors_origins == []
    assert settings.batching == "auto"


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANEMIA_PRECISION", "int8")
    monkeypatch.setenv("ANEMIA_MAX_BATCH", "16")
    monkeypatch.setenv("ANEMIA_BATCHING", "off")
    monkeypatch.setenv("ANEMIA_API_KEY", "Zq9-secret")
    monkeypatch.setenv("ANEMIA_CORS_ORIGINS", "http://a.local, http://b.local")
    settings = load_settings()
    assert settings.precision == "int8" and settings.max_batch == 16 and settings.batching == "off"
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "Zq9-secret"
    assert settings.cors_origins == ["http://a.local", "http://b.local"]
    assert "Zq9-secret" not in repr(settings)  # the key never shows in logs or reprs


@pytest.mark.parametrize(
    "variable, value",
    [
        ("ANEMIA_PRECISION", "int9"),
        ("ANEMIA_BACKEND", "cuda"),
        ("ANEMIA_MAX_BATCH", "0"),
        ("ANEMIA_THRESHOLD", "1.5"),
        ("ANEMIA_MAX_UPLOAD_BYTES", "lots"),
        ("ANEMIA_BATCH_WAIT_MS", "-1"),
        ("ANEMIA_BATCHING", "sometimes"),
        ("ANEMIA_HEADER_TIMEOUT_S", "0"),
        ("ANEMIA_MAX_HEADER_BYTES", "100"),
        ("ANEMIA_MIN_BODY_RATE_BYTES_PER_S", "0"),
        ("ANEMIA_MAX_CONNECTIONS_PER_CLIENT", "-1"),
    ],
)
def test_bad_values_fail_naming_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert variable in str(raised.value) and repr(value) in str(raised.value)


def test_blank_api_key_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANEMIA_API_KEY", "  ")
    assert load_settings().api_key is None


def test_blank_credentials_dir_means_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # An empty ANEMIA_CREDENTIALS_DIR must never mean "." (the working directory).
    monkeypatch.setenv("ANEMIA_CREDENTIALS_DIR", "")
    monkeypatch.setenv("ANEMIA_TLS_CERTFILE", " ")
    settings = load_settings()
    assert settings.credentials_dir is None and settings.tls_certfile is None
