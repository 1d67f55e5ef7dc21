from qlora_trainer.cli import main

raise SystemExit(main())
