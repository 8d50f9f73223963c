"""A command's stdout is its output: whatever the code under it logs (a model planner in `setpoint plan`, say)
goes to stderr, and only from warnings up; the logging set-up is given back afterwards."""

from __future__ import annotations

import argparse

import pytest
import structlog

import reconciler.cli as cli


def test_log_lines_go_to_stderr_from_warnings_up_and_the_set_up_is_restored(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def command(args: argparse.Namespace) -> int:
        log = structlog.get_logger("setpoint.test")
        log.debug("test.debug")
        log.info("llm.planned", planner="llm:small:openai/m")
        print('[{"resource": "banner/b"}]')
        log.warning("test.warning")
        return 0

    monkeypatch.setattr(cli, "cmd_check_config", command)
    before = structlog.get_config()

    assert cli.main(["check-config"]) == 0

    out, err = capsys.readouterr()
    assert out == '[{"resource": "banner/b"}]\n'
    assert "test.warning" in err and "llm.planned" not in err and "test.debug" not in err
    assert structlog.get_config() == before
