"""Models the plugin can prepare without network access."""
