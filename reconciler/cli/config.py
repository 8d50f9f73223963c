"""`check-config`: validate the settings, the policy file, the tool definitions and the secrets they name, without
starting anything."""

from __future__ import annotations

import argparse

from llm_router import Tier
from policies.hooks import read_secret
from reconciler.assembly import assemble, webhooks
from reconciler.cli.common import find_config
from reconciler.connect import read_secured
from reconciler.settings import Settings, is_loopback, load_settings
from tools.declarative import DeclaredTool


def cmd_check_config(args: argparse.Namespace) -> int:
    path = find_config(args.config)
    settings = load_settings(path)
    print(f"settings {path or '(none found: defaults)'}: ok")
    print(_etcd_line(settings))
    parts = assemble(settings)  # loads and checks the policy file against the tools there are
    policy_file = settings.policies.file or "(none: built-in defaults)"
    print(f"policies {policy_file}: ok ({len(parts.policies.rules)} rules)")
    declared = [tool for tool in parts.tools if isinstance(tool, DeclaredTool)]
    print(_tools_line(declared, models=settings.llm.tiers.configured))
    hooks = webhooks(settings)
    approvals = settings.approvals
    token = read_secret(env=approvals.token_env, file=approvals.token_file, what="the HTTP approval token")
    print(f"approvals: {len(hooks)} webhooks, HTTP approvals {'on' if token else 'off (no token)'}")
    print(_llm_line(settings))
    alerts = settings.alerts
    if not alerts.enabled:
        print("alerts: POST /v1/alerts off")
        return 0
    alert_token = read_secret(env=alerts.token_env, file=alerts.token_file, what="the HTTP alerts token")
    print(f"alerts: POST /v1/alerts on, {'with a bearer token' if alert_token else 'open (no token)'}")
    return 0


def _etcd_line(settings: Settings) -> str:
    """How the daemon and the commands will reach etcd; the files and the password variable are read here."""
    etcd = settings.etcd
    where = ", ".join(etcd.endpoints) if etcd.endpoints else "embedded (no etcd.endpoints)"
    secured = read_secured(etcd)
    files = "; files read" if secured.tls is not None or secured.credentials is not None else ""
    remote = any(not is_loopback(endpoint.rpartition(":")[0]) for endpoint in etcd.endpoints)
    insecure = " over the network (etcd.insecure)" if remote and secured.tls is None else ""
    return f"etcd: {where}: {secured.describe()}{insecure}{files}"


def _tools_line(declared: list[DeclaredTool], *, models: bool) -> str:
    """The declarative tools `assemble` loaded: each program found and allowed, each secret read."""
    if not declared:
        return "tools: 0 declarative (tools.definitions names no file)"
    names = ", ".join(tool.name for tool in declared)
    kinds = sorted({kind for tool in declared for kind in tool.kinds})
    offered = f"; offered to a model planning {', '.join(kinds)}" if kinds else ""
    if kinds and not models:
        offered += " (no model in llm.tiers: offered to none)"
    return f"tools: {len(declared)} declarative ({names}){offered}"


def _llm_line(settings: Settings) -> str:
    """What `assemble` built for models: it has read every key already, or failed naming the missing one."""
    tiers = settings.llm.tiers
    if not tiers.configured:
        return "llm: off (no model in llm.tiers)"
    counts = ", ".join(f"{tier} {len(tiers.models(tier))}" for tier in Tier)
    kinds = ", ".join(sorted(settings.llm.kinds)) or "none"
    budget = settings.llm.budget.usd_per_hour
    spend = f"{budget} USD per hour" if budget is not None else "no budget"
    return f"llm: models by tier: {counts}; keys read; {spend}; kinds planned by a model: {kinds}"
