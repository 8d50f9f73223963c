"""The operator's commands through real subprocesses: exit codes, one-sentence errors, config discovery,
the dry run that writes nothing, and the approval commands against a running daemon."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_cli import SETPOINT, config, daemon, run_cli, wait_phase  # noqa: F401  (fixtures)

from reconciler.embedded import free_port
from reconciler.settings import load_settings
from reconciler.store import EtcdStore, StoreUnavailableError


def one_sentence(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("setpoint: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def resources_file(tmp_path: Path, **contents: str) -> Path:
    root = tmp_path / "root"
    docs = [
        {"kind": "file", "name": name, "spec": {"path": str(root / name), "content": text}}
        for name, text in contents.items()
    ]
    path = tmp_path / "resources.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


async def etcd_revision(config_path: Path) -> int:
    settings = load_settings(config_path)
    async with EtcdStore(settings.etcd.endpoints) as store:
        return await store.ping()


def test_version_and_help_with_an_example() -> None:
    assert run_cli("--version").stdout.startswith("setpoint ")
    for command in ("plan", "approve", "reject", "delete", "replan", "check-config", "status", "apply", "issues"):
        help_text = run_cli(command, "--help").stdout
        assert "example:" in help_text and f"setpoint {command}" in help_text, command


def test_debug_works_after_the_subcommand(config: Path) -> None:  # noqa: F811
    result = run_cli("status", "NOT/A/KEY", "-c", str(config), "--debug", check=False)

    assert result.returncode == 1 and "Traceback" in result.stderr


@pytest.mark.parametrize("text", ["motd", "File/motd", "file/", "file/a/b", "/motd"])
def test_a_malformed_resource_name_is_one_sentence(config: Path, text: str) -> None:  # noqa: F811
    line = one_sentence(run_cli("status", text, "-c", str(config), check=False))

    assert f"{text!r} is not KIND/NAME" in line


def test_settings_are_found_like_kubeconfig(config: Path, tmp_path: Path) -> None:  # noqa: F811
    (tmp_path / "setpoint.yaml").write_text(config.read_text())

    from_cwd = run_cli("status", cwd=tmp_path)
    from_env = run_cli("status", env={"SETPOINT_CONFIG": str(config)})
    nothing = run_cli("status", check=False)

    assert from_cwd.stdout.split()[:2] == ["RESOURCE", "PHASE"]
    assert from_env.stdout.split()[:2] == ["RESOURCE", "PHASE"]
    assert "no etcd to talk to" in one_sentence(nothing)


def test_an_etcd_that_is_not_there_is_one_sentence_naming_it(tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"etcd": {"endpoints": [f"127.0.0.1:{port}"]}}))

    line = one_sentence(run_cli("status", "-c", str(path), check=False))

    assert f"etcd at 127.0.0.1:{port} is unavailable: " in line and "Connection refused" in line


@pytest.fixture
def silent_etcd() -> Iterator[str]:
    """An endpoint that accepts connections and never answers: a hung etcd."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in accepted:
        conn.close()
    server.close()


def test_an_etcd_that_does_not_answer_is_named_and_ctrl_c_ends_the_wait(tmp_path: Path, silent_etcd: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"etcd": {"endpoints": [silent_etcd], "request_timeout_seconds": 1}}))

    line = one_sentence(run_cli("status", "-c", str(path), check=False))
    waiting = tmp_path / "waiting.yaml"
    waiting.write_text(yaml.safe_dump({"etcd": {"endpoints": [silent_etcd]}}))  # the CLI waits 5 s at most
    proc = subprocess.Popen([*SETPOINT, "status", "-c", str(waiting)], stderr=subprocess.PIPE, text=True)
    time.sleep(2.5)  # past start-up, into the wait for etcd
    proc.send_signal(signal.SIGINT)

    assert line == f"setpoint: etcd at {silent_etcd} did not answer within 1 s"
    assert proc.wait(timeout=10) == 130


