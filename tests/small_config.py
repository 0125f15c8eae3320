"""A config file for tests that launch main.py: the small config of tests/helpers.py.

main.py's directory (the repository root) is on sys.path when it runs, so `tests` imports.
"""
from tests.helpers import small_config


def get_config():
    return small_config()
