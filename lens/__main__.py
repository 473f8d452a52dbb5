"""``python -m lens``: the ``lens`` command line (:mod:`lens.cli`)."""

from lens.cli import main

raise SystemExit(main())
