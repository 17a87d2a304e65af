"""``python -m agent``: the agent command."""

import sys

from agent.daemon.cli import main

sys.exit(main())
