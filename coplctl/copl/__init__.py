"""CoPL (paper §4): the registered method (:mod:`coplctl.copl.method`) and the paper's extra
experiments it runs in a benchmark (:mod:`coplctl.copl.experiments`: Tables 4-6 and Figure 2)."""

from coplctl.copl.method import CoPL, CoPLConfig, CoPLNet

__all__ = ["CoPL", "CoPLConfig", "CoPLNet"]
