"""Data stage: load, validate, clean, split and report."""
