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


# The rooms that receive typed pieces (ModelConfig, plain arguments), never the raw
# ml_collections config. evaluation/ still reads config.eval / config.data itself.
CONFIG_FREE_ROOMS = ("util", "model", "parallel", "data")
SECTIONS = ("model", "curriculum", "train", "eval", "data", "mesh", "checkpoint", "extend")


@pytest.mark.parametrize("room", CONFIG_FREE_ROOMS)
def test_low_rooms_never_read_a_section_of_the_raw_config(room):
    reads = {}
    for path in sorted((ROOT / room).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr in SECTIONS
                    and isinstance(node.value, ast.Name) and node.value.id == "config"):
                reads.setdefault(str(path.relative_to(ROOT)), []).append(node.lineno)
    assert not reads, f"config.<section> read at (file: lines) {reads}"
