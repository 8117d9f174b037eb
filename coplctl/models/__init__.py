"""Backbones, response encoders, the frozen-feature cache, the reward-method interface, the shared
trainer (with resume and trackers) and evaluation: what every method is built from."""
