"""Small helpers shared by modules, callbacks and commands."""
