"""Redis fixtures: real redis-server processes (filled in by the store work)."""
