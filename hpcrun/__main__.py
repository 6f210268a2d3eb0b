from hpcrun.cli import main

raise SystemExit(main())
