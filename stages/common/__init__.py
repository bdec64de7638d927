"""The library the stages import: one module for each thing several stages share, never a copy.
It imports neither the demo kit, the stages nor the apps (pyproject.toml's import contracts)."""
