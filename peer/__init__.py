"""ConvForever peer."""
