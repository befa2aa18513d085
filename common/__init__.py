"""fedtune.common."""
