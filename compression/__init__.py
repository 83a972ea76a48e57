"""ConvForever compression."""
