"""The recipe: its typed schema, YAML loading by name or path, and --set overrides."""
