from portcullis.cli import main

raise SystemExit(main())
