"""Datasets of the standalone (miniature) world."""
