"""AcceptanceModel: identity at start, calibrates online, cheap and vectorised, serialisable."""
from __future__ import annotations

import torch

from adaspec_hf.efficiency.acceptance import AcceptanceModel, expected_calibration_error


def stream(gen: torch.Generator, n: int, power: float = 2.0):
    p = torch.rand(n, generator=gen)
    d = torch.randint(1, 6, (n,), generator=gen)
    y = (torch.rand(n, generator=gen) < p ** power).float()
    return p, d, y


def test_identity_at_start():
    m = AcceptanceModel()
    p = torch.linspace(0, 1, 101)
    assert torch.allclose(m.predict(p, 1), p, atol=1e-6)
    assert torch.allclose(m.predict(p.view(1, -1).expand(3, -1), torch.tensor([[1], [2], [5]])), p.expand(3, -1),
                          atol=1e-6)


def test_calibrates_to_draft_prob_squared():
    gen = torch.Generator().manual_seed(0)
    m = AcceptanceModel()
    p, d, y = stream(gen, 20000)
    before = m.ece(p, d, y)
    assert before > 0.1
    for _ in range(300):  # warm-up: 300 steps of 64 verified nodes
        m.update(*stream(gen, 64))
    after = m.ece(p, d, y)
    assert after < 0.05
    mid = m.predict(torch.tensor([0.5]), 2).item()
    assert abs(mid - 0.25) < 0.06


def test_float_targets_for_sampling():
    gen = torch.Generator().manual_seed(1)
    m = AcceptanceModel(depth_adjust=False)
    for _ in range(200):
        p = torch.rand(64, generator=gen)
        m.update(p, 1, p * 0.5)  # the acceptance rule's own probability
    p = torch.rand(5000, generator=gen)
    assert m.ece(p, 1, p * 0.5) < 0.05


def test_depth_adjustment():
    gen = torch.Generator().manual_seed(2)
    m = AcceptanceModel()
    for _ in range(300):
        p = torch.rand(64, generator=gen)
        d = torch.randint(1, 3, (64,), generator=gen)
        rate = torch.where(d == 1, p, p * 0.5)  # deeper nodes accepted half as often
        m.update(p, d, (torch.rand(64, generator=gen) < rate).float())
    q = torch.full((1,), 0.6)
    assert m.predict(q, 1).item() > m.predict(q, 2).item() * 1.3


def test_monotone_in_draft_prob():
    gen = torch.Generator().manual_seed(3)
    m = AcceptanceModel(prior_strength=1.0)
    for _ in range(20):  # few, noisy observations
        m.update(*stream(gen, 16))
    pred = m.predict(torch.linspace(0, 1, 201), 1)
    assert torch.all(pred[1:] >= pred[:-1] - 1e-9)
    assert pred.min() >= 0 and pred.max() <= 1


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(4)
    m = AcceptanceModel(n_bins=8, max_depth=6)
    for _ in range(50):
        m.update(*stream(gen, 32))
    m2 = AcceptanceModel.from_state_dict(m.state_dict())
    p, d, _ = stream(gen, 100)
    assert torch.equal(m.predict(p, d), m2.predict(p, d))
    m3 = AcceptanceModel()
    m3.load_state_dict(m.state_dict())
    assert m3.n_bins == 8 and torch.equal(m3.predict(p, d), m.predict(p, d))


def test_shapes_devices_dtypes():
    m = AcceptanceModel()
    m.update(torch.rand(4, 5), torch.arange(1, 6).expand(4, 5), torch.ones(4, 5))
    out = m.predict(torch.rand(4, 5, dtype=torch.float64), torch.arange(1, 6))
    assert out.shape == (4, 5) and out.dtype == torch.float64
    m.update(torch.rand(0), torch.zeros(0, dtype=torch.long), torch.zeros(0))  # empty steps are fine
    assert expected_calibration_error(torch.tensor([0.9, 0.1]), torch.tensor([1.0, 0.0])) < 0.11
