"""benchmarks/site_memory.py end to end on its --quick base: every configuration gets a row of
positive measurements, and the estimate rows say they are estimates."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "site_memory.py"
ROW = re.compile(
    r"^  (?P<label>(?:fp32|bf16|nf4)(?: \+ ckpt)?)\s+(?P<rss>[\d.]+) MiB\s+(?P<rss_x>[\d.]+)x"
    r"\s+(?P<step>[\d.]+)\s+(?P<step_x>[\d.]+)x\s+(?P<wall>[\d.]+)$"
)


@pytest.mark.slow
def test_quick_run_prints_every_configuration() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--steps", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = {m["label"]: m for m in map(ROW.match, done.stdout.splitlines()) if m}
    expected = ["fp32", "fp32 + ckpt", "bf16", "bf16 + ckpt"]
    if importlib.util.find_spec("bitsandbytes") is not None:
        expected += ["nf4", "nf4 + ckpt"]
    else:
        assert "no nf4 rows: bitsandbytes is not installed" in done.stdout
    assert sorted(rows) == sorted(expected), done.stdout
    for row in rows.values():
        assert all(float(row[key]) > 0 for key in ("rss", "rss_x", "step", "step_x", "wall")), row.group(0)
    assert rows["fp32"]["rss_x"] == "1.00" and rows["fp32"]["step_x"] == "1.00"
    assert "imports torch, transformers, peft and the command line peaks at" in done.stdout
    estimates = [line for line in done.stdout.splitlines() if line.startswith("  Llama-")]
    assert len(estimates) == 3 * 3 * 2  # 3 models x bf16/nf4/int8 x rank 16/64
    assert all(line.endswith("estimate, not measured") for line in estimates)
