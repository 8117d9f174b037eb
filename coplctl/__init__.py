"""coplctl: personalized reward models (CoPL and its competitors) behind one interface.

Import submodules explicitly (``coplctl.data``, ``coplctl.registry`` ...): this package
imports nothing heavy so that the CLI starts fast.
"""

__version__ = "0.1.0"
