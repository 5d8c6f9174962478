"""The scan stage of one monitor: from the watched parameters' gradients to a launched
:class:`~gradtel.pipeline.update.Update`, and from a launched update to its health.

It also keeps the look that ``attach()`` takes at the end of every backward pass, which
the next ``collect()`` publishes when the gradients it saw are still the ones there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch

from .._ratelimit import RateLimitedLog
from ..health import GradHealth
from ..options import MonitorOptions
from .parameters import Gradients, Watched, same_objects
from .scan import Scanner
from .update import Norms, State, Update, launch

__all__ = ["OwnCounts", "ScanStage", "added"]


class OwnCounts(Protocol):
    """This rank's own counts before the cross-rank reduction
    (:class:`gradtel.attach.origin.OriginCounter`, fed by a DDP or FSDP hook)."""

    installed: bool
    """A hook feeds them: they are reported, as 0 when none came with an update."""

    def take(self, update_ends: bool = True) -> torch.Tensor | None: ...


class ScanStage:
    """Launches and reads out the updates of one monitor's watched parameters.

    ``failed`` is told of every failure of the scan (it may raise: ``on_error="raise"``);
    ``origin`` counts this rank's own gradients before the cross-rank reduction.
    """

    def __init__(
        self,
        named: list[tuple[str, torch.nn.Parameter]],
        options: MonitorOptions,
        *,
        layer_norms: bool,
        origin: OwnCounts,
        failed: Callable[[Exception], None],
        error_log: RateLimitedLog,
    ) -> None:
        self._options = options
        self._layer_norms = layer_norms
        self._origin = origin
        self._failed = failed
        self._error_log = error_log
        self.watched = Watched(named, options.max_layers, options.layer_depth)
        self.scanner = Scanner()
        self._looked: Update | None = None
        """What :meth:`look` saw at the end of the latest backward pass, not taken yet."""
        self._looked_origin: torch.Tensor | None = None
        self._looked_grads: tuple[torch.Tensor | None, ...] = ()

    def watch(self, named: list[tuple[str, torch.nn.Parameter]]) -> None:
        """Take ``named`` as the watched parameters instead (a refresh)."""
        self.unwatch()
        self.watched = Watched(named, self._options.max_layers, self._options.layer_depth)
        self.scanner = Scanner()  # a new one: the old one planned for the tensors watched before

    def unwatch(self) -> None:
        """Remove the hooks that learn the backward order of the watched parameters (again:
        a no-op)."""
        self.watched.order.remove()

    def launch(
        self,
        step: int,
        sequence: int,
        *,
        norms: Norms | None = None,
        loss: torch.Tensor | None = None,
        total_norm: torch.Tensor | None = None,
        origin: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        scaled: bool = False,
        exact: bool = False,
    ) -> Update:
        """Update ``sequence`` (training step ``step``) with its scan queued on the device,
        or unscanned (and why). ``origin``: this rank's own counts before the reduction, to
        read with it. ``exact``: on a device whose work is queued, count every gradient
        exactly now (they may be rewritten before the read-out)."""
        watched, thresholds = self.watched, self._options.thresholds
        grads = watched.gather(self._failed)
        reason = self._unscanned(grads, step)
        if reason is not None:
            return Update.not_scanned(step, thresholds, reason, grads.skipped, sequence)
        update = Update(step, thresholds, State.LAUNCHED, skipped=grads.skipped, sequence=sequence)
        try:
            launch(
                watched,
                grads,
                self.scanner,
                update,
                norms=norms,
                loss=loss,
                total_norm=total_norm,
                origin=origin,
                scale=scale,
                scaled=scaled,
                local=self._origin.installed,
                grad_norm=self._options.grad_norm,
                layer_norms=self._layer_norms,
                exact=exact or self._options.readout == "deferred",
                no_norms=lambda: self._no_sparse_norms(step),
            )
        except Exception as exc:  # the scan failed: nothing was counted, say so
            self._failed(exc)
            update.unscan("scan_error", len(watched.params))
        return update

    def read_out(self, update: Update) -> GradHealth:
        """The health of an update: its read-out, then exact counts of what it flags."""
        try:
            return update.read_out(self.scanner)
        except Exception as exc:  # the scan failed: nothing was counted, say so
            self._failed(exc)
            return update.unscan("scan_error", len(update.labels))

    def look(self, step: int, sequence: int, loss: torch.Tensor | None) -> None:
        """Scan the gradients as backward left them, for :meth:`take_look`."""
        try:
            # A look replaced later keeps its micro-batch's counts for the next one.
            own = self._origin.take(update_ends=False)
            self._looked_origin = added(self._looked_origin, own)
            looked = self.launch(step, sequence, loss=loss, origin=self._looked_origin, exact=True)
            if looked.pending and looked.launched is not None and looked.launched.exact is None:
                self.read_out(looked)  # done when queued: read it now, for free
            self._looked = looked
            self._looked_grads = tuple(p.grad for p in self.watched.params)
        except Exception as exc:  # the next collect() scans as it always did
            self._looked = None
            self._failed(exc)

    def take_look(self, loss: torch.Tensor | None) -> tuple[Update | None, torch.Tensor | None]:
        """The latest look, if it still stands for this update, and this rank's counts
        before the reduction that the looks took."""
        looked, origin, grads = self._looked, self._looked_origin, self._looked_grads
        # The gradients go too: held, zero_grad() would not free them until the next look.
        self._looked, self._looked_origin, self._looked_grads = None, None, ()
        if looked is not None and not (
            same_objects(grads, [p.grad for p in self.watched.params])
            and (loss is None or looked.read_along.loss_bad is not None)
        ):
            # Gradients replaced since backward (not rewritten in place), or a loss the look
            # did not see: scan now.
            looked = None
        return looked, origin

    def _unscanned(self, grads: Gradients, step: int) -> str | None:
        """Why nothing can be scanned in this update, or None; logs what to check."""
        if grads.values:
            return None
        params = self.watched.params
        trainable = sum(p.requires_grad for p in params)
        without = sum(p.requires_grad and p.grad is None for p in params)
        if without < trainable:  # gradients were there, gradtel could not count them
            return "scan_error"
        self._error_log.log(
            "no_gradients",
            logging.WARNING,
            "gradtel: step %d not scanned: 0 of %d watched trainable parameters had a "
            "gradient; is collect() called after backward() and before zero_grad()? "
            "(status unknown, counted in gradtel_unscanned_updates_total)",
            step,
            trainable,
        )
        return "no_gradients"

    def _no_sparse_norms(self, step: int) -> None:
        self._error_log.log(
            "sparse_norms",
            logging.WARNING,
            "gradtel: step %d has sparse gradients: grad_norm and layer_norms are not "
            "computed for it (the NaN/Inf counts are)",
            step,
        )


def added(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of two optional count tensors (on the device, no host read)."""
    if a is None or b is None:
        return a if b is None else b
    return a + b.to(a.device)
