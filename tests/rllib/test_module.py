"""The drift RLModule: the untrained policy is the pretrained transition, and the KL term is the closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.rllib.core.columns import Columns
from ray.rllib.core.distribution.torch.torch_distribution import TorchDiagGaussian

from rlft.rllib.connectors import kl_from_dist_inputs
from rlft.rllib.modules import DriftPolicyModule, LoRAUNetPolicyModule, drift_control, drift_model_config, drift_spaces
from rlft.sampling import step_kl, transition


def build(model, inference_only: bool = False, **kw) -> DriftPolicyModule:
    obs_space, act_space = drift_spaces(model)
    cfg = drift_model_config([model.std(k) for k in range(model.num_steps)], **kw)
    return DriftPolicyModule(observation_space=obs_space, action_space=act_space, inference_only=inference_only, model_config=cfg)


def drift_obs(model, x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cat([x.float(), torch.full((x.shape[0], 1), k / model.num_steps)], dim=-1)


def test_untrained_policy_is_the_pretrained_transition(gmm2d):
    """log pi(a | x_k, k) = log N(x_{k+1}; m_k(x_k), s_k^2 I) for a = x_{k+1} - m_k(x_k), at every step."""
    torch.manual_seed(0)
    module = build(gmm2d)
    g = torch.Generator().manual_seed(1)
    for k in (0, 1, 17, gmm2d.num_steps - 1):
        x = torch.randn(64, 2, generator=g, dtype=torch.float64) * 2
        x_next = transition(gmm2d, k, x, generator=g)
        a = (x_next - gmm2d.mean(k, x)).float()
        out = module.forward_exploration({Columns.OBS: drift_obs(gmm2d, x, k)})
        dist = TorchDiagGaussian.from_logits(out[Columns.ACTION_DIST_INPUTS])
        ref = torch.distributions.Normal(gmm2d.mean(k, x), gmm2d.std(k)).log_prob(x_next).sum(-1)
        assert torch.allclose(dist.logp(a).double(), ref, atol=1e-4, rtol=1e-5)
        delta, log_std = out[Columns.ACTION_DIST_INPUTS].chunk(2, dim=-1)
        assert torch.equal(delta, torch.zeros_like(delta))
        assert torch.allclose(log_std.exp().double(), torch.full_like(x, gmm2d.std(k)), rtol=1e-6)


def test_kl_is_zero_at_init_and_the_closed_form_after_a_perturbation(gmm2d):
    module = build(gmm2d, mean_scale="std")
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(2))
    k = 9
    obs = drift_obs(gmm2d, x, k)
    assert torch.equal(kl_from_dist_inputs(module.forward_train({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]), torch.zeros(32))
    torch.manual_seed(3)
    torch.nn.init.normal_(module.mean_net[-1].weight, std=0.3)
    torch.nn.init.normal_(module.mean_net[-1].bias, std=0.3)
    adi = module.forward_train({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    delta = adi[:, :2]
    s = gmm2d.std(k)
    # delta = s_k * net (mean_scale "std"), and KL = |delta|^2 / (2 s^2) = KL(N(delta, s^2) || N(0, s^2))
    net = module.mean_net(module.features(obs))
    assert torch.allclose(delta, s * net, rtol=1e-5, atol=1e-7)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(delta.double(), s), torch.distributions.Normal(0.0, s)).sum(-1)
    kl = kl_from_dist_inputs(adi)
    assert (kl > 0).all()
    assert torch.allclose(kl.double(), exact, rtol=1e-4)
    assert torch.allclose(kl.double(), step_kl(delta.double(), s), rtol=1e-4)


@pytest.mark.parametrize("scale", ["variance", "one"])
def test_mean_scales(gmm2d, scale):
    module = build(gmm2d, mean_scale=scale)
    torch.nn.init.normal_(module.mean_net[-1].bias, std=1.0)
    k = 20
    obs = drift_obs(gmm2d, torch.zeros(4, 2), k)
    delta, _ = module.delta(obs)
    c = gmm2d.std(k) ** 2 if scale == "variance" else 1.0
    assert torch.allclose(delta, c * module.mean_net(module.features(obs)), rtol=1e-5)


def test_inference_only_module_has_no_value_net_and_control_matches_the_mean(gmm2d):
    learner_module = build(gmm2d)
    torch.nn.init.normal_(learner_module.mean_net[-1].weight, std=0.5)
    runner_module = build(gmm2d, inference_only=True)
    assert hasattr(learner_module, "value_net") and not hasattr(runner_module, "value_net")
    runner_module.set_state(learner_module.get_state(inference_only=True))
    x = torch.randn(8, 2, dtype=torch.float64)
    control = drift_control(runner_module, gmm2d.num_steps)
    delta = control(5, x, None)
    assert delta.dtype == torch.float64 and delta.shape == x.shape
    ref, _ = learner_module.delta(drift_obs(gmm2d, x, 5))
    assert torch.allclose(delta.float(), ref, atol=1e-6)
    values = learner_module.compute_values({Columns.OBS: drift_obs(gmm2d, x, 5)})
    assert values.shape == (8,)


def test_lora_unet_module_starts_at_the_pretrained_model(tmp_path):
    """The LoRA variant's delta = m^LoRA - m is exactly 0 before training (peft's B = 0) and moves after a step; the
    module builds its chain from the typed model config, as the envs do."""
    pytest.importorskip("peft")
    import gymnasium as gym

    from rlft.config import DiffusersModelConfig, model_config_to_dict
    from rlft.models.diffusers_chain import DiffusersChain
    from rlft.tasks.digits_unet import digits_scheduler_config, tiny_unet_config

    DiffusersChain.from_config(tiny_unet_config((8, 16)), digits_scheduler_config(), num_steps=3, seed=0).save_pretrained(tmp_path / "unet")
    model = model_config_to_dict(DiffusersModelConfig(type="diffusers", path=str(tmp_path / "unet")))
    cfg = drift_model_config([1.0, 1.0, 1.0], model=model, lora={"rank": 2})
    obs_space = gym.spaces.Box(-np.inf, np.inf, (65,), np.float32)
    act_space = gym.spaces.Box(-np.inf, np.inf, (64,), np.float32)
    module = LoRAUNetPolicyModule(observation_space=obs_space, action_space=act_space, inference_only=False, model_config=cfg)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad and not n.startswith("value_net")]
    assert trainable and all("lora_" in n for n in trainable)
    obs = torch.cat([torch.randn(3, 64), torch.tensor([[0.0], [1 / 3], [2 / 3]])], dim=-1)
    adi = module.forward_train({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS]
    assert torch.equal(adi[:, :64], torch.zeros(3, 64))
    assert torch.allclose(adi[:, 64].exp(), torch.tensor([module.chain.std(k) for k in range(3)]), rtol=1e-5)
    for p in module.chain.lora_parameters():
        torch.nn.init.normal_(p, std=0.1)
    assert module.forward_train({Columns.OBS: obs})[Columns.ACTION_DIST_INPUTS][:, :64].abs().max() > 0
