"""Self-describing parameter directories and atomic writes."""
