"""``python -m normops.cli``: the ``normops`` command (benchmarks/gpu_validate.sh, benchmarks/acceptance.py)."""
import sys

from . import main

sys.exit(main())
