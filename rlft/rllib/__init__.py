"""RLlib learners on the rlft environments (issue 6), laid out like RLlib's `algorithms/ppo/`:

- `rlft.rllib.module`: RLModules (drift policy N(delta_theta, s_k^2 I) with a fixed std, its LoRA-on-UNet variant,
  the restart policy);
- `rlft.rllib.ppo_kl`: PPO + KL to the pretrained model (ELEGANT App. E.3), ``learner: {type: ppo_kl}``;
- `rlft.rllib.fpg`: f-policy-gradient with a discriminator (BOOST §4.2), ``learner: {type: fpg}``;
- `rlft.rllib.restart`: f-Restart on the restart env (BOOST §4.3) and its reward shapings;
- `rlft.rllib.env_runner`: `BulkEnvRunner`, an EnvRunner that steps the batched envs and builds episodes in bulk.

Nothing is imported here: Ray and RLlib import slowly, and `rlft.learners` loads these modules on demand.
"""
