"""``python -m edgespec.linkemu``: run one link emulator until SIGINT/SIGTERM."""

from edgespec.linkemu.cli import main

raise SystemExit(main())
