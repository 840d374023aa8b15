"""Helpers the tests share: paths and shared data, tiny models, processes, PostgreSQL."""
