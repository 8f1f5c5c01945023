"""`python -m montage.cli` = the `montage` command."""

import sys

from montage.cli import main

sys.exit(main())
