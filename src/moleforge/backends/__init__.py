"""Backends: IR -> executable modules."""
