"""Conformance suite (issue 11): a package, so its ``conftest`` is ``conformance.conftest`` and
never shadows ``tests/conftest.py``, whose helpers other test modules import as ``conftest``."""
