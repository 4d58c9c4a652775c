"""The one trainer: loop, jitted step, checkpoints, metrics, optimizer, tasks and command line."""
