"""Detectors registered in the standalone world."""
