"""Command line: `relay serve`, `check-config` and the postqueue/postsuper-like queue
commands; it parses arguments and prints, and owns no state."""
