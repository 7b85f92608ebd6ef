"""The daemon's settings: `TAILORD_*` environment variables, `.env`, and `--config FILE.toml`.

Precedence, highest first: environment, `.env`, the TOML file, the defaults below.
A bad value is reported in one line naming the setting (see `SettingsError`).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from learners.regularizers import (
    STRATEGIES,  # the registry's list: one strategy list in the code base
)
from replay.index_options import IndexOptions

ENV_PREFIX = "TAILORD_"
BOUNDARY_MODES = ("header", "count", "drift")  # what may end an experience (TAILORD_BOUNDARY)


class SettingsError(Exception):
    """A setting with a bad value; `str()` is the one line shown to the user."""


class Settings(BaseSettings):
    """Everything the daemon can be told. Field `x` is set by `TAILORD_X`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore",
                                      validate_default=True)

    # stream
    bootstrap_servers: str | None = Field(None, description="Kafka bootstrap servers; unset: start the embedded broker")
    topic: str = Field("tailord.images", description="topic of image records")
    topic_partitions: int = Field(1, ge=1, le=1024, description="partitions when the daemon creates the topic")
    group_id: str = Field("tailord", description="consumer group used to commit offsets for monitoring")
    max_record_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest record value accepted")
    max_pixels: int = Field(40_000_000, ge=64, description="largest image (width*height) accepted")
    decode_workers: int = Field(1, ge=1, le=32, description="threads decoding records off the training thread")
    jpeg_decode: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="where JPEG pixels are decoded: gpu = batched nvJPEG on the training GPU; auto: gpu when training on CUDA")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol for every client")
    kafka_ssl_cafile: Path | None = Field(None, description="CA bundle to verify the brokers")
    kafka_ssl_certfile: Path | None = Field(None, description="client certificate (mutual TLS)")
    kafka_ssl_keyfile: Path | None = Field(None, description="client private key (mutual TLS)")
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="SASL mechanism")
    kafka_sasl_username: str | None = Field(None, description="SASL user")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (never logged)")

    # learning
    preset: Literal["auto", "cpu", "gpu"] = Field("auto", description="model/resolution preset; auto: gpu when CUDA is present")
    method: Literal["simsiam", "byol", "simclr", "moco"] = Field(
        "simclr", description="self-supervised method (simclr learned most at the cpu budget: docs/continual.md)"
    )
    strategy: str = Field("replay", description="anti-forgetting strategy: " + ", ".join(STRATEGIES))
    regularizer_lambda: float | None = Field(None, ge=0, description="regularizer weight; unset: the strategy's default")
    backbone: str | None = Field(
        None, description="encoder by registry name: resnet18, resnet34, resnet50, convnext_tiny, vit (learners/backbones.py); unset: the preset's. Fixed for a state dir")
    backbone_kwargs: dict[str, Any] | None = Field(
        None, description='JSON object of backbone constructor arguments over the preset\'s (another backbone: its defaults for the resolution), e.g. `{"width": 32}`')
    init_weights: Path | None = Field(
        None, description="starting weights for a fresh state dir: .safetensors or a torch state dict (head and `backbone.`/`module.` prefixes dropped); ignored on resume")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="training device")
    batch_size: int | None = Field(None, ge=2, le=8192, description="images per step (stream part); unset: preset")
    resolution: int | None = Field(None, ge=16, le=1024, description="training resolution; unset: preset")
    lr: float | None = Field(None, gt=0, description="learning rate; unset: preset")
    seed: int = Field(0, description="seed for augmentation, probes and buffers")
    torch_threads: int | None = Field(None, ge=1, le=256, description="CPU threads for torch; unset: torch's default")
    snapshot_threads: int = Field(1, ge=1, le=256, description="torch threads of the child process that trains a snapshot's SEPT beside the daemon (training keeps its own); raise it when the machine has cores to spare")
    snapshot_niceness: int = Field(0, ge=0, le=19, description="how much lower than training's the CPU priority of that child process is (Linux nice): raise it to favour training over snapshot latency (on 2 cores, 10 made a route+sept snapshot of 70-160 steps take ~100 s instead of ~40-60 s)")
    snapshot_rerank_pool: int = Field(16, ge=1, le=64, description="when the index lags the newest checkpoint, a SEPT snapshot retrieves this many times its budget and re-ranks them with the newest encoder (it embeds them: 25 s for 32,000 on 2 CPU cores); 1: use the lagging index as is")
    snapshot_relevance_k: int = Field(5, ge=0, le=100, description="a SEPT snapshot trains on a retrieved sample only when it is as similar to some target as that target is to its k-th nearest fellow target (the targets' k-NN manifold), so a store with nothing like the targets adds nothing; 0: train on all it retrieved")
    compile: bool = Field(False, description="torch.compile the model (faster steps, slow start)")

    # experiences
    experience_images: int = Field(2000, ge=1, description="trained images per experience")
    boundary: str = Field(
        "header", description="what else ends an experience (TAILORD_EXPERIENCE_IMAGES is always the upper bound): header = the domain header changes, drift = the embedding distribution shifts (no header needed), count = nothing else; combine with commas, e.g. `header,drift` (docs/operations.md, Experience boundaries)")
    split_on_domain: bool | None = Field(None, description="deprecated, read when TAILORD_BOUNDARY is unset: true = `header`, false = `count`")
    drift_threshold: float = Field(6.0, gt=0, description="drift: z-score of the window-vs-reference MMD (permutation null) above which a check counts as shifted")
    drift_patience: int = Field(3, ge=1, le=100, description="drift: consecutive shifted checks before a boundary")
    drift_min_images: int = Field(256, ge=0, description="drift: no drift boundary in an experience shorter than this (trained images)")
    drift_cooldown_images: int = Field(256, ge=0, description="drift: trained images after a drift boundary before the next one")
    drift_window: int = Field(192, ge=8, le=4096, description="drift: embeddings in the recent window (the reference holds 2x as many; a check every window/8 embeddings)")
    drift_sample: float = Field(0.75, gt=0, le=1, description="drift: share of each step's stream images embedded for the detector")
    drift_resolution: int | None = Field(None, ge=8, le=1024, description="drift: side in px the detector's sample is shrunk to before it is embedded (unset: a quarter of the preset's resolution, at least 8; an 8 px image costs ~1/12 of a 32 px one's forward)")
    probe_fraction: float = Field(0.2, ge=0, le=0.5, description="hash fraction of records kept out for evaluation (0.2: >= 30 probes per class of a 10-class domain at the default experience size)")
    probe_max_images: int = Field(500, ge=0, description="probe images kept per experience")

    # replay
    replay_buffer: Literal["reservoir", "balanced"] = Field("reservoir", description="replay buffer kind")
    replay_share: float = Field(0.5, ge=0, le=0.9, description="share of each batch drawn from the replay buffer")
    replay_max_images: int = Field(2000, ge=1, description="replay buffer capacity in images")
    replay_max_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="replay buffer capacity in bytes")

    # state and checkpoints
    state_dir: Path = Field(Path("state"), description="where checkpoints, samples, index and metrics live")
    checkpoint_interval_s: float = Field(300, gt=0, description="seconds between mid-experience checkpoints")
    keep_experiences: int | None = Field(None, ge=1, description="experience checkpoints kept (newest N + snapshot-chosen); unset: all")
    keep_distinct: int = Field(2, ge=0, description="older experience checkpoints kept for being most unlike the kept ones")
    store_max_bytes: int = Field(1024**3, ge=1024, description="disk budget of the sample store")
    # defaults: replay.index_options.IndexOptions (one set, read by the library too)
    index_exact_max: int = Field(IndexOptions.exact_max, ge=1, description="vectors before the index turns approximate")
    index_shard_max: int = Field(IndexOptions.shard_max, ge=0, description="vectors per index shard before search fans out over several (0: one shard)")
    index_kind: Literal["ivf", "hnsw"] = Field(IndexOptions.kind, description="approximate index past index_exact_max")
    index_threads: int = Field(1, ge=0, le=256, description="FAISS threads of each index add, build and search (0: the calling thread's OpenMP count); 1 leaves the cores to training")
    index_ondisk: bool = Field(IndexOptions.ondisk, description="IVF shards serve their inverted lists memory-mapped from disk, not from RAM (docs/scaling.md)")
    indexer_share: float = Field(0.10, gt=0, le=1, description="share of training compute the indexer may spend embedding while training runs (docs/design.md, \"Index upkeep\")")
    evaluation_share: float = Field(0.05, gt=0, le=1, description="share of training compute the experience-end evaluation may spend while training runs; a row of R never lags more than one experience (docs/design.md, \"deploy — evaluation at each experience end\")")

    # service
    http_host: str = Field("127.0.0.1", description="bind address of the HTTP server")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP port (0: any free port)")
    http_allowed_hosts: str | None = Field(
        None, description="extra Host names (comma-separated name, name:port or *) answered on /admin/*, e.g. behind a proxy; the bind address (on loopback: localhost, 127.0.0.1, [::1]) with its port always is")
    admin_token: SecretStr | None = Field(
        None, description="bearer token for /admin/*; unset: a random one is written to <state_dir>/admin.token (0600) at each start; required off loopback")
    metrics_auth: bool = Field(False, description="/metrics also needs the admin bearer token (/healthz and /readyz stay open)")
    targets_dir: Path | None = Field(None, description="folder whose subfolders may be named as snapshot targets")
    upload_max_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest snapshot upload")
    log_format: Literal["auto", "json", "console"] = Field("auto", description="auto: console on a TTY, else JSON")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    stop_after_images: int | None = Field(None, ge=1, description="exit 0 after training this many images (demos, benchmarks)")
    audit_trained_ids: bool = Field(False, description="append every trained sample id to metrics/trained_ids.log")
    exit_when_idle_s: float | None = Field(None, gt=0, description="exit 0 after this long with no new records")

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        if value not in STRATEGIES:
            raise ValueError(f"must be one of {', '.join(STRATEGIES)}")
        return value

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str | None) -> str | None:
        if value is not None:
            from learners.backbones import BACKBONES  # torchvision: imported only when named

            if value not in BACKBONES:
                raise ValueError(f"must be one of {', '.join(BACKBONES)}")
        return value

    @model_validator(mode="after")
    def _token_off_loopback(self) -> Settings:
        token = self.admin_token.get_secret_value().strip() if self.admin_token else ""
        if self.http_host not in ("127.0.0.1", "localhost", "::1") and not token:  # "" disables auth
            raise ValueError("http_host: binding off loopback needs TAILORD_ADMIN_TOKEN")
        return self

    @field_validator("http_allowed_hosts")
    @classmethod
    def _host_list(cls, value: str | None) -> str | None:
        if value is not None:
            from deploy.http_api import HostPolicy

            HostPolicy.of("127.0.0.1", 0, value)  # ValueError names the bad entry
        return value

    @model_validator(mode="after")
    def _boundary_modes(self) -> Settings:
        if "boundary" not in self.model_fields_set and self.split_on_domain is not None:
            self.boundary = "header" if self.split_on_domain else "count"
        modes = {part.strip() for part in self.boundary.split(",") if part.strip()}
        unknown = sorted(modes - set(BOUNDARY_MODES))
        if unknown or not modes:
            raise ValueError(f"boundary: {unknown[0] if unknown else 'empty'!r} is not one of {', '.join(BOUNDARY_MODES)}")
        if self.split_on_domain is not None and self.split_on_domain != ("header" in modes):
            raise ValueError("split_on_domain: contradicts TAILORD_BOUNDARY (drop the deprecated setting)")
        self.boundary = ",".join(m for m in BOUNDARY_MODES if m in modes)
        return self

    @property
    def boundaries(self) -> frozenset[str]:
        """The boundary modes that are on, besides the count upper bound (`header`, `drift`)."""
        return frozenset(self.boundary.split(",")) - {"count"}

    def index_options(self, gpu: bool = False) -> IndexOptions:
        """The index's build options from these settings (``gpu``: search on GPU copies)."""
        return IndexOptions(exact_max=self.index_exact_max, kind=self.index_kind, gpu=gpu,
                            shard_max=self.index_shard_max, ondisk=self.index_ondisk, threads=self.index_threads)

    @model_validator(mode="after")
    def _ondisk_needs_ivf(self) -> Settings:
        if self.index_ondisk and self.index_kind != "ivf":
            raise ValueError("index_ondisk: on-disk inverted lists need TAILORD_INDEX_KIND=ivf")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        return env_settings, dotenv_settings, init_settings, file_secret_settings


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from env, `.env` and an optional TOML file; raise `SettingsError`."""
    values: dict[str, Any] = {}
    if config_file is not None:
        try:
            values = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"--config {config_file}: {exc}") from exc
        unknown = sorted(set(values) - set(Settings.model_fields))
        if unknown:
            raise SettingsError(f"--config {config_file}: unknown setting {unknown[0]!r}")
    values.update(overrides)
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise SettingsError(describe_error(exc)) from exc


def kafka_security(settings: Settings) -> dict:
    """The TAILORD_KAFKA_* settings as a plain dict for `streamer.kafka_client.client_config`."""
    password = settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
    return {"security_protocol": settings.kafka_security_protocol,
            "ssl_cafile": str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None,
            "ssl_certfile": str(settings.kafka_ssl_certfile) if settings.kafka_ssl_certfile else None,
            "ssl_keyfile": str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username, "sasl_plain_password": password}


def describe_error(exc: ValidationError) -> str:
    """One line naming the first bad setting, its value and what is allowed."""
    err = exc.errors()[0]
    loc = [str(part) for part in err.get("loc", ()) if part]
    msg = err["msg"].removeprefix("Value error, ")
    if not loc and ":" in msg:
        name, msg = msg.split(":", 1)
        loc = [name]
    name = ENV_PREFIX + loc[0].upper() if loc else "settings"
    value = err.get("input")
    shown = "" if isinstance(value, dict) or value is None else f"={str(value)[:60]!r}"
    return f"invalid setting {name}{shown}: {msg.strip()}"


def settings_table() -> str:
    """The configuration table for the README, generated from the model."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "unset" if default is None else f"`{default}`"
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)


def update_readme(path: Path) -> None:
    """Rewrite the table between the settings-table markers of a README."""
    text = path.read_text()
    start, end = "<!-- settings-table -->", "<!-- /settings-table -->"
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{start}\n{settings_table()}\n{end}{tail}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--update"]:
        update_readme(Path(sys.argv[2]))
    else:
        print(settings_table())
