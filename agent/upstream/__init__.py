"""Upstream binary caches: HTTP clients with timeouts and circuit breakers, and the fetch path."""
