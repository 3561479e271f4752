"""``python -m idlefleet.node.cli``: the same entry point as the ``idlefleet`` command."""

import sys

from idlefleet.node.cli.main import main

sys.exit(main())
