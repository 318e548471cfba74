"""rlft.guidance (see DESIGN.md)."""
