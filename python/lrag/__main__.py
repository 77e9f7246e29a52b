"""``python -m lrag``: the same as the ``lrag`` console script."""
import sys

from lrag.cli import main

sys.exit(main())
