"""Calibration statistics (train/calibration.py), shared by the one-shot pruners and AWQ."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsert.runtime.errors import ConfigError
from sparsert.train.calibration import InputStats, collect_input_stats


def test_input_stats_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.randn(2, 5, 8, generator=g), torch.randn(7, 8, generator=g, dtype=torch.float64)
    s = InputStats(8, with_gram=True)
    s.add(x1)
    s.add(x2)
    x = torch.cat([x1.reshape(-1, 8).double(), x2])
    assert s.tokens == 17
    torch.testing.assert_close(s.abs_sum, x.abs().sum(0))
    torch.testing.assert_close(s.norms, x.pow(2).sum(0).sqrt().float())
    torch.testing.assert_close(s.mean_abs, x.abs().mean(0).float())
    torch.testing.assert_close(s.gram, x.t() @ x)
    assert InputStats(8).gram is None


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(4, 4)
        self.calls = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(self.a(self.emb(ids))))
        self.calls += 1  # reached only when the pass was not stopped
        return self.c(h)


def test_collect_input_stats_stops_each_pass_after_the_last_tap():
    torch.manual_seed(0)
    model = _Chain()
    batches = [torch.randint(0, 16, (2, 3)) for _ in range(2)]
    stats = collect_input_stats(model, {"a": model.a, "b": model.b}, batches, with_gram=False, what="test")
    assert model.calls == 0 and stats["a"].tokens == stats["b"].tokens == 12
    x = torch.cat([model.emb(b).reshape(-1, 8) for b in batches]).detach().double()
    torch.testing.assert_close(stats["a"].sumsq, x.pow(2).sum(0))
    assert not model._forward_pre_hooks and not model.a._forward_pre_hooks  # hooks removed
    with pytest.raises(ConfigError, match=r"^test: layer 'stray' never ran during the calibration forward passes$"):
        collect_input_stats(model, {"a": model.a, "stray": nn.Linear(8, 8)}, batches, with_gram=True, what="test")
