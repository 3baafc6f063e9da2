"""Shared fixtures. e2e fixtures (a real region with real QEMU) live in tests/e2e/conftest.py."""
