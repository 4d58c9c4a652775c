"""Training configs as Python files returning ml_collections ConfigDicts."""
