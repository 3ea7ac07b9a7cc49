"""``python -m presence``: the same as the ``presence`` command."""

import sys

from presence.cli import main

sys.exit(main())
