"""Whole networks assembled from `nemojax.nn` blocks."""
