"""The math layer: pure, synchronous, written once against the array namespace."""
