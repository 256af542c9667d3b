from scalegen.cli.main import main

raise SystemExit(main())
