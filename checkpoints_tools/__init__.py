"""Checkpoint tools for people: ``jrt-ckpt inspect`` and ``jrt-ckpt verify`` (see cli.py)."""
