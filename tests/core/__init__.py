"""Core tests: the FUSE-free core of a mount under trio (see conftest.py)."""
