"""RLlib learners on the rlft environments, laid out by role as RLlib lays out `rllib/algorithms/ppo/`:

- `adapter`:    the `rlft.learners.Learner` base every RLlib learner shares (`RLlibLearner`), the shared typed PPO
                options (`PPOOptions`), data-only checkpoints through `rlft.checkpoint`, and `EnvSpec` (what an
                EnvRunner needs: env id, typed model config, prepared reward spec, alpha);
- `keys`:       batch columns, learner_config_dict keys, model_config keys and metric keys, written once;
- `modules`:    RLModules, forward passes only (drift policy, its LoRA-on-UNet variant, restart policy, discriminator);
- `connectors`: learner connectors that relabel a batch (KL penalty, the direct KL term's scale, the f-PG reward);
- `env_runner`: `make_env` for any registered env id ("module:Id" imports the user's module on every EnvRunner) and
                `BulkEnvRunner`, an EnvRunner that steps the batched envs and builds episodes in bulk;
- `ppo_kl`:     PPO + KL to the pretrained model (ELEGANT App. E.3), ``learner: {type: ppo_kl}``;
- `fpg`:        f-policy-gradient with a discriminator (BOOST §4.2), ``learner: {type: fpg}``;
- `restart`:    f-Restart on the restart env (BOOST §4.3): reward shapings and the learned-policy sampler.

A new RLlib algorithm family is one file on `adapter` + `connectors` (its Options subclassing `PPOOptions` or its
own) plus one line in `rlft.registry._TABLE["learner"]`. Nothing is imported here: Ray and RLlib import slowly, and
`rlft.learners` loads these modules on demand through the registry.
"""
