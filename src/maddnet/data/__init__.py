"""Data sets (see the registry in this package)."""
