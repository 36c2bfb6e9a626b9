"""The built-in template collections (YAML data files)."""
