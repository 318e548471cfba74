"""The house rules, enforced (issue 16 item 5; DESIGN.md "Rules of the house").

1. The core imports no heavy runtime: importing `rlft.models`, `rlft.rewards`, `rlft.divergences`,
   `rlft.sampling`, `rlft.metrics`, `rlft.schedule` (and `rlft` itself) in a fresh interpreter leaves
   ray, gymnasium, diffusers and peft out of `sys.modules`.
2. The import graph of `rlft/` (and of the `envs/` package that RLlib steps) has no cycle, counting imports
   inside functions: a lazy import still ties two modules together.
3. Imports point down the layers of DESIGN.md (`LAYERS` below): none at module level from a lower layer to a
   higher one, and none inside functions either.
4. No file in `rlft/` outside `benchmarks/` is much over 400 lines.
5. No string switch on a learner type: a learner is a class found through `rlft.registry`, and what differs
   between learners is an overridden method or an option, never `if learner_type == "truncation"`.

How the graph is read (statically, with `ast`; nothing under test is imported):

- a node is a module file; a package's `__init__.py` is its own node (`rlft.models`);
- `import a.b.c` is an edge to the longest prefix of `a.b.c` that is a module file of the tree;
  `from a.b import y` is an edge to `a.b.y` when that is a module file (a submodule), else to `a.b`;
  relative imports are resolved against the importing module's package;
- the implicit import of every parent package (`import rlft.a.b` also runs `rlft/__init__.py` and
  `rlft/a/__init__.py`) is NOT an edge: it is Python's machinery, not a tie the code writes, and counting it
  would make every module depend on `rlft/__init__.py`, the public surface that re-exports the core. A
  package `__init__` that a module names (`from rlft.models import GMMModel`) is an edge like any other;
- imports under `if TYPE_CHECKING:` are not edges (they never run; they are how a protocol is annotated);
- imports inside functions, methods and class bodies are edges, marked "lazy" when inside a function.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import json
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlft", "envs")  # envs/ is the layer RLlib steps; it is part of the graph (rllib -> envs -> core)

FORBIDDEN_IN_CORE = ("ray", "gymnasium", "diffusers", "peft")
CORE_MODULES = ("rlft.schedule", "rlft.divergences", "rlft.metrics", "rlft.models", "rlft.sampling", "rlft.rewards")

#: Lines a file in rlft/ may have (outside benchmarks/): the house rule says ~400, this allows 5 % slack.
MAX_LINES = 420

#: The layers, lowest first; a module may import from its own layer and the layers below it. A module belongs
#: to the layer of the longest prefix listed here. Why each is where it is:
#:
#: - foundation: configuration parsing, files, the registry (which imports nothing of rlft: names resolve to
#:   "module:attr" strings at run time), checkpoints and the time schedule; everything uses them.
#: - chain: the pretrained model as a transition chain, and the pure math beside it (f-divergences, metrics,
#:   the batched rollout); `models` never reaches up into rewards or tasks (issue 16: `models/__init__.py`
#:   reached into `tasks/`).
#: - rewards: the reward protocol and the built-ins (an f-regularised reward solves its lambda with rollouts,
#:   so it sits above sampling); rewards never import a task (the 7-file circle went through that edge).
#: - tasks: task-specific data + models + rewards (TFBind8, digits, the oracle), and what scores a sampler
#:   (evaluation, plots). The top of the core.
#: - protocol: the `Learner` protocol and the typed run section; learners read `run_config_of(task)`.
#: - algorithms: the differentiable-control learners and the samplers/guidance (DESIGN.md draws them side by
#:   side; guidance's discriminator is shared with f-PG, so guidance sits below RLlib, and a guidance learner
#:   may subclass `Learner`).
#: - envs: the Gymnasium environments over the core (they may use the Restart action constants of guidance).
#: - rllib: the RLlib learners, which step the envs.
#: - runners: the CLI, Tune/Jobs runners, the demo, the benchmarks and `rlft/__init__.py` (the public surface
#:   re-exports from every layer, so nothing inside rlft imports names from it).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", ("rlft.config", "rlft.files", "rlft.registry", "rlft.checkpoint", "rlft.schedule", "rlft.data",
                    "rlft.conditions")),
    ("chain", ("rlft.models", "rlft.sampling", "rlft.divergences", "rlft.metrics", "rlft.entropy")),
    ("rewards", ("rlft.rewards",)),
    ("tasks", ("rlft.tasks", "rlft.evaluation", "rlft.plots")),
    ("protocol", ("rlft.learners", "rlft.run_config")),
    ("algorithms", ("rlft.control", "rlft.guidance")),
    ("envs", ("envs",)),
    ("rllib", ("rlft.rllib",)),
    ("runners", ("rlft.run", "rlft.runner", "rlft.jobs", "rlft.cli", "rlft.demo", "rlft.benchmarks", "rlft.api", "rlft")),
)


# -- the graph ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Edge:
    source: str  # importing module
    target: str  # imported module
    path: str  # importing file, relative to the repository root
    line: int
    text: str  # the import statement as written
    lazy: bool  # inside a function (runs when called, not when imported)

    def where(self) -> str:
        return f"{self.path}:{self.line}{' (lazy)' if self.lazy else ''} -> {self.target}: {self.text}"


def module_files() -> dict[str, Path]:
    """{module name: file} for every .py file of the graph's packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Yields (node, lazy) for every import statement, skipping `if TYPE_CHECKING:` bodies."""
    stack = [(tree, False)]
    while stack:
        node, lazy = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, lazy
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = node.orelse
        else:
            children = list(ast.iter_child_nodes(node))
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in children)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a module of the tree."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def _targets(node: ast.Import | ast.ImportFrom, source: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        return {t for alias in node.names if (t := _resolve(alias.name, modules))}
    if node.level:
        package = source.split(".") if is_package else source.split(".")[:-1]
        base_parts = package[: len(package) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        target = sub if sub in modules else _resolve(base, modules)
        if target:
            out.add(target)
    return out


@functools.lru_cache(maxsize=1)
def import_graph() -> tuple[dict[str, Path], tuple[Edge, ...]]:
    """The modules of the tree and every import edge between two of them (self-imports dropped), read once."""
    modules = module_files()
    edges = []
    for source, path in modules.items():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text, filename=str(path))
        is_package = path.name == "__init__.py"
        for node, lazy in _imports(tree):
            written = " ".join(lines[node.lineno - 1 : node.end_lineno]).strip()
            written = re.sub(r"\s+", " ", written)
            for target in sorted(_targets(node, source, is_package, modules)):
                if target != source:
                    edges.append(Edge(source, target, str(path.relative_to(ROOT)), node.lineno, written, lazy))
    return modules, tuple(edges)


