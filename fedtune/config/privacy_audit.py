"""The empirical privacy audit a simulated hospital runs on the global adapter it receives."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.config.sections import _require


@dataclass(frozen=True)
class PrivacyAuditSettings:
    """Per round and per hospital, inside the hospital: a membership inference test of the
    global adapter it evaluates (``membership``: its training records against ``nonmembers``
    held-out ones), and the exposure of ``canaries`` secret-like records inserted
    ``canary_repeats`` times into its training data against as many fresh ones (ranked among
    ``canary_candidates`` random secrets), in every ``every``-th round and the last (0: the
    last only; each audit costs forward passes). Results stay in ``<run>/privacy-audit/<site>.jsonl``;
    nothing of it is sent to the coordinator.
    """

    membership: bool = False
    nonmembers: int = 100
    canaries: int = 0
    canary_repeats: int = 10
    canary_candidates: int = 200
    every: int = 1

    def __post_init__(self) -> None:
        _require(self.nonmembers >= 2, f"`privacy_audit.nonmembers` must be >= 2, got {self.nonmembers}")
        _require(self.canaries >= 0, f"`privacy_audit.canaries` must be >= 0 (0: none), got {self.canaries}")
        _require(self.canary_repeats >= 1, f"`privacy_audit.canary_repeats` must be >= 1, got {self.canary_repeats}")
        _require(self.every >= 0, f"`privacy_audit.every` must be >= 0 (0: the last round only), got {self.every}")
        _require(
            self.canary_candidates >= 1,
            f"`privacy_audit.canary_candidates` must be >= 1, got {self.canary_candidates}",
        )

    @property
    def enabled(self) -> bool:
        return self.membership or self.canaries > 0

    def audits(self, server_round: int, num_rounds: int) -> bool:
        """Whether round ``server_round`` of ``num_rounds`` is audited."""
        if not self.enabled:
            return False
        return server_round >= num_rounds or (self.every > 0 and server_round % self.every == 0)
