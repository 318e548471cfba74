"""Control networks: zero initialisation, the displacement scale c_k, shapes for vectors and sequences."""

from __future__ import annotations

import torch

from rlft.control.networks import NetworkControl, SequenceControlNet, VectorControlNet, build_control_net, score_coefficient


def test_untrained_networks_output_zero():
    x = torch.randn(5, 3)
    assert torch.equal(VectorControlNet((3,))(0.3, x), torch.zeros(5, 3))
    seq = torch.randn(5, 8, 4)
    assert torch.equal(SequenceControlNet((8, 4))(0.3, seq), torch.zeros(5, 8, 4))
    cond = VectorControlNet((3,), cond_shape=(2,))
    assert torch.equal(cond(0.1, x, torch.randn(5, 2)), torch.zeros(5, 3))


def test_scale_is_the_score_coefficient_of_the_ddpm_mean(gmm2d):
    """c_k from the forward kernel equals the score's coefficient in the chain's mean (module docstring)."""
    for k in range(gmm2d.num_steps):
        assert abs(score_coefficient(gmm2d, k) - gmm2d.coefficients.mean_score[k]) < 1e-12 * max(1.0, gmm2d.coefficients.mean_score[k])


def test_network_control_is_scale_times_network(gmm2d):
    torch.manual_seed(0)
    net = VectorControlNet((2,), zero_init=False).double()
    control = NetworkControl(gmm2d, net)
    x = torch.randn(4, 2, dtype=torch.float64)
    k = 7
    t = (gmm2d.time(k) - gmm2d.time(0)) / (gmm2d.time(gmm2d.num_steps - 1) + gmm2d.dt(gmm2d.num_steps - 1) - gmm2d.time(0))
    assert torch.allclose(control(k, x), gmm2d.coefficients.mean_score[k] * net(t, x))


def test_auto_network_choice_and_shapes():
    assert isinstance(build_control_net((6,)), VectorControlNet)
    assert isinstance(build_control_net((8, 4)), VectorControlNet)  # small sequences: MLP
    assert isinstance(build_control_net((200, 4)), SequenceControlNet)
    net = SequenceControlNet((12, 4), hidden=16)
    torch.nn.init.normal_(net.net[-1].weight)
    assert net(torch.rand(3), torch.randn(3, 12, 4)).shape == (3, 12, 4)
