"""Built-in wirehub plugins."""
