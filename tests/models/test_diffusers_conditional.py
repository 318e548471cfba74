"""Conditional diffusers chains (issue 19 item 3): a class-conditional UNet2DModel (cond = one-hot label ->
class_labels) and prompt-string conditions embedded by a `conditions.embedding` function for a UNet2DConditionModel
(cond = flat embedding -> encoder_hidden_states), both tiny and built here (no download).

Pinned against diffusers' own `scheduler.step` on the UNet called with the label / the embedded prompt (float64), so
a chain that dropped the condition (or passed another one) fails.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch.nn import functional as F

from rlft.conditions import parse_conditions
from rlft.config import ConfigError, task_from_dict
from rlft.learners import build_learner
from rlft.models import build_model
from rlft.models.diffusers_chain import DiffusersChain
from rlft.rewards import build_reward
from rlft.sampling import sample
from tests.models.test_diffusers_chain import float64

K, N_TRAIN = 4, 100
CLASS_UNET = {
    "_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [8, 16],
    "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 4, "num_class_embeds": 5,
}
SEQ, DIM = 2, 8  # tokens x width of the prompt embedding (cross_attention_dim)
TEXT_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 8, "in_channels": 1, "out_channels": 1,
    "block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "attention_head_dim": 2,
    "cross_attention_dim": DIM,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
}
PROMPTS = {"train": ["a red circle", "a blue square"], "eval": ["a green triangle"]}


def embed_prompts(prompts: list[str]) -> torch.Tensor:
    """A stand-in text encoder: each prompt -> a fixed pseudo-random flat embedding (SEQ * DIM,), seeded by its hash."""
    rows = []
    for p in prompts:
        seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little")
        rows.append(torch.randn(SEQ * DIM, generator=torch.Generator().manual_seed(seed)))
    return torch.stack(rows)


def prompt_reward(x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """A conditional reward: the mean pixel should match the embedding's first entry."""
    return -(x.flatten(1).mean(-1) - cond[:, 0]).pow(2)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_class_label_reaches_the_unet_and_matches_the_scheduler():
    """mean(k, x, onehot(c)) + std * noise == scheduler.step(unet(x, tau, class_labels=c)); another label gives
    another mean; a non-one-hot or missing cond is refused."""
    chain = float64(DiffusersChain.from_config(CLASS_UNET, {"num_train_timesteps": N_TRAIN}, K, scheduler="ddim", seed=0))
    assert chain.class_conditional and chain.cond_shape == (5,)
    x, labels = randn(3, 1, 8, 8), torch.tensor([0, 3, 4])
    cond = F.one_hot(labels, 5).double()
    for k in (0, K - 1):
        tau = int(chain.scheduler.timesteps[k])
        with torch.no_grad():
            out = chain.unet(x, tau, class_labels=labels).sample
        noise = randn(3, 1, 8, 8, seed=k + 1)
        ref = chain.scheduler.step(out, tau, x, eta=1.0, variance_noise=noise).prev_sample
        torch.testing.assert_close(chain.mean(k, x, cond) + chain.std(k) * noise, ref, atol=1e-10, rtol=1e-10)
    other = F.one_hot((labels + 1) % 5, 5).double()
    assert (chain.mean(0, x, cond) - chain.mean(0, x, other)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one-hot class label"):
        chain.mean(0, x)
    with pytest.raises(ValueError, match="must be one-hot"):
        chain.mean(0, x, 0.5 * cond)
    out = sample(chain, 3, cond=cond, progress=False).x
    assert out.shape == (3, 1, 8, 8) and torch.isfinite(out).all()


def test_flat_prompt_embedding_is_the_encoder_hidden_states():
    """A flat (B, SEQ * DIM) cond (a conditional task's embedded prompt) is the UNet's (B, SEQ, DIM)
    encoder_hidden_states: the chain's step equals the scheduler's on the reshaped embedding."""
    chain = float64(DiffusersChain.from_config(TEXT_UNET, {"num_train_timesteps": N_TRAIN}, K, scheduler="ddim",
                                               cond_seq_len=SEQ, seed=0))
    emb = embed_prompts(["a red circle", "a blue square"]).double()  # (2, 16)
    x = randn(2, 1, 8, 8)
    tau = int(chain.scheduler.timesteps[1])
    with torch.no_grad():
        out = chain.unet(x, tau, encoder_hidden_states=emb.reshape(2, SEQ, DIM)).sample
    noise = randn(2, 1, 8, 8, seed=5)
    ref = chain.scheduler.step(out, tau, x, eta=1.0, variance_noise=noise).prev_sample
    torch.testing.assert_close(chain.mean(1, x, emb) + chain.std(1) * noise, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(chain.mean(1, x, emb), chain.mean(1, x, emb.reshape(2, SEQ, DIM)))
    assert (chain.mean(1, x, emb) - chain.mean(1, x, emb.flip(0))).abs().max() > 1e-4
    with pytest.raises(ValueError, match="encoder_hidden_states of shape"):
        chain.mean(1, x, emb[:, :-1])


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory):
    chain = DiffusersChain.from_config(TEXT_UNET, {"num_train_timesteps": N_TRAIN, "clip_sample": False}, K,
                                       cond_seq_len=SEQ, seed=0)
    return str(chain.save_pretrained(tmp_path_factory.mktemp("text_unet")))


def _prompt_task(model_dir: str, seq_len: int = SEQ):
    return task_from_dict({
        "model": {"type": "diffusers", "path": model_dir, "cond_seq_len": seq_len},
        "reward": {"type": "tests.models.test_diffusers_conditional:prompt_reward"},
        "conditions": {**PROMPTS, "embedding": "tests.models.test_diffusers_conditional:embed_prompts"},
        "alpha": 1.0, "num_steps": K, "seed": 0, "run": {"iterations": 1},
        "learner": {"type": "elegant", "learn_init": False, "batch_size": 4, "drift_iterations": 1, "lora_rank": 2},
    })


def test_prompt_conditions_fine_tune_a_text_conditioned_unet(text_model_dir):
    """Prompt strings + embedding function reach a UNet2DConditionModel: one ELEGANT LoRA iteration trains, every
    encoder_hidden_states the UNet sees in training is a training prompt's embedding (both are seen, the held-out
    one never), and the LoRA moved the samples."""
    task = _prompt_task(text_model_dir)
    conds = parse_conditions(task.conditions)
    assert conds.train_names == tuple(PROMPTS["train"]) and conds.dim == SEQ * DIM
    torch.testing.assert_close(conds.train, embed_prompts(PROMPTS["train"]))
    model = build_model(task.model, task.num_steps)
    assert model.cond_shape == (SEQ, DIM)
    reward = build_reward(task.reward, model=model)
    assert reward.conditional
    learner = build_learner(task, model, reward)
    seen: list[torch.Tensor] = []
    forward = model.unet.forward

    def recording(sample_, timestep, encoder_hidden_states=None, **kw):
        seen.append(encoder_hidden_states.detach().reshape(-1, SEQ * DIM).clone())
        return forward(sample_, timestep, encoder_hidden_states=encoder_hidden_states, **kw)

    model.unet.forward = recording
    metrics = learner.train_iteration()
    model.unet.forward = forward
    assert metrics["drift_updates"] == 1 and all(torch.isfinite(p).all() for p in model.lora_parameters())
    rows = {tuple(r) for r in torch.cat(seen).double().tolist()}
    train = {tuple(r) for r in conds.train.double().tolist()}
    assert rows == train, "the UNet saw an embedding other than the training prompts'"
    c = conds.train[0].expand(4, -1)
    tuned = sample(model, 4, control=learner.control(), cond=c, seed=1, progress=False).x
    pre = sample(model, 4, cond=c, seed=1, progress=False).x
    assert (tuned - pre).abs().max() > 1e-6


def test_prompt_embedding_of_the_wrong_length_is_a_config_error(text_model_dir):
    """An embedding whose length is not cond_seq_len * cross_attention_dim is refused when the learner is built."""
    task = _prompt_task(text_model_dir, seq_len=3)
    model = build_model(task.model, task.num_steps)
    with pytest.raises(ConfigError, match="vectors of length 16"):
        build_learner(task, model, build_reward(task.reward, model=model))
