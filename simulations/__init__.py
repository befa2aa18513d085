"""fedtune.simulations."""
