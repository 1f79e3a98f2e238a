"""Allow ``python -m stargz_overlay``."""

import sys

from .cli import main

sys.exit(main())
