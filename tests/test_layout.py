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
