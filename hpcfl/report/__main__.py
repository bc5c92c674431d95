"""``python -m hpcfl.report``: see hpcfl/report/__init__.py."""

import sys

from hpcfl.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
