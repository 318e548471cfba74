"""The diffusers adapter against the schedulers' own `step`, its LoRA control, save/load, and the digits model.

Tiny randomly initialised UNets are built here (never downloaded). Chains and schedulers are moved to float64
(`make_chain`), so the comparisons with the schedulers' own arithmetic hold to ~1e-12.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from rlft import checkpoint
from rlft.models.base import ControlledChain
from rlft.models.diffusers_chain import DiffusersChain
from rlft.models.lora import LORA_CONFIG_FILE, LORA_STATE_FILE, LORA_WEIGHTS_FILE, LoRAConfig
from rlft.sampling import rollout, sample, step_kl

N_TRAIN = 100  # num_train_timesteps of the tiny schedulers (fast set_timesteps, same formulas)
K = 10

UNET = {
    "_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 2, "out_channels": 2,
    "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "attention_head_dim": 4,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
}
COND_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
    "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "attention_head_dim": 2,
    "cross_attention_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
#: (scheduler, eta, scheduler config): DDPM and DDIM (eta 0.5 and 1) in their default and less common settings.
CASES = {
    "ddpm": ("ddpm", 1.0, {}),
    "ddpm-fixed_large-noclip": ("ddpm", 1.0, {"variance_type": "fixed_large", "clip_sample": False}),
    "ddpm-v_prediction": ("ddpm", 1.0, {"prediction_type": "v_prediction", "beta_schedule": "squaredcos_cap_v2"}),
    "ddim-eta0.5": ("ddim", 0.5, {}),
    "ddim-eta1": ("ddim", 1.0, {"clip_sample": False}),
    "ddim-eta1-sd_style": ("ddim", 1.0, {"set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "sample"}),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions: one thread is fastest, and far faster on a shared machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def float64(chain: DiffusersChain) -> DiffusersChain:
    """The chain and its scheduler's tables in float64 (the scheduler's step then computes in float64 too)."""
    chain.to(dtype=torch.float64)
    for name in ("alphas_cumprod", "final_alpha_cumprod", "one"):
        if hasattr(chain.scheduler, name):
            setattr(chain.scheduler, name, getattr(chain.scheduler, name).double())
    return chain


def make_chain(case: str = "ddpm", num_steps: int = K, seed: int = 0) -> DiffusersChain:
    name, eta, sched = CASES[case]
    chain = DiffusersChain.from_config(UNET, {"num_train_timesteps": N_TRAIN, **sched}, num_steps, scheduler=name, eta=eta, seed=seed)
    return float64(chain)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def perturb_lora(chain: DiffusersChain, seed: int = 1, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in chain.lora_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# -- transitions equal the scheduler's own step ------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_mean_plus_std_noise_equals_scheduler_step(case):
    chain = make_chain(case)
    name, eta, _ = CASES[case]
    x = randn(3, 2, 8, 8)
    assert all(chain.std(k) > 1e-4 for k in range(K)), "every step must be stochastic"
    for k in (0, 1, K // 2, K - 1):
        tau = int(chain.scheduler.timesteps[k])
        out = chain.unet(x, tau).sample
        noise = randn(3, 2, 8, 8, seed=100 + k)
        if name == "ddpm":  # DDPMScheduler.step draws its noise itself: the same seeded generator gives the same noise
            ref = chain.scheduler.step(out, tau, x, generator=torch.Generator().manual_seed(100 + k)).prev_sample
        else:
            ref = chain.scheduler.step(out, tau, x, eta=eta, variance_noise=noise).prev_sample
        ours = chain.mean(k, x) + chain.std(k) * noise
        torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
        # the mean alone is the noiseless part of the step
        assert not torch.allclose(chain.mean(k, x), ref, atol=1e-3)


def test_conditional_unet_matches_scheduler_and_needs_cond():
    chain = float64(DiffusersChain.from_config(COND_UNET, {"num_train_timesteps": N_TRAIN}, K, scheduler="ddim", eta=1.0, cond_seq_len=3, seed=0))
    assert chain.event_shape == (1, 8, 8) and chain.cond_shape == (3, 8)
    x, cond = randn(2, 1, 8, 8), randn(2, 3, 8, seed=1)
    for k in (0, K - 1):
        tau = int(chain.scheduler.timesteps[k])
        out = chain.unet(x, tau, encoder_hidden_states=cond).sample
        noise = randn(2, 1, 8, 8, seed=k)
        ref = chain.scheduler.step(out, tau, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(chain.mean(k, x, cond) + chain.std(k) * noise, ref, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="encoder_hidden_states of shape"):
        chain.mean(0, x)
    with pytest.raises(ValueError, match="unconditional"):
        make_chain().mean(0, randn(2, 2, 8, 8), cond)
    out = sample(chain, 4, cond=cond.repeat(2, 1, 1), progress=False)
    assert out.x.shape == (4, 1, 8, 8) and torch.isfinite(out.x).all()


@pytest.mark.parametrize("case", ["ddpm", "ddim-eta0.5", "ddpm-v_prediction"])
def test_ode_step_is_the_ddim_eta0_step(case):
    chain = make_chain(case)
    ddim = DDIMScheduler.from_config(chain.scheduler.config)
    ddim.set_timesteps(chain.scheduler.num_inference_steps)
    ddim.alphas_cumprod, ddim.final_alpha_cumprod = ddim.alphas_cumprod.double(), ddim.final_alpha_cumprod.double()
    x = randn(3, 2, 8, 8)
    for k in (0, K // 2, K - 1):
        tau = int(chain.scheduler.timesteps[k])
        ref = ddim.step(chain.unet(x, tau).sample, tau, x, eta=0.0).prev_sample
        torch.testing.assert_close(chain.ode_step(k, x), ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("case", ["ddpm", "ddpm-v_prediction"])
def test_score_is_minus_eps_over_sigma(case):
    chain = make_chain(case)
    x = randn(3, 2, 8, 8)
    for k in (0, K - 1):
        tau = int(chain.scheduler.timesteps[k])
        ab = float(chain.scheduler.alphas_cumprod[tau])
        out = chain.unet(x, tau).sample
        eps = out if case == "ddpm" else math.sqrt(ab) * out + math.sqrt(1 - ab) * x  # v -> eps
        torch.testing.assert_close(chain.score(k, x), -eps / math.sqrt(1 - ab), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("case", ["ddpm", "ddim-eta1-sd_style"])
def test_noise_kernels_compose_to_the_add_noise_marginal(case):
    """Marginal at level K (add_noise) followed by the kernels K-1, ..., i equals add_noise at level i (float64)."""
    chain = make_chain(case)
    taus = [chain._timestep(k)[0] for k in range(K)] + [max(chain._timestep(K - 1)[1], 0)]
    ab = chain.scheduler.alphas_cumprod.double()

    def add_noise_scale_std(tau: int) -> tuple[float, float]:
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        t = torch.tensor([tau])
        sched = DDPMScheduler.from_config(chain.scheduler.config)
        sched.alphas_cumprod = ab
        return float(sched.add_noise(one, zero, t)), float(sched.add_noise(zero, one, t))

    scale, std = add_noise_scale_std(taus[K])
    var = std**2
    for i in range(K - 1, -1, -1):
        s, sd = chain.noise_kernel(i)
        scale, var = scale * s, var * s**2 + sd**2
        ref_scale, ref_std = add_noise_scale_std(taus[i])
        assert scale == pytest.approx(ref_scale, rel=1e-12)
        assert math.sqrt(var) == pytest.approx(ref_std, rel=1e-12)
    # and noise_step draws exactly scale * x + std * eps
    x = randn(4, 2, 8, 8)
    s, sd = chain.noise_kernel(3)
    torch.testing.assert_close(chain.noise_step(3, x, torch.Generator().manual_seed(5)), s * x + sd * randn(4, 2, 8, 8, seed=5))


def test_unclipped_ddpm_chain_is_the_coefficient_chain_of_its_levels():
    """Without x0 clipping the DDPM mean/ODE step are linear in the score with rlft.schedule's coefficients."""
    from rlft.schedule import LevelCoefficients

    chain = make_chain("ddpm-fixed_large-noclip")
    small = float64(DiffusersChain.from_config(UNET, {"num_train_timesteps": N_TRAIN, "clip_sample": False}, K, seed=0))
    ab = [small._level_alpha_bar(i) for i in range(K + 1)]
    times = [small.time(i) for i in range(K + 1)]
    coef = LevelCoefficients.from_alpha_bars(ab, times, variance="small")  # DDPM's fixed_small
    large = LevelCoefficients.from_alpha_bars(ab, times, variance="large")  # DDPM's fixed_large
    x = randn(3, 2, 8, 8)
    for k in range(0, K, 3):
        score = small.score(k, x)
        torch.testing.assert_close(small.mean(k, x), coef.mean_x[k] * x + coef.mean_score[k] * score, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(small.ode_step(k, x), coef.ode_x[k] * x + coef.ode_score[k] * score, atol=1e-12, rtol=1e-12)
        assert small.std(k) == pytest.approx(coef.std[k], rel=1e-12)
        assert small.noise_kernel(k) == pytest.approx((coef.kernel_scale[k], coef.kernel_std[k]), rel=1e-12)
        assert chain.std(k) == pytest.approx(large.std[k], rel=1e-12)


def test_time_grid_and_final_step_policy():
    chain = make_chain("ddpm")
    # DDPM's own last step is deterministic: the chain takes K + 1 timesteps and stops one step early
    assert chain.drops_final_step and chain.scheduler.num_inference_steps == K + 1
    assert chain._timestep(K - 1)[1] == int(chain.scheduler.timesteps[K]) >= 0
    for k in range(K):
        assert chain.time(k) == pytest.approx(1 - chain._timestep(k)[0] / N_TRAIN)
        assert chain.dt(k) > 0
    assert sum(chain.dt(k) for k in range(K)) == pytest.approx(chain.time(K) - chain.time(0))
    sd = make_chain("ddim-eta1-sd_style")  # set_alpha_to_one=False: the last step is already stochastic
    assert not sd.drops_final_step and sd.scheduler.num_inference_steps == K


def test_bad_configurations_raise_clear_errors():
    with pytest.raises(ValueError, match=r"eta must be in \(0, 1\].*got 0"):
        DiffusersChain.from_config(UNET, {"num_train_timesteps": N_TRAIN}, K, scheduler="ddim", eta=0.0)
    with pytest.raises(ValueError, match="no effect with a DDPM"):
        DiffusersChain.from_config(UNET, {"num_train_timesteps": N_TRAIN}, K, scheduler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="variance_type 'learned_range'"):
        DiffusersChain.from_config(UNET, {"num_train_timesteps": N_TRAIN, "variance_type": "learned_range"}, K)
    with pytest.raises(ValueError, match=r"num_steps \(200\) must be <= .*num_train_timesteps \(100\)"):
        DiffusersChain.from_config(UNET, {"num_train_timesteps": N_TRAIN}, 200)
    with pytest.raises(ValueError, match=r"scheduler must be one of \('ddpm', 'ddim'\)"):
        DiffusersChain.from_config(UNET, {}, K, scheduler="euler")
    with pytest.raises(ValueError, match="supported UNets"):
        DiffusersChain.from_config({**UNET, "_class_name": "UNet1DModel"}, {}, K)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2, 8, 8\)"):
        make_chain().mean(0, randn(2, 1, 8, 8))


