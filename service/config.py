"""Configuration in one place.

Sources, highest priority first: environment variables ``DICOM_FUSION_<SECTION>__<KEY>`` (e.g.
``DICOM_FUSION_LISTENER__PORT=11113``), then the TOML file given by ``--config`` or
``DICOM_FUSION_CONFIG``, then the defaults below. Settings are built by :func:`load_settings`, never at
import time, so importing a module never needs a full environment. Unknown keys in the TOML file are
errors: a typo in a hospital's config must not silently fall back to a default.
"""
from __future__ import annotations

import os
import re
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dicom_fusion.service.errors import ConfigError

ENV_PREFIX = "DICOM_FUSION_"
CONFIG_ENV = "DICOM_FUSION_CONFIG"
_AE_RE = re.compile(r"^[\x20-\x7e]{1,16}$")

_toml_path: ContextVar[Path | None] = ContextVar("dicom_fusion_toml_path", default=None)


def _check_ae(value: str) -> str:
    value = value.strip()
    if not _AE_RE.match(value) or "\\" in value:
        raise ValueError(f"AE title {value!r} must be 1-16 printable ASCII characters without backslash")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSSettings(_Section):
    """Optional DICOM TLS for the listener; all three paths set turns it on."""

    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None and self.key_file is not None


class ListenerSettings(_Section):
    ae_title: str = "DFUSION"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535)
    allowed_calling_aes: list[str] = Field(default_factory=list)
    max_associations: int = Field(16, ge=1)
    # a connection must send a whole A-ASSOCIATE-RQ within this; until then it holds no association slot
    handshake_timeout: float = Field(5.0, gt=0, le=60)
    max_associations_per_peer: int = Field(8, ge=1)  # connections (negotiating or associated) per peer address
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu_size: int = Field(0, ge=0)
    processes: int = Field(1, ge=1, le=64)  # listener processes sharing the port (SO_REUSEPORT; Linux)
    # bind with SO_REUSEPORT even when processes = 1: several `serve` processes on one host share the port
    reuse_port: bool = False
    commit_max_batch: int = Field(64, ge=1)  # instances per group commit (one sync + one ledger transaction)
    commit_max_delay_ms: float = Field(0.0, ge=0, le=1000)  # wait this long for more instances (0 = never)
    tls: TLSSettings = Field(default_factory=TLSSettings)

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))

    @field_validator("allowed_calling_aes")
    @classmethod
    def _check_allowed(cls, v: list[str]) -> list[str]:
        return [_check_ae(a) for a in v]


class PacsSettings(_Section):
    """Destination of the DICOM SR (C-STORE SCP, usually the PACS that sent the study)."""

    ae_title: str = "ORTHANC"
    host: str = "127.0.0.1"
    port: int = Field(4242, ge=1, le=65535)
    calling_ae_title: str = "DFUSION"
    timeout: float = 30.0

    _ae = field_validator("ae_title", "calling_ae_title")(classmethod(lambda cls, v: _check_ae(v)))


