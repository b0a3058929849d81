"""``python -m normkd`` (what torchrun launches) runs the CLI."""

from normkd.cli import entry

raise SystemExit(entry())
