"""The string keys the RLlib learners share, written once (STYLE.md: keys are constants, never repeated literals).

Four families, as RLlib keeps `Columns` apart from its metric names:

- batch columns the rlft connectors add to a learner batch;
- `learner_config_dict` keys (what the driver ships to every Learner);
- `model_config` keys of the RLModules (`rlft.rllib.modules`);
- metric keys the learners log (they appear in `train_iteration()`'s figures under the same names).
"""

from __future__ import annotations

# -- RLModule ids and forward outputs ----------------------------------------------------------------------
#: The learner-only discriminator RLModule of f-PG (beside RLlib's DEFAULT_MODULE_ID policy).
DISCRIMINATOR = "discriminator"
#: The discriminator's forward output: logit of P(agent | state) = log p_pi / p_* at the optimum, (B,).
LOGITS = "logits"

# -- batch columns -----------------------------------------------------------------------------------------
#: alpha / sigma_A per row, sigma_A = std of the raw advantages (`KLLossScaleConnector`): the direct KL term's weight.
KL_LOSS_COEFF = "kl_loss_coeff"

# -- learner_config_dict keys ------------------------------------------------------------------------------
ALPHA = "alpha"  # the task's KL weight alpha (0: no KL to the pretrained model)
FPG_DIVERGENCE = "fpg_divergence"  # f of f-PG's D_f(p_pi || p_*)
FPG_COEFF = "fpg_coeff"
LOGIT_CLIP = "logit_clip"
CENTER = "center_reward"
NUM_DISC_UPDATES = "num_disc_updates"
DISC_BATCH_SIZE = "disc_batch_size"
EXPERT_DATA = "expert_data"
KERNEL_SCALES = "kernel_scales"
KERNEL_STDS = "kernel_stds"
SHAPING = "shaping"
SHAPING_COEFF = "shaping_coeff"
NFE_COST = "nfe_cost"
SEED = "seed"
GROUP_SIZE = "group_size"  # GRPO: trajectories per group (per condition)
NORMALIZE_STD = "normalize_std"  # GRPO: divide by the group's std
STD_EPS = "std_eps"  # GRPO: added to the group's std

# -- model_config keys (RLModules) and shared learner_config_dict sizes --------------------------------------
STDS = "stds"  # s_k, (K,)
NUM_STEPS = "num_steps"  # K
EVENT_DIM = "event_dim"  # D
HIDDEN = "hidden"
NUM_LAYERS = "num_layers"
MEAN_SCALE = "mean_scale"
NUM_FREQS = "num_freqs"
INIT_DENOISE_PROB = "init_denoise_prob"
MODEL = "model"  # the typed model config as a mapping (`rlft.config.model_config_to_dict`)
LORA = "lora"
VALUE_NET = "value_net"  # False: a drift policy without a value network (GRPO: no critic)

# -- metric keys ---------------------------------------------------------------------------------------------
KL_TO_PRETRAINED = "kl_to_pretrained"  # mean per-step KL of the batch under the current policy
PATH_KL = "path_kl"  # mean per-episode sum of KL_k under the behaviour policy
GROUP_RETURN_STD = "group_return_std"  # GRPO: mean over groups of the std of R_i within a group
DISC_LOSS = "disc_loss"
DISC_ACCURACY = "disc_accuracy"
FPG_REWARD = "fpg_reward_mean"
EPISODE_RETURN_MEAN = "episode_return_mean"
EPISODES = "episodes"
EXPERT_ENERGY_DISTANCE = "expert_energy_distance"

# -- RLlib state ------------------------------------------------------------------------------------------
METRICS_LOGGER = "metrics_logger"  # the Learner state's metric windows (not saved)