def redact_url(url: str) -> str:
    """`url` as it may be shown anywhere (config output, readiness, API, logs, errors): its userinfo
    replaced by `***` (`https://user:secret@host/fhir` -> `https://***@host/fhir`). The service-side twin
    of `dicom_fusion.fhir.client.redact_url` (the import rules keep `ops/` away from `fhir/`)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


class FhirSettings(_Section):
    """FHIR R4 server holding the EHR timeline and receiving the DiagnosticReport.

    An empty ``base_url`` disables FHIR: predictions are image-only and no report is owed.
    """

    base_url: str = ""
    auth_mode: Literal["none", "bearer", "client_credentials"] = "none"
    token: str = ""
    token_url: str = ""
    client_id: str = ""
    client_secret: str = ""
    scope: str = "system/*.read system/DiagnosticReport.write system/Observation.write"
    timeout: float = 10.0
    retries: int = Field(3, ge=0)
    verify_tls: bool = True
    ca_file: Path | None = None
    default_identifier_system: str = "urn:dicom-fusion:mrn"
    issuer_systems: dict[str, str] = Field(default_factory=dict)
    unavailable_wait_seconds: float = Field(60.0, ge=0)
    page_size: int = Field(1000, ge=1)
    search_elements: bool = False
    # One timeline fetch (patient lookup + every search, all pages, retries and waits) is bounded by a
    # deadline and caps; past any of them the job is predicted image-only with the reason (README
    # "Hostile peers"). Sized from the default card's 730-day window: five daily labs and vitals four
    # times a day for two years is ~7 000 Observations (~5 MB of JSON). max_resources leaves 7x that,
    # max_bytes fits it at ~2.7 KB a resource, max_pages at 100 a page (a common server cap on _count),
    # and the deadline lets a server answering 10 pages/s deliver 500 pages.
    timeline_deadline_seconds: float = Field(60.0, gt=0)
    max_pages: int = Field(500, ge=1)
    max_resources: int = Field(50_000, ge=1)
    max_bytes: int = Field(128 * 2**20, ge=1)
    # The longest Retry-After the timeline stage honours by re-scheduling the job (never by sleeping).
    retry_after_max_seconds: float = Field(120.0, ge=0)

    @property
    def enabled(self) -> bool:
        return bool(self.base_url)

    @property
    def shown_base_url(self) -> str:
        """`base_url` as it may be shown (readiness, config output, report links): without userinfo."""
        return redact_url(self.base_url)


class Hl7Settings(_Section):
    """Optional HL7 v2.5.1 ORU^R01 to a RIS over MLLP, beside the FHIR report; off by default."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(2575, ge=1, le=65535)
    sending_app: str = "DFUSION"
    sending_facility: str = ""
    receiving_app: str = ""
    receiving_facility: str = ""
    timeout: float = Field(10.0, gt=0)
    retries: int = Field(2, ge=0)


class BrokerSettings(_Section):
    """Celery broker. Empty url = embedded filesystem broker under ``<data_dir>/broker``."""

    url: str = ""
    visibility_timeout: int = Field(7200, ge=60)
    polling_interval: float = Field(0.1, gt=0)


class LedgerSettings(_Section):
    """SQLAlchemy URL of the ledger. Empty = SQLite (WAL) at ``<data_dir>/ledger.sqlite``."""

    url: str = ""


class SpoolSettings(_Section):
    dir: Path | None = None
    fsync: bool = True
    # How a group commit makes received data durable: "file" = fdatasync each file in its receiving
    # thread (associations sync concurrently); "filesystem" = one syncfs of the spool per batch.
    sync_mode: Literal["file", "filesystem"] = "file"
    # Low-water mark: under this much free space on the spool's filesystem the listener answers C-STORE
    # with 0xA700 (the sender retries later) before the disk is full; 0 = off. /readyz reports it.
    min_free_mb: float = Field(2048.0, ge=0)


CompletionMode = Literal["quiet", "pacs", "release"]


class CompletionSettings(_Section):
    """When a receiving study is complete (README "Completeness"): after `quiet_seconds` without a new
    instance (`quiet`); as soon as the ledger holds the instance counts the `[pacs]` node reports over
    C-FIND, `settle_seconds` after the last one (`pacs`; the quiet period when the PACS does not answer);
    or when the association that sent it is released (`release`, the quiet period as a backstop)."""

    mode: CompletionMode = "quiet"
    quiet_seconds: float = Field(10.0, ge=0)
    on_release: bool = False  # deprecated spelling of mode = "release"
    poll_seconds: float = Field(0.5, gt=0)
    settle_seconds: float = Field(2.0, ge=0)  # pacs: quiet time after the counts match
    max_wait_seconds: float = Field(600.0, gt=0)  # pacs: counts never match -> proceed with what is there
    requery_seconds: float = Field(30.0, gt=0)  # pacs: ask again while the counts do not match
    query_timeout_seconds: float = Field(5.0, gt=0)  # pacs: each C-FIND step; then the quiet period

    @model_validator(mode="before")
    @classmethod
    def _on_release_alias(cls, data: Any) -> Any:
        if not isinstance(data, dict) or "on_release" not in data:
            return data
        try:
            on_release = TypeAdapter(bool).validate_python(data["on_release"])
        except ValidationError:
            return data  # the field's own validation reports it
        if not on_release:
            return data
        mode = data.get("mode", "release")
        if mode != "release":
            raise ValueError(f"completion.on_release = true contradicts completion.mode = {mode!r}: on_release "
                             'is the deprecated spelling of mode = "release"; remove it')
        return {**data, "mode": "release"}

    @model_validator(mode="after")
    def _max_wait_covers_settle(self) -> CompletionSettings:
        if self.max_wait_seconds < self.settle_seconds:
            raise ValueError(f"completion.max_wait_seconds ({self.max_wait_seconds:g}) must be at least "
                             f"completion.settle_seconds ({self.settle_seconds:g})")
        return self


