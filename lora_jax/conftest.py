"""Doctest settings for the package's docstring examples."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
