"""The device mesh, logical-axis sharding rules and multi-process setup."""
