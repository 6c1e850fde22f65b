"""relay: a self-hosted SMTP relay daemon (intake → spool → scheduler → courier)."""

__version__ = "0.1.0"
