"""`python -m pie.cli ...` = `pie ...`."""

from pie.cli.main import main

main()
