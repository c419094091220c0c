"""`python -m mptcpkit` is the `mptcpkit` command."""

import sys

from mptcpkit.cli import main

sys.exit(main())
