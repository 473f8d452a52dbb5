from lens.cli import main

raise SystemExit(main())
