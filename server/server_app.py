"""The coordinator's Flower ServerApp: thin wiring from the run config to the round loop."""

from __future__ import annotations

from logging import INFO
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedtune import wire
from fedtune.runfolder import RunFolder
from fedtune.security.keys import AllowList, load_private
from fedtune.server.federation import run_federation
from fedtune.server.grid import PromptGrid

app = ServerApp()


def _say(line: str) -> None:
    log(INFO, "%s", line)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation described by the run folder named in the run config."""
    folder = RunFolder(Path(str(context.run_config["run-dir"])))
    cfg = folder.load_config()
    opener = None
    if cfg.security.seal:
        opener = wire.Opener(load_private(folder.coordinator_key), AllowList.from_folder(folder.allowlist_dir))
    run_federation(PromptGrid(grid), folder, cfg, opener=opener, context=context, say=_say)
