"""`python -m specattn ...` (and `torchrun ... -m specattn ...`): the same as the `specattn` command."""
import sys

from .cli import main

sys.exit(main())
