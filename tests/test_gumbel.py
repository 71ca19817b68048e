"""Gumbel-sigmoid estimator: distribution, temperature limit, gradients."""
import pytest
import torch

from g2quant.nn import gumbel_sigmoid


def test_probability_of_open_gate_is_sigmoid_of_logit():
    """P(G(a) > 0.5) = P(a + L > 0) = sigmoid(a) for logistic L. With n = 200,000 draws the
    binomial standard error is <= 0.0012; we allow 5 standard errors (0.006)."""
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.5, 2.0, 4.0])
    n = 200_000
    samples = gumbel_sigmoid(a.expand(n, -1), tau=0.9, generator=g)
    p_open = (samples > 0.5).float().mean(0)
    assert torch.all((p_open - torch.sigmoid(a)).abs() < 0.006), (p_open, torch.sigmoid(a))


def test_low_temperature_concentrates_at_zero_and_one():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(50_000, generator=g)
    near = lambda s: ((s < 0.01) | (s > 0.99)).float().mean().item()  # noqa: E731
    fractions = [near(gumbel_sigmoid(a, tau=t, generator=g)) for t in (1.0, 0.3, 0.1, 0.01, 0.001)]
    # |a + L| > 0.0046 is needed at tau = 0.001: about 99.8 % of the draws
    assert fractions == sorted(fractions)          # monotone in tau
    assert fractions[-1] > 0.99 and fractions[0] < 0.2


def test_gradients_are_finite_and_match_reparameterization():
    torch.manual_seed(2)
    a = torch.tensor([-30.0, -2.0, 0.0, 2.0, 30.0], requires_grad=True)
    s = gumbel_sigmoid(a, tau=0.5)
    s.sum().backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, (s * (1 - s) / 0.5).detach())


def test_hard_is_straight_through():
    torch.manual_seed(3)
    a = torch.randn(1000, requires_grad=True)
    g = torch.Generator().manual_seed(9)
    hard = gumbel_sigmoid(a, tau=0.9, hard=True, generator=g)
    assert set(hard.detach().unique().tolist()) <= {0.0, 1.0}
    hard.sum().backward()
    a2 = a.detach().clone().requires_grad_(True)
    soft = gumbel_sigmoid(a2, tau=0.9, generator=torch.Generator().manual_seed(9))
    soft.sum().backward()
    torch.testing.assert_close(a.grad, a2.grad)
    torch.testing.assert_close(hard.detach(), (soft.detach() > 0.5).float())


def test_noise_p_zero_is_sharpened_sigmoid():
    a = torch.randn(100)
    torch.testing.assert_close(gumbel_sigmoid(a, tau=0.3, noise_p=0.0), torch.sigmoid(a / 0.3))


def test_noise_p_applies_noise_to_that_fraction():
    a = torch.zeros(100_000)
    s = gumbel_sigmoid(a, tau=1.0, noise_p=0.2, generator=torch.Generator().manual_seed(4))
    frac_noisy = (s != 0.5).float().mean().item()
    assert abs(frac_noisy - 0.2) < 0.01


@pytest.mark.parametrize("kw,match", [(dict(tau=0), "tau"), (dict(noise_p=-0.1), "noise_p")])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        gumbel_sigmoid(torch.zeros(3), **kw)