class ModelSettings(_Section):
    """Model card path; empty = the model shipped in the package."""

    card: Path | None = None
    # With `card` unset: the packaged fold ensemble of the radiograph model (inference/default_model/ensemble/:
    # 5 networks averaged, their spread reported, "indeterminate" when they disagree) instead of its single
    # network. Off by default: measured on a fresh cohort it gains no 0.01 ROC-AUC or ECE over the single
    # network at 3-4x the infer time (README "Model", docs/model-report/ensemble.md).
    ensemble: bool = False
    device: str = "auto"
    # Per study: Grad-CAM (a DICOM Secondary Capture next to the SR, and a PNG in the job folder) and
    # the top `explain_drivers` timeline features (integrated gradients) in the SR and the reports.
    explain: bool = True
    explain_drivers: int = Field(3, ge=0, le=20)
    # Lesion segmentation card (inference/card/segmenter.py): overrides the classifier card's `segmenter` key.
    # Unset = what the card says (absent there = no segmentation).
    segmenter: Path | None = None
    # The chest CT model of the implicit route `chest-ct` (README "Routing"), used only when no route is
    # configured: unset = the packaged one (inference/ct_model/), "" = no CT route.
    ct_card: str | None = None

    @model_validator(mode="after")
    def _one_model(self) -> ModelSettings:
        if self.ensemble and self.card is not None:
            raise ValueError("model.ensemble selects the packaged ensemble and model.card names another card; "
                             "set only one (for your own ensemble, point model.card at its ensemble card.toml)")
        return self


class RoutingSettings(_Section):
    """Which studies go to which model (README "Routing"); the routes themselves are `[[routes]]` tables
    in this file or in `file`."""

    file: Path | None = None  # a TOML file of [[routes]] tables (instead of [[routes]] here)
    phantom_pattern: str = ""  # QC phantoms: regular expression on PatientName / PatientID; never processed
    regex_timeout_ms: float = Field(50.0, gt=0, le=5000)  # per match: a pathological pattern is cut short
    # calling AE title -> priority of the jobs of studies it sends, on every route (a route's own
    # `priority_by_calling_ae` wins); README "Routing", "Priority"
    priority_by_calling_ae: dict[str, Literal["urgent", "normal", "background"]] = Field(default_factory=dict)


ReleaseMode = Literal["auto", "review"]


class ReleaseSettings(_Section):
    """When a result leaves the service (README "Review"): at once (`auto`) or after a clinician approved
    it (`review`). A route's `release` key overrides `mode` for its studies."""

    mode: ReleaseMode = "auto"
    # DiagnosticReport status of an auto-released result: nobody has looked at it, so `preliminary` unless
    # the site deliberately publishes AI output as final.
    auto_status: Literal["preliminary", "final"] = "preliminary"
    # review mode: send a preliminary DiagnosticReport at once ("AI result pending review"); the approval
    # updates that same resource to final, a rejection marks it entered-in-error.
    send_preliminary: bool = False
    # review mode: also send the UNVERIFIED SR (with its SC / SEG) to the PACS at once; the approval then sends
    # a VERIFIED SR that references it (Predecessor Documents Sequence), a rejection leaves it as it is
    send_preliminary_sr: bool = False
    review_timeout_hours: float = Field(24.0, gt=0)  # older results awaiting review are flagged and alerted
    organization: str = ""  # written as the verifying organisation of approved SRs (the site's name)


