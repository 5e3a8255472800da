"""`python -m harness ...` is the `qharness` command."""

import sys

from harness.cli import main

sys.exit(main())
