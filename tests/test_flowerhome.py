"""A Flower home's bookkeeping: where a run's Ray state is and how its processes are known."""

from __future__ import annotations

from pathlib import Path

from fedtune.flowerhome import flower_env, ray_tmpdir, remove_ray_link, run_markers
from fedtune.runfolder import RunFolder


def test_a_deep_run_folder_gets_a_short_ray_link_that_is_removed_again(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / ("deep-" * 10) / "run")
    env = flower_env(folder)
    link = Path(env["RAY_TMPDIR"])
    assert link == ray_tmpdir(folder) and link.is_symlink() and link.resolve() == folder.ray_dir.resolve()
    markers = run_markers(folder)
    assert f"FLWR_HOME={folder.flwr_home}" in markers.environ and f"RAY_TMPDIR={link}" in markers.environ
    assert f"{link}/" in markers.cmdline  # Ray's agents name their session folder under it
    remove_ray_link(folder)
    assert not link.exists() and not link.is_symlink() and folder.ray_dir.is_dir()
    assert flower_env(folder, ray=False).get("RAY_TMPDIR") != str(link)
    assert not link.exists()  # a SuperLink without Ray makes no link
