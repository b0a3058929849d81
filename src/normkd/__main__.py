"""``python -m normkd`` (what torchrun launches) runs the CLI."""

from normkd.cli import main

raise SystemExit(main())
