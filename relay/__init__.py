"""relay: a self-hosted SMTP relay daemon (intake → spool → schedule → delivery)."""

__version__ = "0.1.0"
