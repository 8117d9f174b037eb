"""coplctl: personalized reward models (CoPL and its competitors) behind one interface.

Import submodules explicitly (``coplctl.data``, ``coplctl.core.registry`` ...): this package
imports nothing heavy so that the CLI starts fast.
"""

from importlib.metadata import version as _version

__version__ = _version("coplctl")  # one source: pyproject.toml


def load(run, *, cache_texts: int = 50_000):
    """A trained run as a reward function: ``coplctl.load("runs/copl").reward(users, prompts, responses)``
    (see :mod:`coplctl.serving.api`)."""
    from coplctl.serving.api import load as _load

    return _load(run, cache_texts=cache_texts)