def strongly_connected_components(nodes: list[str], successors: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (no recursion limit); components in reverse topological order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(successors.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(successors.get(child, ()))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _shortest_cycle(start: str, members: set[str], successors: dict[str, list[str]]) -> list[str]:
    """A shortest cycle through `start` inside one component (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in successors.get(node, ()):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start]
                if child not in parent:
                    parent[child] = node
                    nxt.append(child)
        frontier = nxt
    return [start]


def cycles(edges: tuple[Edge, ...] | list[Edge]) -> list[tuple[list[str], list[Edge]]]:
    """Each cyclic component: (its modules, the edges among them)."""
    successors: dict[str, list[str]] = defaultdict(list)
    for e in edges:
        if e.target not in successors[e.source]:
            successors[e.source].append(e.target)
    nodes = sorted({e.source for e in edges} | {e.target for e in edges})
    out = []
    for component in strongly_connected_components(nodes, successors):
        if len(component) > 1:
            members = set(component)
            out.append((component, [e for e in edges if e.source in members and e.target in members]))
    return out


def layer_of(module: str) -> tuple[int, str] | None:
    """(rank, layer name) of a module: the layer listing its longest prefix (None: in no layer)."""
    best = None
    for rank, (name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            # "rlft" names the root package only: a new top-level module must be placed by hand
            if module == prefix or (prefix != "rlft" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), rank, name)
    return None if best is None else (best[1], best[2])


def upward_edges(edges: list[Edge]) -> list[tuple[Edge, str, str]]:
    out = []
    for e in edges:
        src, dst = layer_of(e.source), layer_of(e.target)
        if src is not None and dst is not None and dst[0] > src[0]:
            out.append((e, src[1], dst[1]))
    return out


# -- the graph reader itself (so that a broken reader cannot pass the rules vacuously) ---------------------


def test_graph_reader_resolves_every_import_form(tmp_path):
    """Absolute, from-submodule, from-name, relative, lazy and TYPE_CHECKING imports on a made-up tree."""
    modules = {m: tmp_path for m in ("rlft", "rlft.a", "rlft.a.b", "rlft.a.c", "rlft.d")}
    code = (
        "from typing import TYPE_CHECKING\n"
        "import rlft.a.b.Thing\n"  # a dotted name past the module: the longest prefix is rlft.a.b
        "from rlft.a import c, helper\n"  # c is a submodule, helper a name of rlft/a/__init__.py
        "from . import b\n"
        "from .. import d\n"
        "def f():\n    import rlft.d\n"
        "if TYPE_CHECKING:\n    from rlft import x\n"
    )
    found = {}
    for node, lazy in _imports(ast.parse(code)):
        for target in _targets(node, "rlft.a.c", False, modules):
            found.setdefault(target, set()).add(lazy)
    assert found == {"rlft.a.b": {False}, "rlft.a.c": {False}, "rlft.a": {False}, "rlft.d": {False, True}}
    # relative imports from a package's own __init__ resolve against the package itself
    node = ast.parse("from .b import y").body[0]
    assert _targets(node, "rlft.a", True, modules) == {"rlft.a.b"}


def test_tarjan_finds_every_cycle_and_only_cycles():
    succ = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": ["e"], "e": ["d"], "f": ["a"]}
    comps = strongly_connected_components(sorted(succ), succ)
    assert sorted(c for c in comps if len(c) > 1) == [["a", "b", "c"], ["d", "e"]]
    assert sorted(sum(comps, [])) == sorted(succ)  # every node in exactly one component
    assert _shortest_cycle("a", {"a", "b", "c"}, succ) == ["a", "b", "c", "a"]
    # a long chain does not hit Python's recursion limit
    chain = {str(i): [str(i + 1)] for i in range(5000)}
    chain["5000"] = ["0"]
    assert len(strongly_connected_components(sorted(chain), chain)) == 1


def test_the_graph_sees_the_package():
    modules, edges = import_graph()
    assert {"rlft", "rlft.models.base", "rlft.sampling", "rlft.learners", "envs"} <= set(modules)
    assert any(e.source == "rlft.sampling" and e.target == "rlft.models.base" for e in edges)
    unplaced = sorted(m for m in modules if layer_of(m) is None)
    assert not unplaced, f"modules in no layer of tests/test_imports.py LAYERS: {unplaced}; add them where they belong"


# -- the rules ------------------------------------------------------------------------------------------------

_PROBE = r"""
import importlib, json, sys, traceback

FORBIDDEN = {forbidden!r}
culprits = {{}}

class Spy:
    # records who first asks for a forbidden package; the import itself goes on unchanged
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in FORBIDDEN and top not in culprits:
            frames = [f"{{f.filename.split('/work/main/')[-1]}}:{{f.lineno}}" for f in traceback.extract_stack()
                      if "/rlft/" in f.filename or "/envs/" in f.filename]
            culprits[top] = frames[-4:]
        return None

sys.meta_path.insert(0, Spy())
report = []
for module in {modules!r}:
    importlib.import_module(module)
    report.append([module, sorted(m for m in FORBIDDEN if m in sys.modules)])
print(json.dumps({{"report": report, "culprits": culprits}}))
"""


def _fresh_import(modules: tuple[str, ...]) -> dict:
    code = _PROBE.format(forbidden=FORBIDDEN_IN_CORE, modules=modules)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"importing {modules} failed in a fresh interpreter:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_imports_no_heavy_runtime():
    """Fresh interpreter: `import rlft`, then each core module, leaves ray, gymnasium, diffusers and peft
    unimported (the report after each step says which import first pulled one in)."""
    out = _fresh_import(("rlft", *CORE_MODULES))
    loaded = {m for _, found in out["report"] for m in found}
    if loaded:
        first = {m: next(mod for mod, found in out["report"] if m in found) for m in loaded}
        lines = [f"{m}: first pulled in by `import {first[m]}` via {out['culprits'].get(m, '?')}" for m in sorted(loaded)]
        pytest.fail("the core must not import " + ", ".join(sorted(loaded)) + ":\n  " + "\n  ".join(lines))


def test_the_probe_sees_a_heavy_import():
    """The spy is not blind: a module that does import gymnasium is reported (envs imports it at module level)."""
    out = _fresh_import(("envs.base",))
    assert "gymnasium" in out["report"][0][1] and "gymnasium" in out["culprits"]


def test_import_graph_has_no_cycle():
    """No cycle among rlft (and envs) modules, counting imports inside functions."""
    _, edges = import_graph()
    found = cycles(edges)
    if found:
        successors: dict[str, list[str]] = defaultdict(list)
        for e in edges:
            successors[e.source].append(e.target)
        blocks = []
        for members, inner in found:
            loop = _shortest_cycle(members[0], set(members), successors)
            lines = "\n    ".join(e.where() for e in sorted(inner, key=lambda e: (e.path, e.line)))
            blocks.append(f"{len(members)} modules: {' -> '.join(loop)}\n  files: {members}\n  imports:\n    {lines}")
        pytest.fail(f"{len(found)} import cycle(s):\n" + "\n".join(blocks))


def test_no_module_imports_from_the_package_face():
    """`from rlft import x` ties a module to rlft/__init__.py, which re-exports the core and lazily loads rlft.api
    (the runners): a cycle through the package face that the graph above, which maps the import to rlft.x, does not
    see. Inside the package, write `import rlft.x as x` or `from rlft.x import name`."""
    found = []  # (envs/example_custom.py imports `envs.register` as a user's module would: envs' face is its API)
    for package in ("rlft",):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == package:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import ...")
    assert not found, "imports from the package face:\n" + "\n".join(found)


#: The only files of the core that may touch diffusers / peft (DESIGN.md), and the packages that form the core.
DIFFUSERS_FILES = ("rlft/models/diffusers_chain.py", "rlft/models/lora.py")
CORE_PACKAGES = ("rlft.models", "rlft.rewards", "rlft.divergences", "rlft.sampling", "rlft.metrics", "rlft.schedule")
#: The only file of the core that may import ray, and only inside functions: the pool of reward actors (DESIGN.md
#: puts `rewards/remote.py` in the core; importing it, like importing any core module, leaves ray unloaded).
RAY_FILES = ("rlft/rewards/remote.py",)


def _third_party_imports(tree: ast.AST):
    """(line, top-level package, lazy) for every absolute import outside TYPE_CHECKING blocks."""
    for node, lazy in _imports(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            names = [node.module] if node.module and not node.level else []
        for name in names:
            yield node.lineno, name.partition(".")[0], lazy


def test_core_never_imports_heavy_runtimes_even_lazily():
    """Statically, counting imports inside functions: the core never imports ray or gymnasium, and only
    `models/diffusers_chain.py` and `models/lora.py` import diffusers or peft (DESIGN.md, rules of the house)."""
    modules = module_files()
    hits = []
    for module, path in modules.items():
        if not any(module == p or module.startswith(p + ".") for p in CORE_PACKAGES):
            continue
        rel = path.relative_to(ROOT).as_posix()
        for line, top, lazy in _third_party_imports(ast.parse(path.read_text())):
            allowed = (top in ("diffusers", "peft") and rel in DIFFUSERS_FILES) or (top == "ray" and lazy and rel in RAY_FILES)
            if top in FORBIDDEN_IN_CORE and not allowed:
                hits.append(f"{rel}:{line}{' (lazy)' if lazy else ''}: imports {top}")
    assert not hits, "the core imports a heavy runtime:\n  " + "\n  ".join(sorted(hits))


def _fail_upward(edges: list[Edge], what: str) -> None:
    up = upward_edges(edges)
    if up:
        lines = "\n  ".join(f"[{lo} -> {hi}] {e.where()}" for e, lo, hi in sorted(up, key=lambda t: (t[0].path, t[0].line)))
        pytest.fail(f"{len(up)} {what} import(s) from a lower layer to a higher one (layers: {[n for n, _ in LAYERS]}):\n  {lines}")


def test_module_level_imports_point_down():
    """Issue 16 "Done when": no module-level import from a lower layer to a higher one."""
    _, edges = import_graph()
    _fail_upward([e for e in edges if not e.lazy], "module-level")


def test_lazy_imports_point_down_too():
    """DESIGN.md: imports point down counting imports inside functions; a lazy import is still a tie."""
    _, edges = import_graph()
    _fail_upward([e for e in edges if e.lazy], "lazy (function-level)")


def test_layers_catch_an_upward_edge():
    """The layer check is not vacuous: the edge the issue names (models/__init__ -> tasks) is upward."""
    edge = Edge("rlft.models", "rlft.tasks.tfbind8", "rlft/models/__init__.py", 1, "from rlft.tasks import x", False)
    assert upward_edges([edge]) == [(edge, "chain", "tasks")]
    down = dataclasses.replace(edge, source="rlft.tasks.tfbind8", target="rlft.models")
    assert upward_edges([down]) == []
    assert layer_of("rlft") == (len(LAYERS) - 1, "runners") and layer_of("rlft.models.nets")[1] == "chain"
    assert layer_of("rlft.new_top_level_module") is None  # placed by hand, not swept into the root's layer


def test_no_file_over_the_line_limit():
    """No file in rlft/ outside benchmarks/ over ~400 lines (MAX_LINES = 420: 5 % slack)."""
    long = []
    for path in sorted((ROOT / "rlft").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[1] == "benchmarks":
            continue
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            long.append(f"{rel}: {n} lines")
    assert not long, f"files over {MAX_LINES} lines (split them by role):\n  " + "\n  ".join(long)


# -- no string switch on a learner type ------------------------------------------------------------------------

_LEARNER_VAR = re.compile(r"(^|_)learner_?type$|^learner_name$")


def _learner_names() -> set[str]:
    from rlft import registry

    return set(registry._TABLE["learner"])


def _string_switches(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines comparing something with a learner name, or a learner-type variable with a string."""

    def is_name_const(node):
        if isinstance(node, ast.Constant) and node.value in names:
            return True
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(isinstance(e, ast.Constant) and e.value in names for e in node.elts)
        return False

    def is_type_var(node):
        ident = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        if ident is None and isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
            arg = node.args[0] if node.args else None
            ident = arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None
        return bool(ident and _LEARNER_VAR.search(ident))

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(is_name_const(s) for s in sides) or any(is_type_var(s) for s in sides):
                lines.append(node.lineno)
        elif isinstance(node, ast.Match) and is_type_var(node.subject):
            lines.append(node.lineno)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Dict) and is_type_var(node.slice):
            lines.append(node.lineno)  # {"truncation": ..., ...}[learner_type]
    return sorted(set(lines))


def test_string_switch_detector():
    names = {"truncation", "no_kl"}
    code = (
        "if self.learner_type == 'truncation': pass\n"
        "x = 1 if kind in ('no_kl', 'elegant') else 2\n"
        "match learner_type:\n    case 'no_kl': pass\n"
        "y = {'a': 1}[spec.get('learner_type')]\n"
        "z = mode == 'loss'\n"
    )
    assert _string_switches(ast.parse(code), names) == [1, 2, 3, 5]


def test_no_string_switch_on_learner_type():
    """Learners differ by subclass and options, not by `if learner_type == "truncation"` (issue 16).

    Scanned: all of rlft/ except registry.py (the name table itself) and benchmarks/ (which names learners
    to run them)."""
    names = _learner_names()
    hits = []
    for path in sorted((ROOT / "rlft").rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[1] == "benchmarks" or rel.as_posix() == "rlft/registry.py":
            continue
        lines = path.read_text().splitlines()
        for line in _string_switches(ast.parse("\n".join(lines)), names):
            hits.append(f"{rel}:{line}: {lines[line - 1].strip()}")
    assert not hits, "string switches on a learner type (override a method or add an option instead):\n  " + "\n  ".join(hits)
