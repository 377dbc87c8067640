#!/usr/bin/env python3
"""The seed's readiness script, kept working: a thin wrapper over `layerwise check`.

    python check_gpu_readiness.py [MODEL] [--cpu] [--max-memory ...] [--json]
"""

import sys

from layerwise.cli import main
from layerwise.distributed import exit_process

if __name__ == "__main__":
    exit_process(main(["check", *sys.argv[1:]]))
