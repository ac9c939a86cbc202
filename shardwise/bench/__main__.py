"""``python -m shardwise.bench comm|step|serve ...``: the same as ``shardwise bench ...``."""
import sys

from .cli import main

sys.exit(main())
