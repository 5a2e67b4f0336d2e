"""``python -m shade_ops``: the ``shade-ops`` command line."""
import sys

from .experiments.cli import main

sys.exit(main())
