"""`python -m fastdiff`: the command line (fastdiff/cli.py)."""

from fastdiff.cli import main

raise SystemExit(main())
