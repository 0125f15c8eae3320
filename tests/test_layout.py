"""The code layout's one rule: a module never imports from a room above its own."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Rooms from the bottom up: a module may import from its own room and the rooms below.
ROOMS = ("util", "model", "parallel", "data", "evaluation", "train", "cli")


def _imported_rooms(path: pathlib.Path) -> set[str]:
    rooms = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        rooms |= {name.split(".")[0] for name in names} & set(ROOMS)
    return rooms


@pytest.mark.parametrize("room", ROOMS)
def test_no_module_imports_from_a_room_above(room):
    allowed = set(ROOMS[:ROOMS.index(room) + 1])
    modules = sorted((ROOT / room).glob("*.py"))
    assert modules, f"room {room}/ has no modules"
    offending = {str(path.relative_to(ROOT)): sorted(_imported_rooms(path) - allowed)
                 for path in modules if _imported_rooms(path) - allowed}
    assert not offending, f"imports from a room above: {offending}"


def test_no_module_edits_sys_path():
    sources = [p for p in ROOT.rglob("*.py")
               if ".venv" not in p.parts and p != pathlib.Path(__file__).resolve()]
    hacks = [str(p.relative_to(ROOT)) for p in sources if "sys.path." in p.read_text()]
    assert hacks == [], "run from the repository root instead (pytest.ini, python -m)"


# The rooms that receive typed pieces (ModelConfig, the typed sections of
# configs/sections.py, plain arguments), never the raw ml_collections config.
CONFIG_FREE_ROOMS = ("util", "model", "parallel", "data", "evaluation")
SECTIONS = ("model", "curriculum", "train", "eval", "data", "mesh", "checkpoint", "extend",
            "generate", "lm_eval", "plan", "seed")


def _config_reads(tree) -> list[int]:
    """Lines reading a section of a config: config.<section>, <x>.config.<section> (a
    run's config) or config.get("<section>")."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in SECTIONS:
            owner = node.value
            if ((isinstance(owner, ast.Name) and owner.id == "config")
                    or (isinstance(owner, ast.Attribute) and owner.attr == "config")):
                lines.append(node.lineno)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "get" and node.args
                and isinstance(node.args[0], ast.Constant) and node.args[0].value in SECTIONS
                and isinstance(node.func.value, (ast.Name, ast.Attribute))
                and getattr(node.func.value, "id", getattr(node.func.value, "attr", "")) ==
                "config"):
            lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("room", CONFIG_FREE_ROOMS)
def test_low_rooms_never_read_a_section_of_the_raw_config(room):
    reads = {}
    for path in sorted((ROOT / room).glob("*.py")):
        if lines := _config_reads(ast.parse(path.read_text())):
            reads[str(path.relative_to(ROOT))] = lines
    assert not reads, f"config.<section> read at (file: lines) {reads}"


@pytest.mark.parametrize("room", ("train", "cli"))
def test_train_and_cli_take_settings_not_sections_of_the_raw_config(room):
    """A mode's entry hands the ml_collections config to train/run_spec.py's resolve;
    below it everything reads the typed Settings (configs/sections.py)."""
    reads = {}
    for path in sorted((ROOT / room).glob("*.py")):
        if lines := _config_reads(ast.parse(path.read_text())):
            reads[str(path.relative_to(ROOT))] = lines
    assert not reads, f"config.<section> read at (file: lines) {reads}"


@pytest.mark.parametrize("room", CONFIG_FREE_ROOMS)
def test_low_rooms_never_import_ml_collections(room):
    importing = [str(path.relative_to(ROOT)) for path in sorted((ROOT / room).glob("*.py"))
                 if "ml_collections" in _imported_modules(path)]
    assert not importing, f"these take a ConfigDict: {importing}"


def _imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("source, expected", [
    ("x = config.eval.batch_size", [1]),
    ("x = run.config.data.source", [1]),
    ("x = config.get('generate')", [1]),
    ("x = settings.batch_size\ny = config_path", []),
])
def test_the_config_read_detector_sees_every_form(source, expected):
    assert _config_reads(ast.parse(source)) == expected


def test_a_run_carries_typed_parts_not_the_raw_config():
    """Evaluation and generation take a Run: its fields are typed (ModelConfig, the mesh,
    the tokenizer, ...), so the ConfigDict cannot reach the rooms below train/ through it."""
    import dataclasses

    from train.state import Run
    fields = {field.name: field.type for field in dataclasses.fields(Run)}
    assert "config" not in fields and "model_config" in fields
