"""The package's version, in a module of its own so that modules of the package can read
it without importing `quantjax` itself (whose `__init__` imports them)."""

__version__ = "0.1.0"
