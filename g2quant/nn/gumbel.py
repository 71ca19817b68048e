"""Gumbel-sigmoid: the binary-gate estimator of G2-LSTM.

Li et al., "Towards Binary-Valued Gates for Robust LSTM Training", ICML 2018.
"""
from __future__ import annotations

import torch


def logistic_noise(shape, *, p: float = 1.0, device=None, dtype=None, generator=None) -> torch.Tensor:
    """``log U − log(1 − U)`` with U ~ Uniform(0, 1) (a Logistic(0, 1) sample, i.e. the
    difference of two Gumbel samples), zeroed per element with probability ``1 − p``."""
    u = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    if p >= 1.0:
        return torch.logit(u, eps=1e-6)
    # one uniform draw serves both choices: u < p selects "noisy", and u / p is then again
    # Uniform(0, 1) and independent of the selection
    return torch.where(u < p, torch.logit(u / p, eps=1e-6), torch.zeros_like(u))


def gumbel_sigmoid(logits: torch.Tensor, tau: float = 0.9, hard: bool = False,
                   noise_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample a relaxed Bernoulli gate from ``logits``.

    Forward map: ``G(a) = sigmoid((a + log U − log(1 − U)) / tau)``, with U ~ Uniform(0, 1)
    drawn independently per element (and per time step when called per step). The noise is
    applied only with probability ``noise_p`` per element; elsewhere ``G(a) = sigmoid(a / tau)``
    (the authors' released code uses ``noise_p = 0.2``, ``tau = 0.9``).
    ``P(G(a) > 0.5) = sigmoid(a)`` exactly when ``noise_p = 1``; as ``tau → 0`` samples tend to {0, 1}.

    Gradient: the reparameterised derivative ``dG/da = G (1 − G) / tau`` (noise is an input,
    not a parameter). With ``hard=True`` the forward value is ``1[G(a) > 0.5]`` and the gradient
    is that of the soft sample (straight-through estimator).

    Paper: Li, Qin, Xu, Shen, Wang, Liu — "Towards Binary-Valued Gates for Robust LSTM Training",
    ICML 2018, eq. (5)–(6).
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if not 0.0 <= noise_p <= 1.0:
        raise ValueError(f"noise_p must be in [0, 1], got {noise_p}")
    noise = logistic_noise(logits.shape, p=noise_p, device=logits.device, dtype=logits.dtype,
                           generator=generator)
    soft = torch.sigmoid((logits + noise) / tau)
    if not hard:
        return soft
    hard_value = (soft > 0.5).to(soft.dtype)
    return hard_value + (soft - soft.detach())
