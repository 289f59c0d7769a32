"""run_core_bench on tiny models: every method runs, outputs agree, the report is JSON-able."""

from __future__ import annotations

import json

import pytest
from support.tiny_models import noisy_draft, tiny_model

from edgespec.bench.core import run_core_bench


def test_core_bench_report():
    target = tiny_model("llama", 160, seed=0, max_positions=128)
    draft = noisy_draft(target, 0.07, seed=2, noise_on_constants=False)
    prompts = [[5, 6, 7, 8], list(range(20, 32))]
    report = run_core_bench(
        target, draft, prompts, max_new_tokens=10, ks=(1, 3), reps=2, hf_assisted_ks=(2,)
    )
    json.dumps(report)
    rows = {(r["name"], r["k"]): r for r in report["methods"]}
    assert set(rows) == {
        ("target_only", None),
        ("speculative", 1),
        ("speculative", 3),
        ("hf_target_only", None),
        ("hf_assisted", None),
        ("hf_assisted", 2),
    }
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and len(row["tokens_per_s_reps"]) == 2
        assert row["matches_target"], row  # greedy: every method emits the same tokens
    spec = rows[("speculative", 3)]
    assert 0 < spec["acceptance_rate"] <= 1 and spec["mean_tokens_per_round"] >= 1
    assert rows[("hf_assisted", None)]["acceptance_rate"] is None
    assert report["best_speculative_k"] in (1, 3)
    assert report["best_vs_hf_assisted"] > 0 and report["speedup_vs_target_only"] > 0
    assert report["target"]["model_type"] == "llama" and report["config"]["n_prompts"] == 2


def test_core_bench_validates_arguments():
    target = tiny_model("llama", 160, seed=0, max_positions=128)
    with pytest.raises(ValueError, match="ks"):
        run_core_bench(target, target, [[1, 2]], max_new_tokens=4, ks=(0,), reps=1)
    with pytest.raises(ValueError, match="prompts"):
        run_core_bench(target, target, [[]], max_new_tokens=4, reps=1)
    with pytest.raises(ValueError, match="reps"):
        run_core_bench(target, target, [[1, 2]], max_new_tokens=4, reps=0)
