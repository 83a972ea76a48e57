"""ConvForever coordinator."""
