"""The `sigma` command: real subprocess calls, one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def sigma(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sigmarec.cli", *args], capture_output=True,
                          text=True, env=ENV, cwd=cwd, timeout=300)


def test_data_stats_json_ml100k():
    r = sigma("data", "stats", "--dataset", "ml100k", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["users"] == 943 and s["items"] == 1682 and s["interactions"] == 100_000
    assert s["baskets"] is None
    assert s["sequence_length_quantiles"]["p0"] == 20


@pytest.mark.parametrize("args,needle", [
    (["run", "--profile", "nope"], "unknown profile"),
    (["run", "--profile", "tiny", "--set", "data.min_item_cnt=3"], "data.min_item_cnt"),
    (["data", "stats", "--dataset", "bogus"], "data.source"),
    (["run", "--profile", "tiny", "--force", "nostage"], "unknown stage"),
])
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path):
    r = sigma(*args, "--out", str(tmp_path / "run")) if args[0] == "run" else sigma(*args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert needle in r.stderr
    assert "Traceback" not in r.stderr


def test_files_source_error_names_file(tmp_path):
    f = tmp_path / "inter.csv"
    f.write_text("user_id,item_id,timestamp\nu1,i1,2020-01-01\nu1,i2,not-a-date\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{source: files, files: {{interactions: {f}}}}}\n")
    r = sigma("data", "stats", "--config", str(cfg))
    assert r.returncode == 2
    assert "inter.csv" in r.stderr and "timestamp" in r.stderr and "not-a-date" in r.stderr
    assert "Traceback" not in r.stderr
