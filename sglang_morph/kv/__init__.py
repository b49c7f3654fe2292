"""Elastic KV cache: a fixed reservation whose usable part grows and shrinks at runtime."""
