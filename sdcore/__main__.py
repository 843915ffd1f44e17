"""`python -m sdcore ...`, the same as the `sdcore` command."""

from sdcore.cli import main

raise SystemExit(main())
