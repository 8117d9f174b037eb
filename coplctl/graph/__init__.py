"""CoPL user representation learning: the preference graph and graph collaborative filtering (GCF)."""
