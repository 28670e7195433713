"""Configuration: the per-pair ``ComparisonConfig`` and the process-wide ``Settings``.

``ComparisonConfig`` keeps the field names users of the original image-comparison API know.
``Settings`` comes from ``PAIRWATCH_*`` environment variables and an optional TOML/JSON file;
precedence is explicit arguments > environment > file > defaults.
"""

from __future__ import annotations

import importlib.util
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from handler.buckets import check_bucket
from handler.errors import BucketRefused

#: Chosen so that re-encoded, rescaled, re-formatted and EXIF-rotated copies score above it and
#: local edits (a pasted object over a few percent of the image, a blurred region, recolouring,
#: mirroring) score below it; see ``handler.compare.metrics`` and tests/compare/test_metrics.py.
DEFAULT_SIMILARITY_THRESHOLD = 0.93
DEFAULT_MAX_INPUT_PIXELS = 200_000_000
#: Enough for several 1 MP pairs at once; a pair of 100 MP inputs runs alone.
DEFAULT_DECODE_BUDGET_MP = 24


class IgnoreRegion(BaseModel):
    """A box in image A's native (EXIF-oriented) pixels that detection and metrics leave out."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)


MatchLevel = Literal["strict", "ignore_moves", "exact", "ignore_colors"]
#: What a box of ``regions`` may set: a match level, or ``ignore`` (left out entirely).
RegionLevel = Literal["strict", "ignore_moves", "exact", "ignore_colors", "ignore"]


class MatchRegion(IgnoreRegion):
    """A box in image A's native pixels compared at its own match level (or ignored)."""

    match_level: RegionLevel


