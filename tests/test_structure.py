"""One idea per file, checked: gconv's modules import each other without cycles, training does not pull in the
report, every lowering module is registered, only `gconv.models` indexes parameters by a family's layer names, functions
are short and models are global programs."""
import ast
import pkgutil
from pathlib import Path

import jax

import gconv
from gconv.models import FAMILIES, create_model
from gconv.ops import lowerings

PACKAGE = Path(gconv.__file__).parent


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The gconv modules `path` imports anywhere in it (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                      for a in node.names}
    return {n for n in names if n in MODULES}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_import_graph_has_no_cycle():
    cycles = sorted(m for m in MODULES if m in _reachable(m))
    assert not cycles, f"modules on an import cycle: {cycles}"
    assert "gconv.tensorboard" in _reachable("gconv.metrics_log")  # the check sees imports at all


def test_training_does_not_import_the_report():
    assert "gconv.report" not in _reachable("gconv.train") and "gconv.plots" not in _reachable("gconv.train")


def test_every_lowering_module_is_registered():
    modules = {m.name for m in pkgutil.iter_modules(lowerings.__path__)} - {"base"}
    registered = {lowering.conv.__module__.rsplit(".", 1)[1] for lowering in lowerings.LOWERINGS.values()}
    assert modules == registered, f"lowering modules not registered in gconv.ops.lowerings: {modules - registered}"


def _top_level_layer_names() -> set[str]:
    names = set()
    for family in FAMILIES:
        model = create_model(family.variants[0], num_classes=10)
        shape = (1,) + tuple(family.input_shape(model))
        params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(shape, "float32"))["params"]
        assert family.params_at(params, family.head)["kernel"].shape[-1] == 10, family.name
        assert family.params_at(params, family.first_conv)["kernel"].ndim == 4, family.name
        names |= set(params)
    return names


def test_only_the_models_index_parameters_by_a_familys_layer_names():
    """Every family's declared head and first conv exist; no code outside gconv/models subscripts a parameter tree
    with one of the families' layer names (it asks the family: `family.params_at(params, family.head)`)."""
    names = _top_level_layer_names()
    assert {"head", "stem_conv", "conv1"} <= names
    offenders = []
    for module, path in MODULES.items():
        if module.startswith("gconv.models"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
                    and node.slice.value in names):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} [{node.slice.value!r}]")
    assert not offenders, offenders


TESTS = Path(__file__).parent
_SEEDED = {"default_rng", "SeedSequence", "Random"}  # generators that are replayable when given a seed


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _unseeded(source: str) -> list[int]:
    """Lines of `source` that draw randomness no seed replays: a generator built without a seed, numpy's or
    Python's global generator, or the operating system's entropy."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        global_draw = name.startswith(("np.random.", "numpy.random.", "random.")) and last not in _SEEDED
        if ((last in _SEEDED and not node.args and not node.keywords) or global_draw
                or name.startswith(("secrets.", "os.urandom"))):
            lines.append(node.lineno)
    return lines


def test_every_random_test_input_is_replayable():
    """Random inputs come from conftest's `seed`/`rng` fixtures (a fresh seed, printed with a failure, set by
    GCONV_TEST_SEED) or from hypothesis; conftest alone draws the fresh seed."""
    assert _unseeded("a = np.random.default_rng()\nb = np.random.default_rng(3)\nc = random.choice(x)\n"
                     "d = np.random.SeedSequence().entropy\ne = random.Random(seed)\n") == [1, 3, 4]
    offenders = [f"{path.name}:{line}" for path in sorted(TESTS.glob("*.py")) if path.name != "conftest.py"
                 for line in _unseeded(path.read_text())]
    assert not offenders, f"unseeded random inputs (use the `seed` or `rng` fixture): {offenders}"


def test_functions_are_short_and_the_loop_fits_a_screenful_or_five():
    """No function in gconv/ longer than 80 lines; gconv/train.py (steps and loop) under 300."""
    long = [f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
            for path in MODULES.values() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80]
    assert not long, long
    assert len((PACKAGE / "train.py").read_text().splitlines()) < 300


def test_models_and_layers_are_global_programs():
    """Parallelism is declared (gconv.parallel's rules), never written into a model: no mesh axis, collective or
    split argument in gconv/models/ or gconv/layers.py."""
    words = ("axis_name", "GroupSplit", "psum", "all_to_all", "shard_map", "split=")
    found = [f"{path.relative_to(PACKAGE.parent)}: {word}" for path in [*(PACKAGE / "models").glob("*.py"),
                                                                          PACKAGE / "layers.py"]
             for word in words if word in path.read_text()]
    assert not found, found
