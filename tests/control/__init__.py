"""Tests of rlft.control (ELEGANT and its baselines)."""
