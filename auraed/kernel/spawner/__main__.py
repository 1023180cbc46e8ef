"""`python -m auraed.kernel.spawner --socket-fd N`: run the fork server."""

import sys

from auraed.kernel.spawner.server import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
