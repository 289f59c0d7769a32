"""``python -m edgespec.linkemu``: run one link emulator until SIGINT/SIGTERM."""

from edgespec.linkemu import main

raise SystemExit(main())
