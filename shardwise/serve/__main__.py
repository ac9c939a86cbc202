"""``python -m shardwise.serve --model M --tp N --port P``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
