"""The test suite's strategies. They live in tunebench.strategies so that `tunebench check` draws the same ones."""
from tunebench.strategies import *  # noqa: F401,F403
from tunebench.strategies import all_configs, configs, dense_problems  # noqa: F401