def test_mean_is_differentiable_in_x_repeatedly():
    chain = make_chain("ddim-eta0.5")
    x = randn(2, 2, 8, 8).requires_grad_(True)
    for _ in range(2):  # a second backward through a fresh graph must work (no stale cached graph)
        chain.mean(3, x).pow(2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in chain.unet.parameters()), "the pretrained UNet is frozen"


# -- LoRA -----------------------------------------------------------------------------------------------


def test_zero_initialised_lora_gives_zero_delta_and_leaves_the_base_mean():
    chain = make_chain("ddpm")
    x = randn(4, 2, 8, 8)
    steps = (0, K // 2, K - 1)
    base = {k: chain.mean(k, x) for k in steps}
    params = chain.add_lora(rank=2, seed=0)
    assert params and all(p.requires_grad for p in params)
    assert set(chain.lora_config.target_modules) == {"to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"}
    assert chain.lora_config == LoRAConfig(2, 2.0, chain.lora_config.target_modules)
    control = chain.lora_control()
    for k in steps:
        assert torch.equal(control(k, x), torch.zeros_like(x))
        assert torch.equal(chain.mean(k, x), base[k])
    perturb_lora(chain)
    for k in steps:
        assert torch.equal(chain.mean(k, x), base[k]), "mean() is always the pretrained mean"
        assert control(k, x).abs().max() > 1e-3
        torch.testing.assert_close(control(k, x), chain.lora_mean(k, x) - base[k])


def test_lora_control_samples_the_fine_tuned_chain_and_saves_a_unet_call():
    chain = make_chain("ddim-eta0.5")
    before = sample(chain, 8, seed=3, progress=False).x
    chain.add_lora(rank=2, seed=0)
    perturb_lora(chain)
    control = chain.lora_control()
    tuned = sample(chain, 8, control=control, seed=3, progress=False)
    plain = sample(chain, 8, seed=3, progress=False)
    assert torch.equal(plain.x, before), "without the control the chain samples the pretrained model"
    assert (tuned.x - plain.x).abs().max() > 1e-2 and (tuned.kl > 0).all()
    # the controlled chain is the LoRA chain, and its path KL is sum_k |delta_k|^2 / (2 s_k^2)
    x0, noise = randn(2, 2, 8, 8, seed=4), randn(2, K, 2, 8, 8, seed=5)
    calls = []
    hook = chain.unet.register_forward_hook(lambda *a: calls.append(1))
    out = rollout(chain, x0, control, noise=noise, keep_path=True)
    hook.remove()
    assert len(calls) == 2 * K, "control + transition share the base UNet call"
    x, kl = x0, torch.zeros(2, dtype=torch.float64)
    for k in range(K):
        torch.testing.assert_close(out.path[:, k], x)
        delta = chain.lora_mean(k, x) - chain.mean(k, x)
        kl = kl + step_kl(delta, chain.std(k))
        x = chain.lora_mean(k, x) + chain.std(k) * noise[:, k]
    torch.testing.assert_close(out.x, x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.kl, kl, rtol=1e-10, atol=1e-12)


def test_gradients_reach_the_lora_through_a_rollout():
    chain = make_chain("ddpm")
    params = chain.add_lora(rank=2, seed=0)
    out = rollout(chain, randn(2, 2, 8, 8), chain.lora_control(), noise=randn(2, K, 2, 8, 8, seed=1))
    (out.x.pow(2).sum() + out.kl.sum()).backward()
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in chain.unet.parameters() if not p.requires_grad)


