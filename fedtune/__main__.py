from fedtune.cli import main

raise SystemExit(main())
