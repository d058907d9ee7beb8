"""Shared utilities: config, registries, distributed helpers, checkpoints, logging."""
