"""`python -m writeback ...`: see writeback.cli."""

from writeback.cli import main

raise SystemExit(main())
