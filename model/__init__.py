"""ConvForever model."""
