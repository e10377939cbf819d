"""``python -m taqrir.migrations revision -m "message"``: autogenerate a revision."""

import sys

from taqrir.migrations import _revision

if len(sys.argv) >= 4 and sys.argv[1] == "revision" and sys.argv[2] == "-m":
    _revision(sys.argv[3])
else:
    print('usage: python -m taqrir.migrations revision -m "message"')
