"""ComparisonConfig validation and Settings precedence: defaults < file < env < overrides."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from handler.config import ComparisonConfig, ConfigFileError, load_settings


def test_defaults_are_sensible() -> None:
    config = ComparisonConfig()
    assert config.max_image_size == (1024, 1024)
    assert config.image_quality == 85
    assert 0 < config.similarity_threshold < 1
    assert config.focus_elements and config.comparison_aspects


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_quality", 0, "greater than or equal to 1"),
        ("image_quality", 96, "less than or equal to 95"),
        ("similarity_threshold", 1.5, "less than or equal to 1"),
        ("processing_timeout", 0, "greater than 0"),
        ("max_image_size", (0, 100), "between 16 and 8192"),
        ("max_image_size", (100,), "max_image_size"),
    ],
)
def test_out_of_range_values_are_rejected(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ComparisonConfig.model_validate({field: value})


def test_unknown_fields_are_rejected() -> None:
    with pytest.raises(ValidationError, match="focus_element"):
        ComparisonConfig.model_validate({"focus_element": ["x"]})


def test_environment_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = tmp_path / "pairwatch.toml"
    config_file.write_text(
        'comparator = "vl"\nmodel = "/models/qwen"\nlog_level = "DEBUG"\n'
        "[comparison]\nimage_quality = 70\nmax_image_size = [512, 512]\n"
    )
    monkeypatch.setenv("PAIRWATCH_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("PAIRWATCH_COMPARISON__SIMILARITY_THRESHOLD", "0.5")
    settings = load_settings(config_file)
    assert settings.comparator == "vl"
    assert settings.model == "/models/qwen"
    assert settings.log_level == "WARNING"
    assert settings.comparison.image_quality == 70
    assert settings.comparison.max_image_size == (512, 512)
    assert settings.comparison.similarity_threshold == 0.5


def test_explicit_overrides_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = tmp_path / "pairwatch.json"
    config_file.write_text(json.dumps({"comparator": "vl", "max_input_pixels": 1000}))
    monkeypatch.setenv("PAIRWATCH_COMPARATOR", "vl")
    settings = load_settings(config_file, comparator="metrics", model=None)
    assert settings.comparator == "metrics"
    assert settings.max_input_pixels == 1000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("comparator = 'gpu'", "comparator"),
        ("[comparison]\nimage_quality = 100", "comparison.image_quality"),
        ("not toml at all [", "not valid"),
    ],
)
def test_bad_config_files_give_clear_errors(tmp_path: Path, content: str, message: str) -> None:
    config_file = tmp_path / "bad.toml"
    config_file.write_text(content)
    with pytest.raises(ConfigFileError, match=message):
        load_settings(config_file)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match="cannot read"):
        load_settings(tmp_path / "missing.toml")


def test_the_vl_comparator_needs_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PAIRWATCH_MODEL", raising=False)
    with pytest.raises(ConfigFileError, match="needs a model"):
        load_settings(None, comparator="vl")
    assert load_settings(None, comparator="vl", model="/models/x").comparator == "vl"
