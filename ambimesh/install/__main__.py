"""``python -m ambimesh.install DEPLOY_DIR``: regenerate the chart and manifests (make deploy)."""

from __future__ import annotations

import sys
from pathlib import Path

from ambimesh.install.chart import write

if __name__ == "__main__":
    for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "deploy")):
        print(path)
