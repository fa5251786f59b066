"""The default front end: a real Valkey/Redis with keymiss's module, and the workers that fill its misses."""
