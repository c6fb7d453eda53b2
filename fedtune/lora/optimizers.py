"""Server-side optimizers over a round's merged update. No Flower in here.

The update ``u`` is the round's pseudo-gradient: the (robust or weighted) mean of the
sites' deltas, pointing where the sites moved, so the new global is ``global + step``.
Following Reddi et al., "Adaptive Federated Optimization" (ICLR 2021) and FedAvgM
(Hsu et al., 2019), with ``t`` the step count from 1:

- ``none``:    step = lr·u  (lr 1 is plain FedAvg)
- ``fedavgm``: v = momentum·v + u;  step = lr·v
- ``fedadam``: m = β1·m + (1-β1)·u;  v = β2·v + (1-β2)·u²;  step = lr·m̂ / (√v̂ + τ)
- ``fedyogi``: m as fedadam;  v = v - (1-β2)·u²·sign(v - u²);  step = lr·m̂ / (√v̂ + τ)

where m̂ = m / (1-β1^t) and v̂ = v / (1-β2^t). Moments start at zero, are created on the
first step with the update's keys and shapes, and are kept in float64.

Which stay factored under the ``svd`` rule (whose updates are
:class:`~fedtune.lora.factored.Factored`, never an out x in matrix): only ``none``, whose
step lr·u scales each term's coefficient. ``fedavgm``'s momentum is a running sum over all
rounds, whose factors would grow by every round's stacked ranks (and would keep every past
round's adapters), so it is dense: one float64 out x in matrix per module, kept across
rounds; ``fedadam`` and ``fedyogi`` square the update coordinate-wise, so their moments are
dense too (two such matrices). The coordinator densifies the update for them, within
``federation.svd_dense_limit_mb`` (:mod:`fedtune.server.merging`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedtune.config import FederationSettings
from fedtune.errors import CheckpointError, ConfigError
from fedtune.lora.delta import State
from fedtune.lora.factored import Factored, Update


class ServerOptimizer:
    """Turns each round's merged update into the step added to the global adapter.

    Parameters
    ----------
    lr : float
        Server learning rate; every step is scaled by it.
    """

    name: str = "none"
    default_lr: float = 1.0  # ``federation.server_lr`` = 0 means this (lr 1 is plain FedAvg)
    factored: bool = True  # steps a factored update as factors (the plain step: lr·u)
    _slots: tuple[str, ...] = ()  # names of the per-tensor moments, e.g. ("m", "v")
    _counts_steps: bool = False  # whether the step count ``t`` is part of the state

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self._t = 0
        self._moments: dict[str, State] = {slot: {} for slot in self._slots}

    @classmethod
    def build(cls, *, lr: float, momentum: float, beta1: float, beta2: float, tau: float) -> ServerOptimizer:
        """This optimizer from all of the config's hyperparameters (each class takes its own)."""
        return cls(lr)

    def step(self, update: Update) -> Update:
        """Advance one round and return the change to add to the global (same keys and dtypes as
        ``update``; a factored update only where :attr:`factored`, and then factored)."""
        if isinstance(update, Factored):
            if not self.factored:
                raise TypeError(f"the {self.name} server optimizer's moments are dense: densify the update first")
            self._t += 1
            return update.scaled(self.lr)
        u = {key: update[key].detach().to(torch.float64) for key in sorted(update)}
        self._init_or_check(u)
        self._t += 1
        direction = self._direction(u)
        return {key: (self.lr * direction[key]).to(update[key].dtype) for key in u}

    def state_dict(self) -> State:
        """The moments as ``"<slot>/<key>"`` float64 tensors, plus ``"t"`` (0-d int64) where it matters."""
        out: State = {f"{slot}/{key}": v.clone() for slot in self._slots for key, v in self._moments[slot].items()}
        if self._counts_steps:
            out["t"] = torch.tensor(self._t, dtype=torch.int64)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned; raise ``CheckpointError`` if it does not fit.

        It must be this optimizer's kind of state, consistent in itself and, when this
        optimizer has already taken a step, over the same keys and shapes.
        """
        what = f"{self.name} server optimizer state"
        moments: dict[str, State] = {slot: {} for slot in self._slots}
        t = 0
        for name, value in state.items():
            if name == "t" and self._counts_steps:
                if value.dim() != 0 or value.is_floating_point() or int(value) < 0:
                    raise CheckpointError(f"{what}: 't' must be a non-negative integer scalar, got {value!r}")
                t = int(value)
                continue
            slot, sep, key = name.partition("/")
            if not sep or not key or slot not in moments:
                raise CheckpointError(f"{what}: unexpected entry {name!r} (is it another optimizer's state?)")
            if not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{what}: entry {name!r} holds NaN or Inf")
            moments[slot][key] = value.detach().to(torch.float64).clone()
        if self._counts_steps and "t" not in state:
            raise CheckpointError(f"{what}: missing the step count 't'")
        if self._slots:
            first = moments[self._slots[0]]
            for slot in self._slots[1:]:
                _require_same(first, moments[slot], f"{what}: {self._slots[0]!r} and {slot!r} moments differ")
            if self._counts_steps and (t == 0) != (not first):
                raise CheckpointError(f"{what}: step count {t} does not fit {len(first)} moment tensors")
            current = self._moments[self._slots[0]]
            if current:
                _require_same(current, first, f"{what}: does not fit the adapter this optimizer is stepping")
        self._moments, self._t = moments, t

    def _init_or_check(self, u: State) -> None:
        if not self._slots:
            return
        current = self._moments[self._slots[0]]
        if not current:
            self._moments = {slot: {k: torch.zeros_like(v) for k, v in u.items()} for slot in self._slots}
            return
        if set(current) != set(u) or any(current[k].shape != u[k].shape for k in u):
            raise ValueError(f"{self.name}: update keys or shapes differ from the first round's")

    def _direction(self, u: State) -> State:
        return u


def _require_same(a: State, b: State, message: str) -> None:
    if set(a) != set(b):
        raise CheckpointError(f"{message} (keys {sorted(set(a) ^ set(b))[:2]} not in both)")
    for key in a:
        if a[key].shape != b[key].shape:
            raise CheckpointError(f"{message} (tensor {key}: {tuple(a[key].shape)} vs {tuple(b[key].shape)})")


class FedAvgM(ServerOptimizer):
    """Server momentum (Hsu et al., 2019): v = momentum·v + u, step = lr·v."""

    name = "fedavgm"
    factored = False  # v sums every round's update: dense (see the module's docstring)
    _slots = ("v",)

    def __init__(self, lr: float, momentum: float) -> None:
        super().__init__(lr)
        self.momentum = momentum

    @classmethod
    def build(cls, *, lr: float, momentum: float, beta1: float, beta2: float, tau: float) -> ServerOptimizer:
        return cls(lr, momentum)

    def _direction(self, u: State) -> State:
        v = self._moments["v"]
        for key, value in u.items():
            v[key].mul_(self.momentum).add_(value)
        return v


class FedAdam(ServerOptimizer):
    """FedAdam (Reddi et al., 2021) with Adam's bias correction: step = lr·m̂ / (√v̂ + τ).

    Bias correction is not in the paper's Algorithm 2 but is standard in Adam; Flower's
    FedAdam applies it too, scaling its step by √(1-β2^t) / (1-β1^t).
    """

    name = "fedadam"
    default_lr = 0.01
    factored = False  # u² is coordinate-wise: dense moments
    _slots = ("m", "v")
    _counts_steps = True

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    @classmethod
    def build(cls, *, lr: float, momentum: float, beta1: float, beta2: float, tau: float) -> ServerOptimizer:
        return cls(lr, beta1, beta2, tau)

    def _second_moment(self, v: torch.Tensor, u2: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(u2, alpha=1.0 - self.beta2)

    def _direction(self, u: State) -> State:
        m, v = self._moments["m"], self._moments["v"]
        c1, c2 = 1.0 - self.beta1**self._t, 1.0 - self.beta2**self._t
        out: State = {}
        for key, value in u.items():
            m[key].mul_(self.beta1).add_(value, alpha=1.0 - self.beta1)
            self._second_moment(v[key], value * value)
            out[key] = (m[key] / c1) / ((v[key] / c2).sqrt() + self.tau)
        return out


class FedYogi(FedAdam):
    """FedYogi (Reddi et al., 2021): v = v - (1-β2)·u²·sign(v - u²), bias-corrected as FedAdam."""

    name = "fedyogi"

    def _second_moment(self, v: torch.Tensor, u2: torch.Tensor) -> None:
        v.sub_((1.0 - self.beta2) * u2 * torch.sign(v - u2))


# The registry of server optimizers (``federation.server_optimizer``): config.SERVER_OPTIMIZERS
# is tested equal to its names.
SERVER_OPTIMIZERS: dict[str, type[ServerOptimizer]] = {
    cls.name: cls for cls in (ServerOptimizer, FedAvgM, FedAdam, FedYogi)
}
DEFAULT_LR = {name: cls.default_lr for name, cls in SERVER_OPTIMIZERS.items()}  # for ``server_lr`` = 0


def make_server_optimizer(
    name: str, *, lr: float, momentum: float = 0.9, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
) -> ServerOptimizer:
    """Build the server optimizer ``name`` (a key of ``SERVER_OPTIMIZERS``) at the resolved
    learning rate ``lr``; bad values raise ``ConfigError`` (the config's own checks)."""
    FederationSettings(
        server_optimizer=name,
        server_lr=lr,
        server_momentum=momentum,
        server_beta1=beta1,
        server_beta2=beta2,
        server_tau=tau,
    )
    if not lr > 0:  # the config's 0 means "the optimizer's default"; here it is resolved
        raise ConfigError(f"`federation.server_lr` must be positive, got {lr}")
    return SERVER_OPTIMIZERS[name].build(lr=lr, momentum=momentum, beta1=beta1, beta2=beta2, tau=tau)
