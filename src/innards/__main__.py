from innards.cli import main

raise SystemExit(main())