def test_elegant_on_a_lora_adapter_defaults_to_the_back_propagated_gradient():
    """The likelihood-ratio pass would be a second UNet pass per step: LoRA adapters keep pathwise_weight 1."""
    from rlft.config import task_from_dict
    from rlft.control.elegant import ElegantLearner

    task = task_from_dict({"model": {"type": "gmm", "weights": [1.0], "means": [[0.0, 0.0]], "stds": [1.0]},
                           "reward": {"type": "quadratic", "center": [0.0, 0.0]}, "alpha": 1.0, "num_steps": K, "seed": 0})
    lrn = ElegantLearner(task, make_chain("ddpm"), lambda x: -x.flatten(1).pow(2).sum(1), learn_init=False)
    assert lrn.uses_lora
    assert (lrn.options.pathwise_weight, lrn.options.drift_iterations, lrn.options.drift_iterations_per_train_iteration) == (1.0, 2000, 10)


def test_save_and_load_lora_round_trip(tmp_path):
    chain = make_chain("ddpm")
    chain.add_lora(rank=3, lora_alpha=6, target_modules=["to_q", "to_v", "conv2"], seed=0)
    perturb_lora(chain)
    chain.save_lora(tmp_path / "lora")
    assert {p.name for p in (tmp_path / "lora").iterdir()} == {LORA_WEIGHTS_FILE, LORA_STATE_FILE}
    other = make_chain("ddpm")
    other.load_lora(tmp_path / "lora")
    assert other.lora_config == chain.lora_config
    x = randn(3, 2, 8, 8)
    for k in (0, K - 1):
        assert torch.equal(other.lora_control()(k, x), chain.lora_control()(k, x))
    with pytest.raises(FileNotFoundError, match="holds no LoRA"):
        make_chain().load_lora(tmp_path)
    with pytest.raises(ValueError, match="already has a LoRA"):
        other.add_lora()
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] match no module"):
        make_chain().add_lora(target_modules=["nope"])


