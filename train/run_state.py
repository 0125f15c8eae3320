"""What a run learns beside its config: W/run_state.json, facts the trainer records, never
settings a user gives (so they are not config keys).

- schedule_bridge: (tokens, rate difference), set when a resume changed the learning-rate
  schedule (train.allow_schedule_change): the rate continues from where it was
  (train/schedule.py); None otherwise.
- original_length: L0, the length the source of an extension trained at
  (extend.target_length, configs/extension.py); 0 for a run that extends nothing.

Runs written before this file kept both in config.json (train.schedule_bridge,
extend.original_length); `load` reads them from there when run_state.json is missing.
"""
from __future__ import annotations

import dataclasses
import json
import os

from configs.workdir_config import RUN_STATE_KEYS
from util.files import replace_text

FILE = "run_state.json"
# field -> (section, key) of config.json where older runs kept it
_LEGACY_KEYS = {key.split(".")[1]: tuple(key.split(".")) for key in RUN_STATE_KEYS}


@dataclasses.dataclass(frozen=True)
class RunState:
    schedule_bridge: tuple[int, float] | None = None
    original_length: int = 0


def _from_dict(values: dict) -> RunState:
    bridge = values.get("schedule_bridge")
    return RunState(schedule_bridge=None if bridge is None else (int(bridge[0]),
                                                                   float(bridge[1])),
                    original_length=int(values.get("original_length") or 0))


def load(workdir: str) -> RunState:
    """The run state of `workdir` (an empty one for a new run)."""
    path = os.path.join(workdir, FILE)
    if os.path.isfile(path):
        with open(path) as f:
            return _from_dict(json.load(f))
    legacy = os.path.join(workdir, "config.json")
    if os.path.isfile(legacy):
        try:
            with open(legacy) as f:
                saved = json.load(f)
        except (OSError, ValueError):
            return RunState()
        if isinstance(saved, dict):
            return _from_dict({name: (saved.get(section) or {}).get(key)
                               for name, (section, key) in _LEGACY_KEYS.items()})
    return RunState()


def write(state: RunState, workdir: str) -> None:
    """run_state.json, replaced atomically; left untouched when it already says the same
    (a refused command changes nothing in the workdir)."""
    replace_text(os.path.join(workdir, FILE), json.dumps(dataclasses.asdict(state), indent=1))