def test_the_dry_run_writes_nothing_and_reports_changes_in_its_exit_code(
    config: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    resources = resources_file(tmp_path, motd="hello\n")
    before = asyncio.run(etcd_revision(config))

    changes = run_cli("plan", "-f", str(resources), "--detailed-exitcode", "-c", str(config), check=False)
    as_json = run_cli("plan", "-f", "-", "-o", "json", "-c", str(config), stdin=resources.read_text())
    nothing = run_cli("plan", "--detailed-exitcode", "-c", str(config), check=False)

    assert changes.returncode == 2, changes.stderr
    assert "file/motd" in changes.stdout and "will run" in changes.stdout and "auto (defaults.low)" in changes.stdout
    assert "+hello" in changes.stdout, "a new file's content is shown as a diff"
    rows = json.loads(as_json.stdout)
    assert rows[0]["kind"] == "file" and rows[0]["decision"] == "auto" and rows[0]["steps"][0]["tool"] == "file.write"
    assert nothing.returncode == 0, nothing.stderr  # etcd holds nothing: no changes
    assert asyncio.run(etcd_revision(config)) == before, "the dry run wrote to etcd"
    assert not (tmp_path / "root" / "motd").exists()


def test_the_dry_run_exits_1_on_a_resource_that_cannot_work(config: Path, tmp_path: Path) -> None:  # noqa: F811
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"kind": "file", "name": "x", "spec": {"path": "/etc/passwd", "content": ""}}))

    line = one_sentence(run_cli("plan", "-f", str(bad), "--detailed-exitcode", "-c", str(config), check=False))

    assert "file/x: spec.path" in line


def test_apply_validates_per_kind_before_writing(config: Path, tmp_path: Path) -> None:  # noqa: F811
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"kind": "file", "name": "x", "spec": {"path": "/etc/passwd", "content": ""}}))
    good = resources_file(tmp_path, fine="ok\n")
    before = asyncio.run(etcd_revision(config))

    refused = one_sentence(run_cli("apply", "-f", str(bad), "-c", str(config), check=False))
    dry = run_cli("apply", "-f", str(good), "--dry-run", "-c", str(config))
    unknown = one_sentence(run_cli("apply", "-f", "-", "-c", str(config), check=False,
                                   stdin="kind: nope\nname: x\nspec: {}\n"))  # fmt: skip

    assert "file/x: spec.path" in refused
    assert "not written: --dry-run" in dry.stdout
    assert "no agent handles kind 'nope'" in unknown
    assert asyncio.run(etcd_revision(config)) == before


def test_check_config_validates_the_policy_file(config: Path, tmp_path: Path) -> None:  # noqa: F811
    settings = yaml.safe_load(config.read_text())
    policies = tmp_path / "policies.yaml"
    policies.write_text("defaults: {high: auto}\nrules: [{name: a, action: deny, match: {tools: file.delte}}]\n")
    settings["policies"] = {"file": str(policies)}
    config.write_text(yaml.safe_dump(settings))

    bad = one_sentence(run_cli("check-config", "-c", str(config), check=False))
    policies.write_text("defaults: {high: auto}\n")
    good = run_cli("check-config", "-c", str(config))

    assert f"policy file {policies} line 2" in bad and "'file.delte' matches no tool" in bad
    assert "ok" in good.stdout
    assert good.stdout.splitlines()[-1] == "alerts: POST /v1/alerts on, open (no token)"

    settings["alerts"] = {"token_file": str(tmp_path / "missing-token")}
    config.write_text(yaml.safe_dump(settings))
    missing = one_sentence(run_cli("check-config", "-c", str(config), check=False))
    assert "the HTTP alerts token" in missing and "missing-token" in missing


