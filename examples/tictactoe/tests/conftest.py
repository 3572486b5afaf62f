"""wirehub.testing comes from the installed wirehub (its pytest11 entry point): no pytest_plugins here."""
import sys
from pathlib import Path

# The tests run against the package in this checkout, installed or not.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

