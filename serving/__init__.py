"""Serving: the Ray Serve application (may import `streams` and `jobs`)."""
