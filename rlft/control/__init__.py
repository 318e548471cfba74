"""rlft.control (see DESIGN.md)."""