class StageTimeLimits(_Section):
    """Soft time limit of each stage, in seconds (README "Reliability"). Past it the stage fails like a
    transient error (retried with backoff, `dead` naming the setting once `worker.max_retries` is spent);
    `worker.hard_time_limit_grace_seconds` later the lease is no longer renewed, so the reaper re-enqueues
    the job even when the stage never returns (and the prefork pool kills its process)."""

    prepare: float = Field(300.0, gt=0)  # decoding a series: seconds even for a large CT
    # None: fhir.timeline_deadline_seconds + 30 s, so the fetch's own deadline (image-only) fires first
    timeline: float | None = Field(None, gt=0)
    infer: float = Field(900.0, gt=0)  # generous: first model load, Grad-CAM and segmentation on a CPU
    deliver: float = Field(300.0, gt=0)  # PACS (pacs.timeout per operation), FHIR report and HL7, retries


class WorkerSettings(_Section):
    queues: list[str] = Field(default_factory=lambda: ["cpu", "gpu", "io"])
    concurrency: int = Field(1, ge=1)
    pool: Literal["solo", "prefork", "threads"] = "solo"
    embedded: bool = True
    lease_seconds: float = Field(60.0, ge=2)
    queued_lease_seconds: float = Field(300.0, ge=2)
    reaper_interval_seconds: float = Field(5.0, gt=0)
    max_retries: int = Field(6, ge=0)
    retry_backoff_seconds: float = Field(2.0, gt=0)
    retry_backoff_max_seconds: float = Field(300.0, gt=0)
    # torch intra-op threads per worker process (0 = torch's default, one per core). 1 by default: on a
    # shared or busy host OpenMP threads of a small model spin against other processes (measured here:
    # 4.5 ms per prediction with 1 thread, 256 ms with 2 on a loaded 2-core machine).
    torch_threads: int = Field(1, ge=0)
    # models (classifier + segmenter of one card) a worker process keeps loaded after first use; the least
    # recently used is released beyond this (and its GPU memory returned with torch.cuda.empty_cache)
    max_loaded_models: int = Field(4, ge=1)
    soft_time_limits: StageTimeLimits = Field(default_factory=StageTimeLimits)
    hard_time_limit_grace_seconds: float = Field(30.0, gt=0)  # hard limit = soft limit + this


