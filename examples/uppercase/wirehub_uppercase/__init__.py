"""An example third-party wirehub plugin."""