class ComparisonConfig(BaseModel):
    """How one pair is compared. Overridable per pair (manifest ``config``) and per deployment."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    focus_elements: list[str] = Field(
        default_factory=lambda: ["objects", "text", "people", "layout"],
        description="What the comparison should pay attention to (used in the VL prompt).",
    )
    comparison_aspects: list[str] = Field(
        default_factory=lambda: ["presence", "position", "color", "shape", "size"],
        description="Kinds of difference to report (used in the VL prompt).",
    )
    similarity_threshold: float = Field(
        DEFAULT_SIMILARITY_THRESHOLD,
        ge=0.0,
        le=1.0,
        description="is_similar = similarity >= similarity_threshold.",
    )
    max_image_size: tuple[int, int] = Field(
        (1024, 1024),
        description="Bounding box (width, height) every image is downsized into before comparing.",
    )
    image_quality: int = Field(
        85, ge=1, le=95, description="JPEG quality of the prepared (downsized) images."
    )
    processing_timeout: float = Field(
        120.0, gt=0, le=3600, description="Seconds one pair's comparison may take."
    )
    ignore_regions: list[IgnoreRegion] = Field(
        default_factory=list,
        max_length=100,
        description="Boxes {x, y, width, height} in image A's native pixels to leave out of "
        "detection and metrics (masked in what the VL model sees).",
    )
    match_level: MatchLevel = Field(
        "strict",
        description="strict: anything added, removed, changed or moved makes the pair "
        "different; ignore_moves: content that only moved does not; exact: every pixel over "
        "the colour threshold counts (no anti-aliasing or noise filter); ignore_colors: "
        "luminance structure only (a recolouring is not a change).",
    )
    regions: list[MatchRegion] = Field(
        default_factory=list,
        max_length=100,
        description="Boxes {x, y, width, height, match_level} in image A's native pixels "
        "compared at their own level, or `ignore`d; a later box wins where boxes overlap.",
    )

    @field_validator("max_image_size")
    @classmethod
    def _check_size(cls, value: tuple[int, int]) -> tuple[int, int]:
        width, height = value
        if not (16 <= width <= 8192 and 16 <= height <= 8192):
            raise ValueError("max_image_size must be two integers between 16 and 8192")
        return value


class Settings(BaseSettings):
    """Process-wide runtime settings: ``PAIRWATCH_<FIELD>``, ``PAIRWATCH_COMPARISON__<FIELD>``."""

    model_config = SettingsConfigDict(
        env_prefix="PAIRWATCH_", env_nested_delimiter="__", extra="forbid"
    )
    #: A ``--config`` file's values, below the environment (set on ``load_settings``'s
    #: subclass, so ``Settings`` itself reads only its arguments and the environment).
    file_values: ClassVar[Mapping[str, Any]] = {}

    comparator: Literal["auto", "metrics", "vl"] = Field(
        "auto", description="auto: vl when a model is configured, metrics otherwise."
    )
    model: str | None = Field(None, description="VL model: Hugging Face id or local folder.")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: console when stderr is a terminal, JSON otherwise."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    max_input_pixels: int = Field(
        DEFAULT_MAX_INPUT_PIXELS,
        gt=0,
        description="Decompression-bomb guard, checked before decoding.",
    )
    max_input_bytes: int = Field(
        512 * 1024 * 1024, gt=0, description="Largest input file/object read."
    )
    pair_timeout: float = Field(
        600.0, gt=0, description="Seconds a lone image waits for its partner (incomplete_pair)."
    )
    settle_time: float = Field(
        0.5, ge=0, description="Seconds a file's size and mtime must be stable before it is read."
    )
    queue_size: int = Field(1000, gt=0, description="Bound of the watcher's pending-pair queue.")
    diff_image: bool = Field(True, description="Write diff.png beside every result.")
    input_prefix: str = Field(
        "",
        description="S3 (watch sqs, Lambda): only keys under this prefix are pairs; manifests "
        "cannot reach outside it. watch minio/poll take it from their s3:// URL.",
    )
    allowed_buckets: Annotated[list[str] | None, NoDecode] = Field(
        None,
        description="S3 (serve's webhook, watch sqs/minio/poll, Lambda): the only buckets an "
        "event may name; events for others are rejected. Unset: any bucket the credentials "
        "reach. In the environment: comma-separated or a JSON list.",
    )
    output_prefix: str | None = Field(None, description="S3: write results under this prefix.")
    output_bucket: str | None = Field(None, description="S3: write results to this bucket.")
    comparison: ComparisonConfig = Field(default_factory=lambda: ComparisonConfig())
    decode_budget_mp: int = Field(
        DEFAULT_DECODE_BUDGET_MP,
        gt=0,
        le=100_000,
        description="Megapixels of input one process decodes at once, shared by the pairs in "
        "flight (a pair takes its two inputs' megapixels); a pair larger than this runs alone.",
    )
    cache_mb: int = Field(
        64,
        ge=0,
        description="Memory for prepared images kept per process (keyed by sha256 and the "
        "preparation settings); 0 disables the cache.",
    )
    vl_max_new_tokens: int = Field(
        512, gt=0, le=8192, description="VL: most tokens the model may answer with per pair."
    )
    vl_batch_size: int | None = Field(
        None,
        ge=1,
        le=256,
        description="VL: most pairs per batched generate (default 8 on CUDA, 1 on CPU).",
    )
    vl_load_timeout: float = Field(
        900.0, gt=0, description="VL: seconds a model worker may take to load the model."
    )
    vl_backend: Literal["local", "openai"] = Field(
        "local",
        description="VL: local (the model in a worker process) or openai (an OpenAI-compatible "
        "chat-completions engine at vl_endpoint serving `model`).",
    )
    vl_endpoint: str | None = Field(
        None, description="VL openai backend: the engine's base URL, e.g. http://vllm:8000/v1."
    )
    vl_api_key: SecretStr | None = Field(
        None, description="VL openai backend: API key (never logged, never in results)."
    )
    vl_api_key_file: Path | None = Field(
        None, description="VL openai backend: file holding the API key (e.g. a mounted secret)."
    )
    sqs_wait_seconds: int = Field(
        20, ge=0, le=20, description="watch sqs: ReceiveMessage long-poll wait (0-20 s)."
    )
    poll_interval: float = Field(
        10.0, gt=0, description="watch poll: seconds between two listings of the prefix."
    )
    lambda_min_remaining_ms: int = Field(
        30_000,
        ge=0,
        description="Lambda: hand the rest of an SQS batch back when less time than this is left.",
    )
    concurrency: int | None = Field(
        None,
        gt=0,
        le=1024,
        description="Pairs compared at once; unset: 8 for the vl comparator, the usable CPU "
        "cores for metrics.",
    )
    serve_host: str = Field("127.0.0.1", description="pairwatch serve: address to listen on.")
    serve_port: int = Field(8080, ge=0, le=65535, description="pairwatch serve: TCP port.")
    upload_idle_timeout: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="pairwatch serve: seconds a client may leave a request waiting (its head, "
        "or the next bytes of its body) before it is answered 408 and closed; each such "
        "stretch of a body must also bring 1 KiB/s.",
    )
    events_token: SecretStr | None = Field(
        None,
        description="pairwatch serve: bearer token POST /v1/events requires (unset: disabled).",
    )
    events_token_file: Path | None = Field(
        None, description="File holding events_token (a mounted secret), read at start-up."
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="watch ...: serve Prometheus metrics on this port (on serve_host).",
    )

    @model_validator(mode="after")
    def _vl_needs_a_model(self) -> Settings:
        if self.comparator == "vl" and not self.model:
            raise ValueError("comparator 'vl' needs a model (PAIRWATCH_MODEL or --model)")
        return self

    @model_validator(mode="after")
    def _openai_backend_needs_an_endpoint(self) -> Settings:
        if self.vl_backend == "openai" and not self.vl_endpoint:
            raise ValueError(
                "vl_backend 'openai' needs vl_endpoint (PAIRWATCH_VL_ENDPOINT or --vl-endpoint)"
            )
        return self

    @model_validator(mode="after")
    def _local_vl_needs_the_extra(self) -> Settings:
        """The core install has no torch: say so up front, not as an ImportError mid-pair.
        (With ``vl_backend = "openai"`` the model runs on the server: no extra needed.)"""
        runs_vl = self.comparator == "vl" or (self.comparator == "auto" and bool(self.model))
        missing = missing_vl_packages() if runs_vl and self.vl_backend == "local" else []
        if missing:
            raise ValueError(
                "the VL comparator needs the optional extra 'vl': "
                f"pip install 'pairwatch[vl]' (missing: {', '.join(missing)})"
            )
        return self

    @field_validator("allowed_buckets", mode="before")
    @classmethod
    def _bucket_list(cls, value: Any) -> Any:
        """``a,b`` or ``["a","b"]`` from the environment; a list from a file or a flag."""
        if isinstance(value, str):
            text = value.strip()
            return (
                json.loads(text)
                if text.startswith("[")
                else [name.strip() for name in text.split(",") if name.strip()]
            )
        return value

    @field_validator("allowed_buckets")
    @classmethod
    def _bucket_names(cls, value: list[str] | None) -> list[str] | None:
        """Each a bucket name; an empty list would refuse everything: leave it unset instead."""
        if value is None:
            return value
        if not value:
            raise ValueError("is empty: name the buckets, or leave it unset for any bucket")
        for name in value:
            try:
                check_bucket(name)
            except BucketRefused as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("events_token", "vl_api_key")
    @classmethod
    def _secret_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        """An empty secret is a mistake, never "no authentication" (an empty
        ``PAIRWATCH_EVENTS_TOKEN`` once opened the webhook to anyone): unset it instead."""
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is empty: give a secret, or leave the setting unset")
        return value

    @field_validator("vl_endpoint")
    @classmethod
    def _endpoint_without_credentials(cls, value: str | None) -> str | None:
        """Credentials in the URL would be sent as Basic auth instead of the API key (and shown
        wherever the URL is): refused, so that every request carries the same bearer key."""
        if value is None:
            return value
        parts = urlsplit(value)
        if "@" in parts.netloc:
            raise ValueError(
                "credentials in the URL are not used: put the key in vl_api_key or a key file "
                "(vl_api_key_file)"
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s)://HOST[:PORT]/PATH URL")
        return value

    @model_validator(mode="after")
    def _api_key_from_file(self) -> Settings:
        """A key file (a mounted secret) fills ``vl_api_key`` unless the key is given itself."""
        if self.vl_api_key is None and self.vl_api_key_file is not None:
            self.vl_api_key = SecretStr(read_secret_file(self.vl_api_key_file, "vl_api_key_file"))
        return self

    @model_validator(mode="after")
    def _read_events_token_file(self) -> Settings:
        if self.events_token is None and self.events_token_file is not None:
            self.events_token = SecretStr(
                read_secret_file(self.events_token_file, "events_token_file")
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Arguments (flags) over the environment over the config file; no dotenv, no
        secrets directory."""
        if not cls.file_values:
            return (init_settings, env_settings)
        return (
            init_settings,
            env_settings,
            InitSettingsSource(settings_cls, dict(cls.file_values)),
        )


