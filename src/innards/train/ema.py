"""An exponential moving average of a model's parameters."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class EMA:
    """Shadow copies of parameters, updated as ``shadow <- decay * shadow + (1 - decay) * param``."""

    def __init__(self, params: Iterable[nn.Parameter], decay: float):
        self.decay = decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, params: Iterable[nn.Parameter]) -> None:
        """Move the shadows one step towards the current parameters."""
        torch._foreach_lerp_(self.shadow, [p.detach() for p in params], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadows as a flat tensor dict (for a checkpoint)."""
        return {str(i): t for i, t in enumerate(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the shadows from :meth:`state_dict`."""
        for i, t in enumerate(self.shadow):
            t.copy_(state[str(i)])

    def weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged parameters in place of the current ones."""
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        sd.update({n: e.detach().clone() for (n, _), e in zip(model.named_parameters(), self.shadow)})
        return sd
