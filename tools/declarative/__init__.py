"""Declarative tools: tools an operator defines in YAML, without writing Python.

Settings name the files (`tools.definitions`); each holds `tools:`, a list
of definitions:

    tools:
      - name: systemctl.restart           # dotted; never a built-in tool's name
        description: Restart a systemd unit.
        kind: command                     # command | http
        risk: medium                      # read_only | low | medium | high | critical
        idempotent: true                  # safe to run again after a crash cut it off
        timeout_seconds: 60               # defaults to 30
        kinds: [service]                  # a model planning these kinds is offered the tool
        parameters:                       # a small JSON schema (schema.py says what is supported)
          type: object
          properties:
            unit: {type: string, pattern: '^[A-Za-z0-9@._-]+\\.service$'}
          required: [unit]
        argv: [systemctl, restart, "{unit}"]

A `command` tool runs one program with an argv built from templates, never
through a shell (`templates.py`, `command.py`); the program must be allowed
by `tools.allowed_executables` (`executables.py`). An `http` tool makes one
request, with URL and JSON body templates, fixed headers that may carry
secrets from the environment, and the statuses it expects (`http.py`).

A definition is checked whole when loaded (`loader.py`), and every error is
one sentence naming the file, the line, the tool and the field. The
parameters become a pydantic model with `extra="forbid"`, so a plan step
naming a declared tool is validated like any other; a declared tool is in
the same registry as the built-in ones, can be named by policy rules, and
is shown in `setpoint plan` like them.

Two decisions beyond the schema. A value that starts a command's argument
may not start with `-` (the program would read it as an option: `-H host`
makes systemctl act on another machine), unless a literal `--` comes
before it in argv. And no declared tool runs with the daemon's environment
or follows a redirect, so neither an API key nor a secret header goes
anywhere the definition does not say.
"""

from tools.declarative.base import DeclaredTool
from tools.declarative.command import CommandTool
from tools.declarative.errors import ToolDefinitionError
from tools.declarative.http import HttpTool
from tools.declarative.loader import check_kinds, load_tools, register

__all__ = ["CommandTool", "DeclaredTool", "HttpTool", "ToolDefinitionError", "check_kinds", "load_tools", "register"]
