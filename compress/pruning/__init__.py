"""Structured pruning engine over torch-pruning dependency graphs."""
