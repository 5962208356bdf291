"""Dependency analysis: tracing, channel propagation, coupled groups."""
