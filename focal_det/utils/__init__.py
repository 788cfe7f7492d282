"""Helpers of focal_det that depend on nothing else in it."""
