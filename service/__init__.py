"""wirehub: a real-time WebSocket service extended with pluggy plugins."""

__version__ = "0.1.0"
