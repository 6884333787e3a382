"""``python -m activepath.cli``: the ``activepath`` command."""

import sys

from activepath.cli import main

if __name__ == "__main__":
    sys.exit(main())
