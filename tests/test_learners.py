"""rlft/learners.py: learners are found through the registry and take typed, frozen options.

- `check_learner_spec` (what runs before Ray starts): an unknown `learner.type` lists the valid ones; an unknown
  option key names `learner.<key>` and the valid keys; a wrong value names the key, the value and the rule;
- `build_learner` hands the learner its parsed `Options`; a user's "module:Class" learner without an `Options`
  dataclass still works, its keys checked against its constructor;
- every built-in differentiable learner's `Options` is a frozen dataclass with a docstring per field (RLlib
  learners are left to tests/rllib: importing them imports Ray);
- `Learner.evaluate` reports the figures of the sampler the learner holds (control and initial law).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap

import pytest

from rlft import learners, registry
from rlft.config import ConfigError, task_from_dict
from tests.conftest import make_gmm

USER_MODULE = "my_learners"


@pytest.fixture
def user_learners(tmp_path, monkeypatch):
    """A user's module with two learners: one with a typed `Options`, one taking plain keyword arguments."""
    (tmp_path / f"{USER_MODULE}.py").write_text(textwrap.dedent('''
        import dataclasses
        from typing import ClassVar, Literal

        from rlft.learners import Learner


        @dataclasses.dataclass(frozen=True)
        class ToyOptions:
            """Options of the toy learner."""

            steps: int = 3
            """Updates per iteration."""
            lr: float = 0.1
            """Step size."""
            mode: Literal["fast", "slow"] = "fast"
            """How to step."""


        class TypedLearner(Learner):
            Options: ClassVar[type] = ToyOptions

            def __init__(self, task, model, reward, options=None):
                super().__init__(task, model, reward, options)
                self.control_fn = None

            def train_iteration(self):
                self.iteration += 1
                return {"steps": float(self.options.steps)}

            def control(self):
                return self.control_fn

            def save_checkpoint(self, directory):
                pass

            def load_checkpoint(self, directory):
                pass


        class PlainLearner(Learner):
            """A learner written before typed options: its keys are its constructor's keyword arguments."""

            def __init__(self, task, model, reward, steps: int = 3, name: str = "plain"):
                super().__init__(task, model, reward)
                self.steps, self.name = steps, name

            def train_iteration(self):
                self.iteration += 1
                return {}

            def control(self):
                return None

            def save_checkpoint(self, directory):
                pass

            def load_checkpoint(self, directory):
                pass


        class CatchAllLearner(Learner):
            """A keyword-argument learner whose catch-all happens to be called `options`."""

            def __init__(self, task, model, reward, **options):
                super().__init__(task, model, reward)
                self.kwargs = options

            def train_iteration(self):
                self.iteration += 1
                return {}

            def control(self):
                return None

            def save_checkpoint(self, directory):
                pass

            def load_checkpoint(self, directory):
                pass
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, USER_MODULE, raising=False)
    yield USER_MODULE
    sys.modules.pop(USER_MODULE, None)


def _task(gmm_task_dict, learner):
    return task_from_dict({**gmm_task_dict, "learner": learner})


def _objects(task):
    model = make_gmm(task.num_steps)
    reward = registry.resolve("reward", task.reward["type"])(**{k: v for k, v in task.reward.items() if k != "type"})
    return model, reward


def _differentiable_learners() -> list[str]:
    """Built-in learners importable without Ray (RLlib's import ray)."""
    return [n for n, t in registry._TABLE["learner"].items() if not t.startswith("rlft.rllib")]


# -- learner.type ------------------------------------------------------------------------------------------


def test_unknown_type_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        learners.check_learner_spec({"type": "elegent"})
    message = str(err.value)
    assert message.startswith("learner.type") and "'elegent'" in message
    for name in learners.learner_names():
        assert repr(name) in message
    assert set(registry._TABLE["learner"]) <= set(learners.learner_names())
    with pytest.raises(ConfigError, match="learner.type must be a string"):
        learners.check_learner_spec({"type": 7})


def test_no_spec_means_the_default_learner():
    cls, options = learners.check_learner_spec(None)
    assert cls is registry.resolve("learner", learners.DEFAULT_LEARNER)
    assert options == cls.Options()
    assert learners.check_learner_spec({})[0] is cls


# -- typed options ---------------------------------------------------------------------------------------------


def test_unknown_option_key_names_the_key_and_the_valid_keys(user_learners):
    with pytest.raises(ConfigError) as err:
        learners.check_learner_spec({"type": f"{user_learners}:TypedLearner", "stpes": 4})
    message = str(err.value)
    assert "learner.stpes" in message
    for key in ("steps", "lr", "mode"):
        assert key in message


@pytest.mark.parametrize(
    "key,value,rule",
    [("steps", "many", "learner.steps must be an integer"), ("lr", "big", "learner.lr must be a number"),
     ("mode", "medium", r"learner.mode must be one of \['fast', 'slow'\]")],
)
def test_wrong_option_values_name_the_key_value_and_rule(user_learners, key, value, rule):
    with pytest.raises(ConfigError, match=rule) as err:
        learners.check_learner_spec({"type": f"{user_learners}:TypedLearner", key: value})
    assert repr(value) in str(err.value)


def test_build_learner_hands_over_frozen_typed_options(user_learners, gmm_task_dict):
    task = _task(gmm_task_dict, {"type": f"{user_learners}:TypedLearner", "steps": 5, "lr": 1})
    model, reward = _objects(task)
    learner = learners.build_learner(task, model, reward)
    cls = registry.resolve("learner", f"{user_learners}:TypedLearner")
    assert type(learner) is cls and type(learner.options) is cls.Options
    assert (learner.options.steps, learner.options.lr, learner.options.mode) == (5, 1.0, "fast")
    assert isinstance(learner.options.lr, float)  # int -> float coerced for a float field
    assert learner.task is task and learner.model is model and learner.reward is reward
    with pytest.raises(dataclasses.FrozenInstanceError):
        learner.options.steps = 6
    assert learner.train_iteration() == {"steps": 5.0} and learner.iteration == 1


def test_a_user_learner_without_options_takes_keyword_arguments(user_learners, gmm_task_dict):
    spec = {"type": f"{user_learners}:PlainLearner", "steps": 9}
    task = _task(gmm_task_dict, spec)
    learner = learners.build_learner(task, *_objects(task))
    assert type(learner).__name__ == "PlainLearner" and (learner.steps, learner.name) == (9, "plain")
    with pytest.raises(ConfigError) as err:
        learners.check_learner_spec({**spec, "stpes": 1})
    assert "learner.stpes" in str(err.value) and "['name', 'steps']" in str(err.value)
    with pytest.raises(ConfigError, match="learner.model is filled in by rlft"):
        learners.check_learner_spec({**spec, "model": "x"})
    with pytest.raises(ConfigError, match="learner.steps must be an integer"):
        learners.check_learner_spec({**spec, "steps": "nine"})


def test_a_catch_all_named_options_is_not_mistaken_for_typed_options(user_learners, gmm_task_dict):
    """`**options` takes the YAML keys as keyword arguments; it is not the typed `options` parameter."""
    task = _task(gmm_task_dict, {"type": f"{user_learners}:CatchAllLearner", "steps": 9, "name": "x"})
    learner = learners.build_learner(task, *_objects(task))
    assert learner.kwargs == {"steps": 9, "name": "x"}


def test_a_run_time_registered_learner_is_found_by_name(user_learners, gmm_task_dict, monkeypatch):
    monkeypatch.setattr(registry, "_OBJECTS", {k: dict(v) for k, v in registry._OBJECTS.items()})
    registry.register("learner", "toy", f"{user_learners}:TypedLearner")
    try:
        assert "toy" in learners.learner_names()
        cls, options = learners.check_learner_spec({"type": "toy", "mode": "slow"})
        assert cls.__name__ == "TypedLearner" and options.mode == "slow"
    finally:
        registry._TABLE["learner"].pop("toy", None)


# -- the built-in learners' options ------------------------------------------------------------------------------


def _field_docstrings(options_cls: type) -> dict[str, str | None]:
    """{field: its docstring} read from the source of the dataclass and its dataclass bases."""
    docs: dict[str, str | None] = {}
    for klass in reversed(options_cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for stmt, nxt in zip(body, body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                doc = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) else None
                docs[stmt.target.id] = doc if isinstance(doc, str) else None
    return docs


@pytest.mark.parametrize("name", _differentiable_learners())
def test_built_in_options_are_frozen_and_documented(name):
    cls = registry.resolve("learner", name)
    assert dataclasses.is_dataclass(cls.Options), f"{name}: Options must be a dataclass"
    assert cls.Options.__dataclass_params__.frozen, f"{name}: Options must be frozen"
    assert "options" in inspect.signature(cls.__init__).parameters
    docs = _field_docstrings(cls.Options)
    fields = [f.name for f in dataclasses.fields(cls.Options) if f.init]
    undocumented = [f for f in fields if not (docs.get(f) or "").strip()]
    assert not undocumented, f"{name}: Options fields without a docstring: {undocumented}"


@pytest.mark.parametrize("name", _differentiable_learners())
def test_built_in_learners_name_an_unknown_key(name):
    cls = registry.resolve("learner", name)
    with pytest.raises(ConfigError) as err:
        learners.check_learner_spec({"type": name, "no_such_option": 1})
    message = str(err.value)
    assert "learner.no_such_option" in message
    for f in dataclasses.fields(cls.Options):
        assert f.name in message


def test_the_field_docstring_reader_sees_a_missing_docstring():
    @dataclasses.dataclass(frozen=True)
    class Half:
        a: int = 1
        """Documented."""
        b: int = 2

    assert _field_docstrings(Half) == {"a": "Documented.", "b": None}


# -- Learner.evaluate --------------------------------------------------------------------------------------------


def test_evaluate_reports_the_sampler_the_learner_holds(user_learners, gmm_task_dict, monkeypatch):
    from rlft import evaluation

    monkeypatch.setattr(evaluation.metrics, "sliced_wasserstein", lambda *a, **k: 0.0)  # POT import: ~20 s
    evaluation.clear_cache()
    task = _task({**gmm_task_dict, "num_steps": 40, "alpha": 0.3}, {"type": f"{user_learners}:TypedLearner"})
    model, reward = _objects(task)
    learner = learners.build_learner(task, model, reward)
    pretrained = learner.evaluate(num_samples=1000)
    oc = model.optimal_control(reward, task.alpha)
    learner.control_fn = oc
    monkeypatch.setattr(type(learner), "init_dist", lambda self: oc)
    tuned = learner.evaluate(num_samples=1000)
    assert pretrained[evaluation.KL] == 0.0 and abs(pretrained[evaluation.GAP_CLOSURE]) < 0.3
    assert tuned[evaluation.GAP_CLOSURE] > 0.85 and tuned[evaluation.KL] > 0.5
    assert tuned[evaluation.OPTIMAL_OBJECTIVE] == pytest.approx(model.exact_target(reward, 0.3).optimal_objective)
