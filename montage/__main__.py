"""`python -m montage` = the `montage` command."""

import sys

from montage.platform.cli import main

sys.exit(main())
