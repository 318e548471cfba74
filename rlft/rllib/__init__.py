"""rlft.rllib (see DESIGN.md)."""
