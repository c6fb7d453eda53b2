"""Where a run is tracked: an MLflow store (optional; the ``tracking`` extra)."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.config.sections import _require

# what an MLflow tracking URI may start with: local stores and a tracking server
TRACKING_SCHEMES = ("file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


@dataclass(frozen=True)
class TrackingSettings:
    """Send the run to MLflow: parameters, per-round metrics, summary, plots and adapter.

    ``uri`` empty: no tracking (nothing imported). ``experiment`` empty: ``run.name``.
    ``artifacts``: upload summary, plots and the exported adapter (off: numbers only).
    """

    uri: str = ""
    experiment: str = ""
    artifacts: bool = True

    def __post_init__(self) -> None:
        scheme = self.uri.partition(":")[0].split("+")[0].lower()
        _require(
            not self.uri or (":" in self.uri and scheme in TRACKING_SCHEMES),
            "`tracking.uri` must be an MLflow tracking URI such as 'sqlite:///mlflow.db', 'file:///abs/mlruns' "
            f"or 'http://host:5000' (schemes: {', '.join(TRACKING_SCHEMES)}), got {self.uri!r}",
        )

    @property
    def enabled(self) -> bool:
        return bool(self.uri)
