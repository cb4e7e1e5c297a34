"""L(w) = 1/2 * sum(a * w^2), so g = a * w: one step worked out by hand, for the fused optimizer
and for the per-tensor reference loop alike (which checks the reference too)."""

import pytest
import torch
from reference.lesam_loop import ReferenceSAM

from fused_lesam import FusedLESAM, FusedSAM


def one_step(make_opt, w0, a, lr=0.1):
    w = torch.nn.Parameter(torch.tensor(w0))
    a = torch.tensor(a)
    opt = make_opt([w], lr)

    def loss():
        return 0.5 * (a * w * w).sum()

    loss().backward()
    opt.first_step(zero_grad=True)
    perturbed = w.detach().clone()
    loss().backward()
    opt.second_step(zero_grad=True)
    return perturbed, w.detach(), opt


def fused_lesam(**kw):
    return lambda params, lr: FusedLESAM(params, torch.optim.SGD, lr=lr, varrho=1e-12, **kw)


def reference(mode, **kw):
    return lambda params, lr: ReferenceSAM(params, torch.optim.SGD, mode=mode, lr=lr, varrho=1e-12, **kw)


# w0 = (3, 4), a = (1, 1): g = (3, 4), ||g|| = 5.
CASES = {
    # sigma = 1: rho = 1/5 = 0.2, eps = 0.2 * (3, 4)/5 = (0.12, 0.16), g_hat = (3.12, 4.16),
    # w1 = w0 - 0.1 * g_hat. First-order loss increase g.eps = 0.36 + 0.64 = 1 = sigma.
    "lesam": (dict(sigma=1.0, rho_max=10.0), [3.12, 4.16], [2.688, 3.584]),
    # rho_max = 0.1 clips: eps = 0.1 * (0.6, 0.8) = (0.06, 0.08).
    "lesam-clipped": (dict(sigma=1.0, rho_max=0.1), [3.06, 4.08], [2.694, 3.592]),
    # LE-SAM+ alpha = 0.5: g_comb = 1.5 * (3.12, 4.16) - 0.5 * (3, 4) = (3.18, 4.24).
    "lesam-plus": (dict(sigma=1.0, rho_max=10.0, alpha=0.5), [3.12, 4.16], [2.682, 3.576]),
    # sigma = 0 (fully annealed): no perturbation, a plain SGD step with g.
    "lesam-sigma0": (dict(sigma=0.0, rho_max=10.0), [3.0, 4.0], [2.7, 3.6]),
}


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("case", list(CASES))
def test_lesam_by_hand(case, impl):
    kw, perturbed_expected, w1_expected = CASES[case]
    make = fused_lesam(**kw) if impl == "fused" else reference("lesam", **kw)
    perturbed, w1, _ = one_step(make, [3.0, 4.0], [1.0, 1.0])
    torch.testing.assert_close(perturbed, torch.tensor(perturbed_expected))
    torch.testing.assert_close(w1, torch.tensor(w1_expected))


def test_lesam_plus_released_form_by_hand():
    # g_hat - alpha * g = (3.12, 4.16) - 0.5 * (3, 4) = (1.62, 2.16); w1 = w0 - 0.1 * that.
    _, w1, _ = one_step(fused_lesam(sigma=1.0, rho_max=10.0, alpha=0.5, alpha_form="released"), [3.0, 4.0], [1.0, 1.0])
    torch.testing.assert_close(w1, torch.tensor([2.838, 3.784]))


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_sam_by_hand(impl):
    # rho = 0.5: eps = 0.5 * (0.6, 0.8) = (0.3, 0.4), g_hat = (3.3, 4.4), w1 = (2.67, 3.56).
    make = (
        (lambda p, lr: FusedSAM(p, torch.optim.SGD, lr=lr, rho=0.5)) if impl == "fused" else reference("sam", rho=0.5)
    )
    perturbed, w1, _ = one_step(make, [3.0, 4.0], [1.0, 1.0])
    torch.testing.assert_close(perturbed, torch.tensor([3.3, 4.4]))
    torch.testing.assert_close(w1, torch.tensor([2.67, 3.56]))


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_adaptive_lesam_by_hand(impl):
    # w0 = (1, 2), a = (3, 1): g = (3, 2), T g = |w| g = (3, 4), ||T g|| = 5, sigma = 1: rho = 0.2.
    # eps = rho * w^2 g / 5 = 0.2 * (3, 8) / 5 = (0.12, 0.32); g.eps = 0.36 + 0.64 = 1 = sigma.
    # g_hat = a * (w + eps) = (3.36, 2.32); w1 = (1 - 0.336, 2 - 0.232).
    make = (
        fused_lesam(sigma=1.0, rho_max=10.0, adaptive=True)
        if impl == "fused"
        else reference("lesam", sigma=1.0, rho_max=10.0, adaptive=True)
    )
    perturbed, w1, _ = one_step(make, [1.0, 2.0], [3.0, 1.0])
    torch.testing.assert_close(perturbed, torch.tensor([1.12, 2.32]))
    torch.testing.assert_close(w1, torch.tensor([0.664, 1.768]))


def test_telemetry_by_hand():
    _, _, opt = one_step(fused_lesam(sigma=1.0, rho_max=10.0), [3.0, 4.0], [1.0, 1.0])
    torch.testing.assert_close(opt.last_grad_norm, torch.tensor(5.0))
    torch.testing.assert_close(opt.last_rho, torch.tensor([0.2]))
    torch.testing.assert_close(opt.last_sigma, torch.tensor([1.0]))
    _, _, opt = one_step(fused_lesam(sigma=1.0, rho_max=0.1), [3.0, 4.0], [1.0, 1.0])
    torch.testing.assert_close(opt.last_rho, torch.tensor([0.1]))
