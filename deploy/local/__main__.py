"""`python -m deploy.local`: the `sluice dev` commands without the main `sluice` CLI."""

from deploy.local.cli import app

app(prog_name="python -m deploy.local")