#: What the local VL model needs beyond the core install (the ``vl`` extra, xgrammar optional).
VL_PACKAGES = ("torch", "torchvision", "transformers")


def missing_vl_packages() -> list[str]:
    """The ``vl`` extra's packages that are not installed (looked up, not imported)."""
    return [name for name in VL_PACKAGES if importlib.util.find_spec(name) is None]


class ConfigFileError(ValueError):
    """The ``--config`` file is missing, unparseable or holds invalid values."""


def read_secret_file(path: Path, setting: str) -> str:
    """A secret from a mounted file (Kubernetes/Docker secrets): stripped, never empty.
    ``setting`` names the setting in the error."""
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{setting}: cannot read secret file {path}: {exc}") from exc
    if not secret:
        raise ValueError(f"{setting}: secret file {path} is empty")
    return secret


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML or JSON settings file (by suffix; anything else is tried as TOML)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigFileError(f"config file {path} is not valid: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"config file {path} must hold a table/object at the top")
    return data


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Settings from defaults < config file < environment < ``overrides`` (e.g. CLI flags)."""
    values = read_config_file(config_file) if config_file else {}

    class _FileSettings(Settings):
        file_values = values

    try:
        loaded = _FileSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigFileError(format_validation_error(exc)) from exc
    return loaded


def error_field(exc: ValidationError, prefix: str = "") -> str:
    """The first invalid field, as results and answers name it: ``config.ignore_regions[0]``."""
    path = prefix
    for part in exc.errors()[0]["loc"] if exc.errors() else ():
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or prefix or "config"


def format_validation_error(exc: ValidationError) -> str:
    """One readable line per invalid field, e.g. ``comparison.image_quality: ... <= 95``."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "config"
        lines.append(f"{where}: {err['msg']}")
    return "invalid configuration: " + "; ".join(lines)


class InvalidConfig(ValueError):
    """A config override that does not validate; ``field`` names it (``config.image_quality``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def apply_overrides(base: ComparisonConfig, overrides: Mapping[str, Any]) -> ComparisonConfig:
    """``base`` with some fields replaced, validated; ``InvalidConfig`` names the bad field."""
    try:
        return ComparisonConfig.model_validate(base.model_dump() | dict(overrides))
    except ValidationError as exc:
        raise InvalidConfig(format_validation_error(exc), error_field(exc, "config")) from None
