"""Tic-tac-toe rules for wirehub's game endpoint (a third-party plugin example)."""
