"""The package version, apart from the public API so that any layer can say it."""

__version__ = "0.1.0"
