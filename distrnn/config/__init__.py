"""The configuration: its schema and loading (schema), YAML values and overrides (values), the shared click
flags (options). The shipped YAML files are the data package distrnn.configs (configs/ in the checkout)."""
