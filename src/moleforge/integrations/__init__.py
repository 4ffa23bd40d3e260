"""Integrations with training frameworks (imported on first use: they import those frameworks)."""
