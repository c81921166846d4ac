"""`python -m jaxft.data inspect CONFIG.yaml [dotted.key=value ...]`; see `jaxft.data.cli`."""

from jaxft.data.cli import main

raise SystemExit(main())
