"""Daemon: the supervisor and its worker processes, systemd notification and restarts; it
composes the stages and holds no mail logic of its own."""
