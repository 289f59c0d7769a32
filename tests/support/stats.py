"""Goodness-of-fit checks of sampled tokens against a distribution."""

from __future__ import annotations

import torch
from scipy.stats import chisquare


def chi_square_p(observed: dict[int, int], probs: torch.Tensor, runs: int) -> float:
    """p-value of `observed` counts against `probs` (V,), tokens grouped into bins of expected
    count >= 5 (tokens in descending probability, each bin filled to >= 5)."""
    order = torch.argsort(probs, descending=True).tolist()
    obs, exp = [], []
    o_acc = e_acc = 0.0
    for t in order:
        o_acc += observed.get(t, 0)
        e_acc += float(probs[t]) * runs
        if e_acc >= 5:
            obs.append(o_acc)
            exp.append(e_acc)
            o_acc = e_acc = 0.0
    if e_acc > 0 or o_acc > 0:  # leftover mass joins the last bin
        obs[-1] += o_acc
        exp[-1] += e_acc
    assert len(obs) >= 3, "too few bins for a meaningful test"
    scale = sum(obs) / sum(exp)  # float rounding of the expected total
    return float(chisquare(obs, [e * scale for e in exp]).pvalue)
