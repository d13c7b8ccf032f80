"""Service settings, read from ``KAM_*`` environment variables."""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Self

from pydantic import Field, SecretStr, model_validator
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

    # Ingestion limits.
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    max_batch_events: int = Field(default=1000, ge=1)

    # Scorer.
    queue_name: str = "kam:queue"
    rescore_debounce_s: float = Field(default=0.5, ge=0)
    sweep_interval_s: int = Field(default=30, ge=1)
    # How often the scorer checks whether a bulk load has gone quiet and needs a full pass.
    settle_interval_s: int = Field(default=15, ge=1)
    worker_max_jobs: int = Field(default=10, ge=1)
    job_timeout_s: int = Field(default=300, ge=1)
    # The portfolio pass runs at these minutes past every hour: [0] hourly, [0, 30] twice.
    portfolio_pass_minutes: set[Minute] = Field(default={0}, min_length=1)
    portfolio_pass_timeout_s: int = Field(default=3600, ge=60)

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
    webhook_sweep_interval_s: int = Field(
        default=5, ge=1, le=60, description="How often due deliveries are re-driven from Postgres."
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
