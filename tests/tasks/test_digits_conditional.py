"""The class-conditional digits task (issue 19 item 3): a UNet2DModel with a class-label embedding, trained on the
digits with their labels; the conditional classifier reward r(x, c) = log p(c | x) + thickness * mean ink; ELEGANT
with a LoRA on a conditional task (the label reaches the UNet, held-out classes never do in training) and its
checkpoint back through `rlft.load`.

Pinned: the reward at a one-hot c against the classifier's own log-softmax (and the ink term against its explicit
mean); `denoising_loss` with labels against the explicit epsilon loss of the class-conditional UNet with the same
draws; the fine-tuned sampler loaded by `rlft.load` against the learner's own samples at the same seed.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import rlft
from rlft.config import task_from_dict
from rlft.learners import build_learner
from rlft.models import build_model
from rlft.models.diffusers_chain import DiffusersChain
from rlft.rewards import build_reward
from rlft.rewards.base import evaluate
from rlft.sampling import sample
from rlft.tasks.digits import NUM_DIGITS, DigitClassifierReward
from rlft.tasks.digits_unet import denoising_loss, digits_scheduler_config, tiny_unet_config, train_digits_unet

TRAIN, HELD = [0, 2, 5], [7]
LEARNER = {"type": "elegant", "learn_init": False, "batch_size": 6, "lr": 1e-3, "lr_final": 1e-4, "drift_iterations": 2,
           "drift_iterations_per_train_iteration": 1, "lora_rank": 2}


def onehot(labels, dtype=torch.float32) -> torch.Tensor:
    return F.one_hot(torch.as_tensor(labels), NUM_DIGITS).to(dtype)


@pytest.fixture(scope="module")
def cond_model_dir(tmp_path_factory):
    """A randomly initialised class-conditional digits UNet (narrow), saved as a diffusers model directory."""
    chain = DiffusersChain.from_config(tiny_unet_config((8, 16), num_classes=NUM_DIGITS), digits_scheduler_config(),
                                       num_steps=3, seed=0)
    return str(chain.save_pretrained(tmp_path_factory.mktemp("cond_digits")))


def _task_data(model_dir: str, thickness: float = 1.0) -> dict:
    return {"model": {"type": "diffusers", "path": model_dir},
            "reward": {"type": "digit_classifier", "target": "condition", "thickness": thickness},
            "conditions": {"train": TRAIN, "eval": HELD, "num_classes": NUM_DIGITS},
            "alpha": 1.0, "num_steps": 3, "seed": 0, "learner": LEARNER, "run": {"iterations": 2}}


def test_conditional_reward_is_log_softmax_at_c_plus_ink():
    """r(x, c) = log_softmax(f(x))[c] + w * mean((x + 1) / 2), per sample (float64, one-hot c); the unconditional
    reward with target c gives the same; a conditional reward without cond is refused."""
    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64) * 2 - 1
    labels = torch.tensor([0, 3, 9, 3, 1, 7])
    reward = DigitClassifierReward("condition", thickness=0.7)
    assert reward.conditional and not DigitClassifierReward(3).conditional
    logp = reward.logits(x).double().log_softmax(-1)  # (6, 11)
    ink = ((x + 1) / 2).flatten(1).mean(-1)
    expected = logp[torch.arange(6), labels] + 0.7 * ink
    torch.testing.assert_close(evaluate(reward, x, cond=onehot(labels, torch.float64)), expected, rtol=1e-6, atol=1e-6)
    plain = DigitClassifierReward(3)
    torch.testing.assert_close(plain(x), logp[:, 3].to(x.dtype), rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception, match="depends on the condition"):
        evaluate(reward, x)
    with pytest.raises(ValueError, match="0..9 or 'condition'"):
        DigitClassifierReward("class")


def test_conditional_unet_training_loss_feeds_the_labels():
    """The class-conditional epsilon loss is the explicit |eps_theta(x_tau, tau, c) - eps|^2 with the same draws (fails
    if the labels are dropped: the class embedding is random, so the UNet's output depends on c)."""
    chain = train_digits_unet(steps=2, batch_size=8, progress=False, num_steps=3, block_out_channels=(8, 16),
                              num_classes=NUM_DIGITS)
    assert chain.class_conditional and chain.cond_shape == (NUM_DIGITS,)
    unet, sched = chain.unet, chain.scheduler
    x0 = torch.rand(5, 1, 8, 8) * 2 - 1
    labels = torch.tensor([1, 4, 4, 8, 0])
    got = denoising_loss(unet, sched, x0, torch.Generator().manual_seed(3), labels)
    gen = torch.Generator().manual_seed(3)
    tau = torch.randint(0, sched.config.num_train_timesteps, (5,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    noisy = sched.add_noise(x0, eps, tau)
    with torch.no_grad():
        ref = (unet(noisy, tau, class_labels=labels).sample - eps).pow(2).mean()
        other = (unet(noisy, tau, class_labels=(labels + 1) % NUM_DIGITS).sample - eps).pow(2).mean()
    torch.testing.assert_close(got, ref)
    assert abs(float(other - ref)) > 1e-4  # the label matters
    assert chain.training_summary["num_classes"] == NUM_DIGITS


def test_label_reaches_the_unet_and_heldout_classes_never_train(cond_model_dir):
    """One ELEGANT LoRA iteration on train classes {0, 2, 5}, held-out {7}: every class label the UNet sees in
    training is a training class (all of them are seen), and the held-out one only in evaluation."""
    task = task_from_dict(_task_data(cond_model_dir))
    model = build_model(task.model, task.num_steps)
    learner = build_learner(task, model, build_reward(task.reward, model=model))
    seen: list[torch.Tensor] = []
    unet_forward = model.unet.forward

    def recording(sample_, timestep, class_labels=None, **kw):
        seen.append(class_labels.detach().clone())
        return unet_forward(sample_, timestep, class_labels=class_labels, **kw)

    model.unet.forward = recording
    learner.train_iteration()
    learner.train_iteration()
    trained = set(torch.cat(seen).tolist())
    assert trained == set(TRAIN), f"training fed the UNet classes {sorted(trained)}"
    seen.clear()
    report = learner.evaluate(num_samples=4)
    assert set(torch.cat(seen).tolist()) == set(TRAIN + HELD)
    assert set(report["per_condition"]) == {"train_0", "train_1", "train_2", "eval_0"}


def test_lora_checkpoint_of_a_conditional_task_round_trips_through_rlft_load(cond_model_dir, tmp_path):
    """The saved LoRA + task give back the learner's own fine-tuned samples at each class (same seed), and those
    differ from the pretrained chain's and between classes (the LoRA moved, the label matters)."""
    data = _task_data(cond_model_dir)
    task = task_from_dict(data)
    model = build_model(task.model, task.num_steps)
    learner = build_learner(task, model, build_reward(task.reward, model=model))
    learner.train_iteration()
    learner.save_checkpoint(str(tmp_path))
    tuned = rlft.load(tmp_path)
    for c in (2, 7):
        cond = onehot([c])[0]
        own = sample(learner.model, 8, control=learner.control(), cond=cond.expand(8, -1), seed=11, progress=False).x
        got = tuned.sample(8, seed=11, cond=cond)
        torch.testing.assert_close(got, own.to(got.dtype), rtol=1e-5, atol=1e-5)
        pre = sample(learner.model, 8, cond=cond.expand(8, -1), seed=11, progress=False).x
        assert not torch.allclose(own, pre, atol=1e-6)
    a = tuned.sample(8, seed=11, cond=onehot([2])[0])
    b = tuned.sample(8, seed=11, cond=onehot([7])[0])
    assert not torch.allclose(a, b, atol=1e-4)


def test_bench_digits_section_measures_every_class_and_draws_one_png(cond_model_dir, tmp_path):
    """`rlft bench conditional --sections digits --quick` on the tiny model: a row per class (training and held-out),
    accuracies in [0, 1], zero KL before, the picture and the JSON written."""
    import argparse
    import json

    from rlft.benchmarks.conditional_digits import TASK_FILE, run_section

    args = argparse.Namespace(digits_task=str(TASK_FILE), digits_model=cond_model_dir, digits_train_steps=1,
                              digits_iterations=None, digits_samples=4, digits_png=None, out=str(tmp_path), seed=0,
                              quick=True, json=False)
    out = run_section(args)
    assert [(r["class"], r["split"]) for r in out["rows"]] == [(c, "train") for c in range(8)] + [(8, "held-out"), (9, "held-out")]
    assert all(0.0 <= r["accuracy_before"] <= 1.0 and r["kl_before"] == 0.0 and r["kl_after"] > 0.0 for r in out["rows"])
    assert (tmp_path / "conditional_digits.png").stat().st_size > 0
    assert json.loads((tmp_path / "digits_results.json").read_text())["iterations"] == 2
