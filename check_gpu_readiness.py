#!/usr/bin/env python3
"""The seed's readiness script, kept working: a thin wrapper over `layerwise check`.

    python check_gpu_readiness.py [MODEL] [--cpu] [--max-memory ...] [--json]
"""

import sys

from layerwise.cli import main

if __name__ == "__main__":
    sys.exit(main(["check", *sys.argv[1:]]))
