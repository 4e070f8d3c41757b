from portcullis.entry import main

raise SystemExit(main())
