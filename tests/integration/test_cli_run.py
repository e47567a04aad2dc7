"""``sims-lens run`` end to end on the embedded model, interrupted by its iteration limit and resumed."""

from __future__ import annotations

import csv
import json

import pytest

from sims_lens.cli import main

pytestmark = pytest.mark.integration

SMALL = [
    "iterations=1",
    "prompts_per_iteration=4",
    "samples_per_prompt=3",
    "max_new_tokens=12",
    "heldout_size=3",
    "eval_samples_per_prompt=1",
    "layers=[10, 15]",
    "margin=0.0",
]


def test_run_then_resume_for_one_more_iteration(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--no-progress"]
    assert main([*args, *[x for s in SMALL for x in ("--set", s)]]) == 0
    first = capsys.readouterr().out
    assert "base model pi_0" in first and "   1 " in first
    assert json.loads((out / "state.json").read_text())["completed_iterations"] == 1
    iter1 = (out / "steering" / "iter_001.safetensors").read_bytes()

    assert main([*args, "--resume", "--set", "iterations=2"]) == 0
    second = capsys.readouterr().out
    assert "resuming after iteration 1" in second and "   2 " in second
    assert (out / "steering" / "iter_001.safetensors").read_bytes() == iter1
    assert (out / "steering" / "iter_002.safetensors").is_file()
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    heldout = [r for r in rows if r["metric"] == "reward_mean" and r["split"] == "heldout"]
    assert [r["iteration"] for r in heldout] == ["0", "1", "2"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 4 * 3
    assert {s["label"] for s in samples} <= {"+", "-", ""}
