"""adam.Adam: the same steps as torch.optim.Adam, and non-finite gradient entries ignored."""

import torch

from boundprop.adam import Adam
from boundprop.algorithms.alpha import _Optimiser


def test_steps_match_torch_adam():
    """Also where a gradient entry is always 0 (its moment stays 0: the square root's slow case)."""
    torch.manual_seed(0)
    target = torch.randn(5)
    target[1] = 0.0
    ours, ref = torch.zeros(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    adam, reference = Adam([ours], 0.1), torch.optim.Adam([ref], lr=0.1)
    for _ in range(20):
        (grad,) = torch.autograd.grad(((ours - target) ** 2).sum(), [ours])
        adam.step([grad])
        reference.zero_grad()
        ((ref - target) ** 2).sum().backward()
        reference.step()
    torch.testing.assert_close(ours, ref)


def test_non_finite_gradient_entries_count_as_zero():
    p = torch.ones(3)
    Adam([p], 0.1).step([torch.tensor([float("nan"), float("inf"), 0.0])])
    assert torch.equal(p, torch.ones(3))


def test_alpha_optimiser_matches_torch_adam_with_exponential_decay():
    """alpha-CROWN's optimiser: torch.optim.Adam stepped with ExponentialLR, as auto_LiRPA's."""
    torch.manual_seed(1)
    target = torch.randn(4, 3)
    ours, ref = torch.zeros(4, 3, requires_grad=True), torch.zeros(4, 3, requires_grad=True)
    optimiser = _Optimiser("adam", 0.2, 0.9)
    reference = torch.optim.Adam([ref], lr=0.2)
    schedule = torch.optim.lr_scheduler.ExponentialLR(reference, 0.9)
    for _ in range(15):
        optimiser.step([ours], torch.autograd.grad(((ours - target) ** 2).sum(), [ours]))
        reference.zero_grad()
        ((ref - target) ** 2).sum().backward()
        reference.step()
        schedule.step()
    torch.testing.assert_close(ours, ref)
