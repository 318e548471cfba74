"""rlft/registry.py: one lazy table from YAML names to code.

- lazy: importing the registry imports none of the modules its table names; resolving a name imports that
  module then, and only it;
- every built-in line names an object its module defines (read statically, so RLlib lines need no Ray import);
- errors list the valid choices; a user's "module:attr" resolves, and a bad one says what to check;
- run-time registrations (objects or "module:attr" strings) resolve first and are listed by `names`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlft import registry
from rlft.registry import RegistryError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_registry(monkeypatch):
    """The registry's tables as they were, whatever a test registers."""
    monkeypatch.setattr(registry, "_TABLE", {k: dict(v) for k, v in registry._TABLE.items()})
    monkeypatch.setattr(registry, "_OBJECTS", {k: dict(v) for k, v in registry._OBJECTS.items()})
    return registry


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's module `my_components` on sys.path (not imported yet)."""
    (tmp_path / "my_components.py").write_text(textwrap.dedent('''
        IMPORTED = True

        class MyReward:
            class Nested:
                pass

        def my_model(cfg, num_steps):
            return ("model", num_steps)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_components", raising=False)
    yield "my_components"
    sys.modules.pop("my_components", None)


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_registry_imports_nothing_it_names():
    """Fresh interpreter: the registry module on its own imports nothing of rlft; after `import rlft` (the public
    surface) the learners it names are still unimported, and resolving one name imports its module then."""
    out = _run('''
        import importlib.util, json, sys
        spec = importlib.util.spec_from_file_location("registry_alone", "rlft/registry.py")
        alone = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(alone)
        alone_loaded = sorted(m for m in sys.modules if m == "rlft" or m.startswith("rlft."))
        import rlft
        from rlft import registry
        learners = sorted({t.partition(":")[0] for t in registry._TABLE["learner"].values()})
        loaded = [m for m in learners if m in sys.modules]
        module = registry.target("learner", "elegant").partition(":")[0]
        registry.resolve("learner", "elegant")
        print(json.dumps({"alone": alone_loaded, "loaded": loaded, "module": module, "now": module in sys.modules}))
    ''')
    assert out["alone"] == [], f"rlft/registry.py imports {out['alone']} on its own"
    assert out["loaded"] == [], f"`import rlft` + the registry imported learner modules {out['loaded']}"
    assert out["now"], out


def test_resolving_a_user_target_imports_it_only_then(clean_registry, user_module):
    registry.register("model", "mine", f"{user_module}:my_model")
    assert user_module not in sys.modules  # registering a string imports nothing
    assert "mine" in registry.names("model")
    fn = registry.resolve("model", "mine")
    assert user_module in sys.modules and fn(None, 7) == ("model", 7)


def test_module_attr_user_targets(user_module):
    cls = registry.resolve("reward", f"{user_module}:MyReward")
    assert cls.__name__ == "MyReward"
    assert registry.resolve("reward", f"{user_module}:MyReward.Nested").__qualname__ == "MyReward.Nested"
    with pytest.raises(RegistryError, match=rf"{user_module}.*has no attribute 'Missing'"):
        registry.resolve("reward", f"{user_module}:Missing")
    with pytest.raises(RegistryError, match="no_such_module_xyz.*cannot be imported.*PYTHONPATH"):
        registry.resolve("reward", "no_such_module_xyz:Thing")
    for bad in ("my_components:", ":Thing"):
        with pytest.raises(RegistryError, match="must be written 'module:attr'"):
            registry.import_target(bad)


@pytest.mark.parametrize("kind", registry.KINDS)
def test_unknown_names_list_the_choices(kind):
    with pytest.raises(RegistryError) as err:
        registry.resolve(kind, "no_such_thing")
    message = str(err.value)
    assert "no_such_thing" in message and "module:attr" in message
    for name in registry.names(kind):
        assert repr(name) in message
    with pytest.raises(RegistryError, match="must be a string"):
        registry.resolve(kind, 3)
    assert issubclass(RegistryError, ValueError)  # a config error, caught as one by the CLI


def test_unknown_kind_lists_the_kinds():
    for call in (lambda: registry.names("optimizer"), lambda: registry.resolve("optimizer", "adam"),
                 lambda: registry.register("optimizer", "adam", object())):
        with pytest.raises(RegistryError, match=r"'optimizer' is not one of \['learner', 'reward'"):
            call()


def test_run_time_registrations(clean_registry):
    thing = object()
    assert registry.register("sampler", "mine", thing) is thing
    assert registry.resolve("sampler", "mine") is thing and "mine" in registry.names("sampler")
    assert registry.target("sampler", "mine") is None  # only built-in lines have a target
    # an object registered over a built-in name wins in this process; a string replaces the line
    registry.register("divergence", "kl", thing)
    assert registry.resolve("divergence", "kl") is thing
    registry.register("divergence", "kl", "builtins:len")
    assert registry.resolve("divergence", "kl") is len
    for bad in ("", None):
        with pytest.raises(RegistryError, match="non-empty string"):
            registry.register("sampler", bad, thing)
    assert registry.names("sampler") == sorted(registry.names("sampler"))


def _defines(path: Path, attr: str) -> bool:
    """Whether a module file binds `attr` at module level (def, class, assignment or import)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == attr:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == attr for t in targets):
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((a.asname or a.name.split(".")[0]) == attr for a in node.names):
                return True
    return False


def _built_in_lines():
    return [(kind, name, target) for kind, table in registry._TABLE.items() for name, target in table.items()]


@pytest.mark.parametrize("kind,name,target", _built_in_lines(), ids=lambda v: str(v))
def test_every_built_in_line_names_a_defined_object(kind, name, target):
    """Read statically: a stale line (moved class, renamed module) fails here, not in a user's run."""
    module, _, attr = target.partition(":")
    base = ROOT / Path(*module.split("."))
    path = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
    assert path.is_file(), f"registry line {kind}.{name} -> {target}: no module file {path.relative_to(ROOT)}"
    assert _defines(path, attr.split(".")[0]), f"registry line {kind}.{name} -> {target}: {path.relative_to(ROOT)} defines no {attr}"
