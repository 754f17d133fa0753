"""The library's version (``mammut.__version__``): recorded in every checkpoint it writes.
Imports nothing, so the leaf package ``mammut.io`` may read it."""

__version__ = "0.1.0"
