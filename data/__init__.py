"""ConvForever data."""
