"""Quantized layer swapping: decoder layers move between full precision and quantized copies."""
