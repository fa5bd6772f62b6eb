"""``python -m pdm_tools.evaluation.adaptation``: see ``pdm_tools.evaluation.adaptation.cli``."""

from pdm_tools.evaluation.adaptation.cli import main

raise SystemExit(main())
