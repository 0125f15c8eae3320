"""A config file for tests that launch main.py: the small config of tests/helpers.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.helpers import small_config  # noqa: E402


def get_config():
    return small_config()
