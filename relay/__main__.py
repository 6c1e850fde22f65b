"""Entry point for `python -m relay` (the supervisor starts its workers this way)."""

from relay.cli.main import main

raise SystemExit(main())
