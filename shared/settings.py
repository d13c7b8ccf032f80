"""Service settings, read from ``KAM_*`` environment variables."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Self

from limits import parse as parse_limit
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Environment(StrEnum):
    development = "development"
    test = "test"
    production = "production"


Minute = Annotated[int, Field(ge=0, le=59)]


class Settings(BaseSettings):
    """Every tunable of the service. Names map to ``KAM_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="KAM_", env_file=".env", extra="ignore")

    env: Environment = Environment.development
    database_url: str = Field(
        default="",
        description="SQLAlchemy URL, e.g. postgresql+asyncpg://kam@db/kam. Required outside dev.",
    )
    redis_url: str = Field(default="", description="redis://host:port/db. Required outside dev.")
    log_level: str = "INFO"
    log_json: bool = False

    # Connection pool and timeouts: a dead dependency must answer quickly, not hang a request.
    # Sized above the requests one process has in flight: a connection beyond the pool is
    # opened for one checkout and closed after it, and each is a new Postgres backend (with 16
    # concurrent single-event clients, a pool of 10 cost ~4 ms of server CPU per request).
    db_pool_size: int = Field(default=20, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    db_connect_timeout_s: float = Field(default=3.0, gt=0)
    db_statement_timeout_ms: int = Field(default=30_000, ge=0)
    redis_timeout_s: float = Field(default=2.0, gt=0)
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After sent with 503 answers.")
    enqueue_budget_s: float = Field(
        default=0.25,
        gt=0,
        description="The most one push of a job to Redis may take (the pushes of a request run "
        "a few dozen at once, and all give up after a first failure): a push that does not "
        "make it is left to the scorer's sweepers (the dirty mark is in Postgres).",
    )
    enqueue_pause_s: float = Field(
        default=2.0,
        ge=0,
        description="After a failed push, the pushes of this many seconds are skipped at once.",
    )

    key_cache_ttl_s: float = Field(
        default=1.0,
        ge=0,
        description="How long an API process trusts a verified key before looking it up again: "
        "a revoked key is refused by every process within this time.",
    )
    body_read_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="A request body that stalls this long between two reads is answered 408 "
        "and its connection closed. (Header timeouts belong to the reverse proxy.)",
    )
    keep_alive_timeout_s: int = Field(
        default=5, ge=1, description="An idle keep-alive connection is closed after this long."
    )

    # Ingestion limits.
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_batch_events: int = Field(default=1000, ge=1)

    # Scorer.
    queue_name: str = "kam:queue"
    rescore_debounce_s: float = Field(default=0.5, ge=0)
    sweep_interval_s: int = Field(default=30, ge=1)
    # How often the scorer checks whether a bulk load has gone quiet and needs a full pass.
    settle_interval_s: int = Field(default=15, ge=1)
    worker_max_jobs: int = Field(default=10, ge=1, description="Rescores one scorer runs at once.")
    job_timeout_s: int = Field(
        default=30,
        ge=1,
        description="Longest a rescore may run. arq keeps a started job's in-progress key for "
        "its queue's longest timeout plus 10 s, so this bounds how long a job of a killed "
        "worker waits before it runs again (the sweeper usually reclaims it sooner).",
    )
    shutdown_grace_s: int = Field(
        default=20,
        ge=0,
        description="On SIGTERM, how long running jobs may finish before the rest are handed "
        "back to the queue. Keep it below the orchestrator's grace period (30 s in Kubernetes).",
    )
    # The portfolio pass runs at these minutes past every hour: [0] hourly, [0, 30] twice.
    portfolio_pass_minutes: set[Minute] = Field(default={0}, min_length=1)
    portfolio_pass_timeout_s: int = Field(default=3600, ge=60)

    # The scorer's own HTTP port: /metrics, /healthz, /readyz. None: no port.
    scorer_http_host: str = "0.0.0.0"  # noqa: S104 - a probe port, reached by the orchestrator
    scorer_http_port: int | None = Field(default=9464, ge=0, le=65535)

    # Webhooks (DESIGN section 6).
    webhook_timeout_s: float = Field(
        default=10.0, gt=0, le=60, description="Whole-request limit of one delivery attempt."
    )
    webhook_retry_schedule_s: list[float] = Field(
        default=[5, 300, 1800, 7200, 18000, 36000, 36000],
        min_length=1,
        description="Waits before the retries that follow a failed first attempt; after the "
        "last the delivery is failed.",
    )
    webhook_retry_jitter: float = Field(
        default=0.2, ge=0, lt=1, description="Each wait is stretched or shrunk by up to this share."
    )
    webhook_allowed_hosts: set[str] = Field(
        default=set(),
        description="Development only: hosts a webhook may name over plain http, and whose "
        'address is not checked (a JSON list, e.g. ["localhost"]). Must be empty in production.',
    )
    webhook_disable_after_s: int = Field(
        default=5 * 24 * 3600,
        ge=60,
        description="An endpoint whose every attempt has failed for this long is disabled.",
    )
    webhook_secret_overlap_s: int = Field(
        default=24 * 3600, ge=0, description="How long a rotated-out secret keeps signing."
    )
    webhook_lease_margin_s: float = Field(
        default=30.0,
        gt=0,
        description="A claimed delivery is leased for the attempt's timeout plus this: a "
        "worker killed mid-send leaves it to be retried once the lease has run out.",
    )
    webhook_max_jobs: int = Field(
        default=20, ge=1, description="Webhook deliveries one scorer runs at once."
    )
    webhook_endpoint_concurrency: int = Field(
        default=4,
        ge=1,
        description="Deliveries one scorer sends at once to one endpoint; the others wait.",
    )
    webhook_sweep_interval_s: int = Field(
        default=5, ge=1, le=60, description="How often due deliveries are re-driven from Postgres."
    )

    # Rate limits (the `limits` notation: "200/second", "1000/minute"), shared by all replicas
    # through Redis.
    rate_limit_enabled: bool = True
    rate_limit_writes: str = Field(default="200/second", description="Writes per API key.")
    rate_limit_reads: str = Field(default="100/second", description="Reads per API key.")
    rate_limit_failed_auth: str = Field(
        default="30/minute",
        description="Failed authentications per client address; past it the address is "
        "locked out until the window ends.",
    )

    # Privacy.
    raw_payload_retention_days: int = Field(
        default=90,
        ge=1,
        description="Days a raw event's body is kept; after that only its hash and metadata "
        "stay (the scorer drops the bodies daily).",
    )

    # The workspace (/app/): people sign in with an API key for a signed session cookie.
    session_secret: SecretStr | None = Field(
        default=None,
        description="Signs the workspace's session cookies (32+ random characters). The API "
        "refuses to start without it in production; elsewhere a random one per process is used "
        "when unset.",
    )
    session_ttl_s: int = Field(
        default=8 * 3600, ge=60, description="How long a workspace sign-in lasts."
    )
    reporting_currency: str = Field(
        default="EUR",
        pattern=r"^[A-Z]{3}$",
        description="The currency the workspace shows summed money in (amounts are summed as "
        "sent, not converted).",
    )

    # Development only: where `kam dev` keeps the embedded Postgres and Redis.
    data_dir: str = ".kam"

    @field_validator("rate_limit_writes", "rate_limit_reads", "rate_limit_failed_auth")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        try:
            parse_limit(value)
        except ValueError as exc:
            raise ValueError(f"not a rate limit: {value!r} (e.g. '200/second')") from exc
        return value

    @model_validator(mode="after")
    def _require_real_servers_outside_dev(self) -> Self:
        if self.env is Environment.production:
            missing = [
                name
                for name, value in (
                    ("KAM_DATABASE_URL", self.database_url),
                    ("KAM_REDIS_URL", self.redis_url),
                )
                if not value
            ]
            if missing:
                raise ValueError(f"{', '.join(missing)} must be set in production")
            if self.webhook_allowed_hosts:
                raise ValueError("KAM_WEBHOOK_ALLOWED_HOSTS must be empty in production")

        return self


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()
