"""The package version (one place; imported by modules that must not import the package top)."""

__version__ = "0.1.0"
