"""The names Ray Tune pickled (tuner.pkl) for experiments started before the runner became `rlft.run`, so that
`rlft train|sweep --resume` continues them. New code imports from `rlft.run`; nothing else lives here."""

from rlft.run.trial import trial_main  # noqa: F401
from rlft.run.tune import _keep_local_logs, _trial_dirname  # noqa: F401
from rlft.run.tune import trial_resources as _trial_resources  # noqa: F401
