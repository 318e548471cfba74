"""Benchmark tasks built on real data (TFBind8)."""
