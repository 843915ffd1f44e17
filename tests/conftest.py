"""Shared pytest configuration. Fixtures for servers and reference models live in tests/fixtures_*.py."""

pytest_plugins = ["tests.fixtures_servers"]