class ApiSettings(_Section):
    """REST API and dashboard (`dicom-fusion api`). Every route but /healthz and /readyz needs the token."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    token: str = ""
    token_file: Path | None = None  # a file holding the token (Docker/Kubernetes secret); wins over token
    auth: bool = True
    refresh_seconds: float = Field(5.0, gt=0)
    session_hours: float = Field(8.0, gt=0, le=24 * 30)  # a dashboard sign-in lasts this long
    # the session cookie's Secure flag: "auto" = when the request came over https (directly or, with
    # uvicorn's proxy headers, through a TLS-terminating proxy); "always" for sites that only serve https
    cookie_secure: Literal["auto", "always"] = "auto"
    # single sign-on through an authenticating reverse proxy: the header naming the signed-in user (a user of
    # `dicom-fusion users`), trusted only from these proxy addresses; empty = off
    trusted_user_header: str = ""
    trusted_proxies: list[str] = Field(default_factory=list)
    # /readyz probes (a FHIR request, a C-ECHO) run at most once per this many seconds, whatever the call rate
    readiness_cache_seconds: float = Field(5.0, ge=1, le=300)
    # /docs and /redoc (Swagger UI / ReDoc load scripts and fonts from public CDNs, and are served open
    # with /openapi.json): development only. Off, /openapi.json needs a token.
    docs: bool = False


class DicomwebSettings(_Section):
    """STOW-RS on the API (`{api}/dicomweb/studies`, README "DICOMweb (STOW-RS)")."""

    enabled: bool = True
    max_request_mb: float = Field(2048.0, gt=0)  # a larger body is refused (413) and nothing of it stored
    # the calling AE title recorded for instances stored over STOW-RS (routes can match CallingAE on it)
    calling_ae: str = "STOW"

    _ae = field_validator("calling_ae")(classmethod(lambda cls, v: _check_ae(v)))


class MetricsSettings(_Section):
    """Per-process Prometheus endpoints (what only that process knows); 0 = off.

    The API's /metrics serves the ledger-derived metrics that hold across processes and restarts.
    """

    host: str = "127.0.0.1"
    listener_port: int = Field(0, ge=0, le=65535)
    worker_port: int = Field(0, ge=0, le=65535)


class Settings(BaseSettings):
    """Every setting of dicom-fusion. See README "Configuration" for each key."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Path("var")
    log_level: str = "INFO"
    listener: ListenerSettings = Field(default_factory=ListenerSettings)
    pacs: PacsSettings = Field(default_factory=PacsSettings)
    fhir: FhirSettings = Field(default_factory=FhirSettings)
    hl7: Hl7Settings = Field(default_factory=Hl7Settings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    routes: list[dict[str, Any]] = Field(default_factory=list)  # checked by routing.routes.load_routes
    release: ReleaseSettings = Field(default_factory=ReleaseSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    dicomweb: DicomwebSettings = Field(default_factory=DicomwebSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _toml_path.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # Derived locations: defaults hang off data_dir so one directory holds an embedded install.
    @property
    def spool_dir(self) -> Path:
        return (self.spool.dir or self.data_dir / "spool").resolve()

    @property
    def ledger_url(self) -> str:
        return self.ledger.url or f"sqlite:///{(self.data_dir / 'ledger.sqlite').resolve()}"

    @property
    def broker_url(self) -> str:
        return self.broker.url or "filesystem://"

    @property
    def broker_dir(self) -> Path:
        return (self.data_dir / "broker").resolve()

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem://")

    def stage_time_limits(self, stage: str) -> tuple[float, float]:
        """(soft, hard) time limit in seconds of a stage (`prepare|timeline|infer|deliver`); the timeline's
        soft limit defaults to its FHIR fetch deadline plus 30 s."""
        soft = getattr(self.worker.soft_time_limits, stage)
        if soft is None:
            soft = self.fhir.timeline_deadline_seconds + 30.0
        return float(soft), float(soft) + self.worker.hard_time_limit_grace_seconds

    def model_card_path(self) -> Path:
        if self.model.card is not None:
            return self.model.card
        from importlib.resources import files

        packaged = files("dicom_fusion.inference") / "default_model"
        return Path(str(packaged / "ensemble" / "card.toml" if self.model.ensemble else packaged / "card.toml"))

    def ct_card_path(self) -> Path | None:
        """The card of the implicit `chest-ct` route: `model.ct_card`, else the packaged chest CT model;
        None when `model.ct_card` is empty (no CT route)."""
        if self.model.ct_card is not None:
            return Path(self.model.ct_card) if self.model.ct_card.strip() else None
        from importlib.resources import files

        return Path(str(files("dicom_fusion.inference") / "ct_model" / "card.toml"))

    def public_dict(self) -> dict[str, Any]:
        """Settings as a dict with secrets masked, for `dicom-fusion config` and logs: tokens and client
        secrets as `***`, URLs without their userinfo (`redact_url`: a broker, ledger or FHIR URL may carry
        `user:password@`)."""
        data = self.model_dump(mode="json")
        for key in ("token", "client_secret"):
            if data["fhir"].get(key):
                data["fhir"][key] = "***"
        if data["api"].get("token"):
            data["api"]["token"] = "***"
        for section, key in (("fhir", "base_url"), ("fhir", "token_url"), ("broker", "url"), ("ledger", "url")):
            if data[section].get(key):
                data[section][key] = redact_url(data[section][key])
        return data


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Build settings from defaults, the TOML file and the environment.

    ``config`` wins over ``DICOM_FUSION_CONFIG``. ``overrides`` (tests, the demo) win over everything.
    Raises :class:`ConfigError` with the offending key when validation fails.
    """
    raw = config if config is not None else os.environ.get(CONFIG_ENV) or None
    path = Path(raw).expanduser() if raw else None
    if path is not None and not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass --config PATH or unset {CONFIG_ENV}")
    token = _toml_path.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        where = f" in {path}" if path else ""
        raise ConfigError(
            f"invalid configuration{where}: {problems} "
            f"(keys can also be set as {ENV_PREFIX}<SECTION>__<KEY>)"
        ) from exc
    finally:
        _toml_path.reset(token)
