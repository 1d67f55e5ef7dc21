"""The memory estimate, made before any weights load, and the settings chosen from it."""