def test_delete_awaits_approval_and_approve_deletes_once(
    daemon: subprocess.Popen[bytes],  # noqa: F811
    config: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    resources = resources_file(tmp_path, gone="bye\n", kept="stay\n")
    run_cli("apply", "-f", str(resources), "-c", str(config))
    wait_phase(config, "file/gone", "Converged")
    wait_phase(config, "file/kept", "Converged")

    run_cli("delete", "file/gone", "-c", str(config))
    status = wait_phase(config, "file/gone", "AwaitingApproval")
    plan_id = str(status["plan_id"])
    table = run_cli("status", "-c", str(config)).stdout
    listed = run_cli("plans", "list", "--phase", "awaiting_approval", "-c", str(config)).stdout
    as_json = json.loads(run_cli("plans", "list", "file/gone", "-o", "json", "-c", str(config)).stdout)
    assert [p["state"] for p in as_json] == ["succeeded", "awaiting_approval"] and as_json[1]["id"] == plan_id
    shown = run_cli("plans", "show", plan_id, "-c", str(config)).stdout
    assert f"setpoint approve {plan_id}" in table and "AGE" in table.splitlines()[0]
    assert plan_id in listed and "approve (defaults.high)" in listed
    assert "decision   approve by defaults.high" in shown and "file.delete" in shown
    assert (tmp_path / "root" / "gone").exists()

    approved = run_cli("approve", plan_id, "--by", "alice", "-c", str(config))
    assert "approved by alice" in approved.stdout

    for _ in range(150):
        if not (tmp_path / "root" / "gone").exists():
            break
        time.sleep(0.1)
    assert not (tmp_path / "root" / "gone").exists()
    again = one_sentence(run_cli("approve", plan_id, "-c", str(config), check=False))
    assert f"plan {plan_id} is succeeded, not awaiting approval" in again

    run_cli("delete", "file/kept", "--keep", "-c", str(config))
    for _ in range(50):
        if run_cli("status", "file/kept", "-c", str(config), check=False).returncode == 1:
            break
        time.sleep(0.1)
    assert (tmp_path / "root" / "kept").read_text() == "stay\n", "--keep must leave the file"
    assert "no status for file/kept" in one_sentence(run_cli("status", "file/kept", "-c", str(config), check=False))


def test_reject_blocks_and_replan_plans_again(
    daemon: subprocess.Popen[bytes],  # noqa: F811
    config: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    resources = resources_file(tmp_path, held="x\n")
    run_cli("apply", "-f", str(resources), "-c", str(config))
    wait_phase(config, "file/held", "Converged")
    run_cli("delete", "file/held", "-c", str(config))
    plan_id = str(wait_phase(config, "file/held", "AwaitingApproval")["plan_id"])

    missing_reason = run_cli("reject", plan_id, "-c", str(config), check=False)
    run_cli("reject", plan_id, "--reason", "still needed", "--by", "bob", "-c", str(config))
    blocked = wait_phase(config, "file/held", "Blocked")
    run_cli("replan", "file/held", "-c", str(config))
    again = wait_phase(config, "file/held", "AwaitingApproval")

    assert missing_reason.returncode == 2 and "--reason" in missing_reason.stderr  # argparse's usage error
    assert "rejected by bob: still needed" in str(blocked["message"])
    assert again["plan_id"] != plan_id
    assert (tmp_path / "root" / "held").exists()
    assert "not KIND/NAME" in one_sentence(run_cli("replan", "held", "-c", str(config), check=False))


def test_status_json_has_kind_and_name_and_no_desired_content(
    daemon: subprocess.Popen[bytes],  # noqa: F811
    config: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    run_cli("apply", "-f", str(resources_file(tmp_path, secret="s3cret-value\n")), "-c", str(config))
    wait_phase(config, "file/secret", "Converged")

    rows = json.loads(run_cli("status", "-o", "json", "-c", str(config)).stdout)

    assert rows[0]["kind"] == "file" and rows[0]["name"] == "secret"
    assert "s3cret-value" not in json.dumps(rows) and "applied" not in rows[0]


def test_apply_in_several_transactions_says_what_was_written_when_one_fails(
    config: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from reconciler.cli import main

    resources = resources_file(tmp_path, **{f"f{i:03d}": "x\n" for i in range(130)})  # 128 per transaction
    calls = 0
    put_all = EtcdStore.put_all

    async def second_fails(self: EtcdStore, items: list[tuple[str, bytes]]) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise StoreUnavailableError("injected: etcd went away")
        return await put_all(self, items)

    monkeypatch.setattr(EtcdStore, "put_all", second_fails)

    code = main(["apply", "-f", str(resources), "-c", str(config)])

    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "injected: etcd went away; written before the failure: file/f000, " in err
    assert "file/f127; not written: file/f128, file/f129" in err


def test_issues_report_list_and_resolve(daemon: subprocess.Popen[bytes], config: Path, tmp_path: Path) -> None:  # noqa: F811
    run_cli("apply", "-f", str(resources_file(tmp_path, banner="hi\n")), "-c", str(config))
    wait_phase(config, "file/banner", "Converged")

    reported = run_cli(
        "issues", "report", "file/banner", "--summary", "banner looks odd", "--severity", "critical",
        "--id", "by-hand", "-c", str(config),
    )  # fmt: skip
    assert reported.stdout.splitlines() == ["reported issue by-hand on file/banner"]
    again = run_cli("issues", "report", "file/banner", "--summary", "x", "--id", "by-hand", "-c", str(config),
                    check=False)  # fmt: skip
    assert one_sentence(again) == (
        "setpoint: issue by-hand already exists on file/banner; resolve it first or choose another --id"
    )
    made_up = run_cli("issues", "report", "file/banner", "--summary", "second look", "-c", str(config))
    made_up_id = made_up.stdout.split()[2]
    assert made_up_id.startswith("cli-")

    deadline = time.monotonic() + 15
    while True:
        listed = json.loads(run_cli("issues", "list", "file/banner", "-o", "json", "-c", str(config)).stdout)
        if [item["state"] for item in listed] == ["unhealable", "unhealable"]:
            break
        assert time.monotonic() < deadline, listed
        time.sleep(0.1)
    by_hand = next(item for item in listed if item["id"] == "by-hand")
    assert by_hand["severity"] == "critical" and by_hand["summary"] == "banner looks odd"
    assert by_hand["source"].startswith("cli/") and by_hand["message"].startswith("no rule covers this issue")
    table = run_cli("issues", "list", "-c", str(config)).stdout.splitlines()
    assert any("banner looks odd (no rule covers this issue" in line for line in table), table
    assert table[0].split() == ["RESOURCE", "ID", "SEVERITY", "STATE", "SOURCE", "AGE", "SUMMARY"]
    assert any(line.startswith("file/banner") and "by-hand" in line and "unhealable" in line for line in table)
    status_table = run_cli("status", "file/banner", "-c", str(config)).stdout
    assert "2 (2 unhealable)" in status_table

    assert run_cli("issues", "resolve", "file/banner", "by-hand", "-c", str(config)).stdout.strip() == (
        "resolved issue by-hand on file/banner"
    )
    missing = run_cli("issues", "resolve", "file/banner", "by-hand", "-c", str(config), check=False)
    assert one_sentence(missing) == (
        "setpoint: no issue by-hand on file/banner; `setpoint issues list file/banner` shows them"
    )
    listed = json.loads(run_cli("issues", "list", "-o", "json", "-c", str(config)).stdout)
    assert [item["id"] for item in listed] == [made_up_id]


def test_issues_list_shows_an_unreadable_issue(config: Path) -> None:  # noqa: F811
    settings = load_settings(config)

    async def put() -> None:
        async with EtcdStore(settings.etcd.endpoints) as store:
            await store.put(f"{settings.etcd.prefix}/issues/file/x/broken", b"{nope")

    asyncio.run(put())
    listed = json.loads(run_cli("issues", "list", "-o", "json", "-c", str(config)).stdout)
    assert listed[0]["state"] == "invalid"
    assert listed[0]["message"].startswith("ignored by the daemon: value is not valid JSON")


def test_issues_report_refuses_a_kind_no_agent_handles(config: Path) -> None:  # noqa: F811
    refused = one_sentence(run_cli("issues", "report", "service/nginx", "--summary", "down", "-c", str(config),
                                   check=False))  # fmt: skip
    assert refused == "setpoint: no agent handles kind 'service' (known: file, process): nothing would heal it"
