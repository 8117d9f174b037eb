"""The base layer: errors, file readers, atomic writes, config checks, the registry, checkpoints, progress
and the Bradley-Terry optimisation pieces. Imports nothing else of coplctl."""
