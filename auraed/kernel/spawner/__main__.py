"""`python -m auraed.kernel.spawner --socket-fd N`: run the fork server."""

import sys

from auraed.kernel.spawner.server import main

sys.exit(main(sys.argv[1:]))
