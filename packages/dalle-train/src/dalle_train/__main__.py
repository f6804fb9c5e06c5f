"""``python -m dalle_train`` is ``dalle-train``."""

import sys

from dalle_train.cli import main

sys.exit(main())
