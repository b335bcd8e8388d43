"""Schemathesis against the server's own OpenAPI document, on a real `fermam serve` (issue 13).

Every check schemathesis has, on a fixed number of generated cases (a fixed seed and at most
SCHEMATHESIS_MAX_EXAMPLES fuzzed cases per operation: 500 by default, about 30 s here; set it
higher for a deeper run), must pass with zero failures, with the
settings of schemathesis.toml beside this file: 413 counts as a refusal of too many images, and
`positive_data_acceptance` is off (every schema-valid body succeeding would need a schema for
"base64 of a decodable image"; random base64 strings rightly get 415/422). schemathesis_hooks.py
skips one serialisation artefact. Everything else (no 5xx, documented statuses, content types and
headers, response bodies matching their schema, negative data refused, unsupported methods, missing
headers) is checked. The run is bounded by a count, not by time, so every machine tries the same
cases: a time budget made a faster CPU try more, and the result depended on the machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from server_process import start_server

HERE = Path(__file__).resolve().parent
MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "500"))


@pytest.mark.slow
def test_schemathesis_finds_no_failure(weights_path, tmp_path: Path) -> None:
    base, process = start_server(weights_path, "--max-files", "4")
    try:
        command = [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file", str(HERE / "schemathesis.toml"), "run", f"{base}/openapi.json",
            "--checks", "all", "--exclude-checks", "positive_data_acceptance",
            "--max-examples", str(MAX_EXAMPLES), "--workers", "1", "--request-timeout", "60",
            "--seed", "13", "--generation-database", "none", "--no-color",
        ]  # fmt: skip
        run = subprocess.run(
            command,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            env=os.environ | {"SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(HERE)},
        )
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        assert "generated" in run.stdout
        print(next(line for line in run.stdout.splitlines() if re.search(r"\d+ generated", line)).strip())
    finally:
        process.kill()
        process.wait(10)
