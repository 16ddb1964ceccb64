"""Fixtures that run real spirtd processes on 127.0.0.1."""
