"""The test suite: a package, so tests.conftest never resolves to another distribution named tests."""
