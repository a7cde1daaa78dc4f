"""The version of asyncnn, in one place (the package and its trace headers read it)."""

__version__ = "0.1.0.dev0"
