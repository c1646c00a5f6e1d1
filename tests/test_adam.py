"""bab.adam.Adam: the same steps as torch.optim.Adam, and non-finite gradient entries ignored."""

import torch

from boundprop.bab.adam import Adam


def test_steps_match_torch_adam():
    torch.manual_seed(0)
    target = torch.randn(5)
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