def test_adapters_written_before_the_checkpoint_module_still_load(tmp_path):
    """Format version 1: lora_config.json (format rlft-lora) + lora.safetensors, as save_lora wrote them before."""
    chain = make_chain("ddpm")
    chain.add_lora(rank=2, lora_alpha=3, target_modules=["to_q", "conv1"], seed=0)
    perturb_lora(chain)
    old = tmp_path / "old"
    old.mkdir()
    meta = {"format": "rlft-lora", "version": 1, "unet_class": "UNet2DModel", "rank": 2, "lora_alpha": 3.0,
            "target_modules": ["to_q", "conv1"]}
    (old / LORA_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    checkpoint.save_tensors(old / LORA_WEIGHTS_FILE, {n: p for n, p in chain.unet.named_parameters() if "lora_" in n},
                            metadata={"format": "rlft-lora"})
    other = make_chain("ddpm")
    other.load_lora(old)
    assert other.lora_config == LoRAConfig(2, 3.0, ("to_q", "conv1")) == chain.lora_config
    x = randn(3, 2, 8, 8)
    assert torch.equal(other.lora_control()(4, x), chain.lora_control()(4, x))
    (old / LORA_STATE_FILE).write_text(json.dumps({"format": "rlft-lora", "version": 7}))
    with pytest.raises(ValueError, match=r"written by rlft-lora version 7.*upgrade rlft"):
        make_chain("ddpm").load_lora(old)


def test_lora_config_round_trips_and_names_bad_values():
    cfg = LoRAConfig(rank=3, lora_alpha=6, target_modules=["to_q", "conv2"])
    assert cfg.target_modules == ("to_q", "conv2") and cfg.lora_alpha == 6.0
    assert LoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert LoRAConfig.from_dict({}) == LoRAConfig()
    with pytest.raises(ValueError, match=r"lora.colour is not a known key"):
        LoRAConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1 \(got 0\)"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match=r"lora_alpha must be > 0"):
        LoRAConfig(lora_alpha=-1.0)


@pytest.mark.parametrize("case", ["ddpm-fixed_large-noclip", "ddim-eta1"])
def test_controlled_chain_of_the_lora_control_is_the_fine_tuned_model(case):
    """Unclipped schedulers: mean and ODE step are affine in the score, so ControlledChain(chain, lora_control) has the
    LoRA chain's own score -eps_lora / sqrt(1 - ab) and ODE step (computed here with the adapter switched on)."""
    chain = make_chain(case)
    chain.add_lora(rank=2, seed=0)
    perturb_lora(chain)
    tuned = ControlledChain(chain, chain.lora_control())
    x = randn(3, 2, 8, 8)
    for k in (0, K // 2, K - 1):
        with chain._adapters_enabled(True):
            x0, eps = chain._predict(k, x, None)
            want_ode = math.sqrt(chain._steps[k].alpha_bar_prev) * x0 + math.sqrt(1 - chain._steps[k].alpha_bar_prev) * eps
        want_score = -eps / math.sqrt(1.0 - chain._steps[k].alpha_bar)
        assert (want_score - chain.score(k, x)).abs().max() > 1e-3  # the LoRA really moved the score
        torch.testing.assert_close(tuned.score(k, x), want_score, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(tuned.ode_step(k, x), want_ode, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(tuned.mean(k, x), chain.lora_mean(k, x), atol=1e-12, rtol=1e-12)
    clipped = make_chain("ddpm")
    clipped.add_lora(rank=2, seed=0)
    assert clipped.score_coefficients(0) is None
    with pytest.raises(NotImplementedError, match="affine in the score"):
        ControlledChain(clipped, clipped.lora_control()).score(0, x)


def test_registry_builder_loads_a_directory(tmp_path):
    from rlft import registry
    from rlft.config import DiffusersModelConfig

    make_chain("ddpm").save_pretrained(tmp_path / "m")
    chain = registry.resolve("model", "diffusers")(DiffusersModelConfig(type="diffusers", path=str(tmp_path / "m")), 4)
    assert isinstance(chain, DiffusersChain) and chain.num_steps == 4 and chain.kind == "ddpm"


def test_merge_lora_makes_the_fine_tuned_mean_the_pretrained_one():
    chain = make_chain("ddim-eta0.5")
    chain.add_lora(rank=2, seed=0)
    perturb_lora(chain)
    x = randn(3, 2, 8, 8)
    tuned = [chain.lora_mean(k, x) for k in (0, K - 1)]
    chain.merge_lora()
    assert not chain.has_lora and not chain.lora_parameters()
    for m, k in zip(tuned, (0, K - 1)):
        torch.testing.assert_close(chain.mean(k, x), m, atol=1e-10, rtol=1e-10)  # W + s B A vs W x + s B A x


# -- loading and saving ------------------------------------------------------------------------------------


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    chain = DiffusersChain.from_config(UNET, {"num_train_timesteps": N_TRAIN}, K, seed=0)  # float32, as loaded
    chain.add_lora(rank=2, seed=0)
    perturb_lora(chain)  # save_pretrained writes the pretrained (base) model, not the LoRA
    chain.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "unet" / "config.json").is_file()
    assert (tmp_path / "model" / "scheduler" / "scheduler_config.json").is_file()
    loaded = DiffusersChain.from_pretrained(tmp_path / "model", num_steps=K)
    x = randn(3, 2, 8, 8).float()
    for k in range(K):
        assert torch.equal(loaded.mean(k, x), chain.mean(k, x))
        assert loaded.std(k) == chain.std(k)
    ddim = DiffusersChain.from_pretrained(str(tmp_path / "model"), num_steps=K, scheduler="ddim", eta=0.5)
    assert isinstance(ddim.scheduler, DDIMScheduler) and ddim.std(0) == pytest.approx(0.5 * chain.std(0), rel=1e-5)


def test_missing_model_paths_raise_clear_errors(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=r"no_such_model.*not a local directory.*network"):
        DiffusersChain.from_pretrained(missing, num_steps=K)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/unet/config.json does not exist"):
        DiffusersChain.from_pretrained(tmp_path / "empty", num_steps=K)


# -- the digits model -----------------------------------------------------------------------------------


def test_digits_data_and_tiny_unet_config():
    from rlft.tasks.digits import load_digits_data
    from rlft.tasks.digits_unet import tiny_unet_config

    x, y = load_digits_data()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert x.min() == -1 and x.max() == 1 and set(y.tolist()) == set(range(10))
    chain = DiffusersChain.from_config(tiny_unet_config(), {}, 5)
    assert chain.event_shape == (1, 8, 8) and chain.cond_shape is None


def test_short_digits_training_lowers_the_denoising_loss():
    from rlft.tasks.digits_unet import evaluation_loss, train_digits_unet

    kw = dict(batch_size=32, lr=3e-3, seed=0, progress=False, num_steps=5, block_out_channels=(16, 32))
    before = evaluation_loss(train_digits_unet(steps=0, **kw), n=256)  # ~1.07: the random init
    after_chain = train_digits_unet(steps=50, ema_decay=0.9, **kw)
    after = evaluation_loss(after_chain, n=256)  # ~0.35 (measured)
    assert after < 0.5 * before, (before, after)
    assert after_chain.training_summary["steps"] == 50


def test_digits_cli_saves_a_loadable_model(tmp_path):
    from rlft.tasks.digits_unet import main

    assert main(["--out", str(tmp_path / "d"), "--steps", "2", "--batch-size", "8", "--eval-samples", "0"]) == 0
    chain = DiffusersChain.from_pretrained(tmp_path / "d", num_steps=5)
    assert chain.event_shape == (1, 8, 8) and chain.kind == "ddpm"


@pytest.mark.slow
def test_trained_digits_model_samples_recognisable_digits(tmp_path, monkeypatch):
    """1000 steps (about a minute of one CPU core): measured digit fraction 1.0, confident fraction 0.86,
    energy distance 0.03 vs the real-vs-real floor 0.02, all ten digits 30-65 times in 500 samples."""
    from rlft.tasks.digits_unet import sample_quality, train_digits_unet

    monkeypatch.setenv("RLFT_CACHE", str(tmp_path))
    chain = train_digits_unet(steps=1000, seed=0, progress=False, num_steps=50)
    q = sample_quality(chain, 500, seed=0)
    assert q["digit_fraction"] > 0.95 and q["confident_fraction"] > 0.7, q
    assert q["energy_distance"] < 3 * q["energy_distance_floor"], q
    assert min(q["class_counts"][:10]) >= 15, q  # no mode collapse: every digit appears
