"""Preference data: the dataset format, its validation, the UF-P simulator and the real UF-P builder."""

from coplctl.data.dataset import PreferenceDataset, load

__all__ = ["PreferenceDataset", "load"]
