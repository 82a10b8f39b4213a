"""A test backend that fails for some params, to check that a failing trial fails alone."""

from __future__ import annotations

from harness.backends.base import Backend, Reporter, TrialResult, TrialSpec
from harness.backends.fake import FakeBackend


class FlakyBackend(FakeBackend):
    def run(self, spec: TrialSpec, reporter: Reporter) -> TrialResult:
        if spec.config.train.batch_size == 8:
            raise RuntimeError("out of memory (simulated for batch size 8)")
        return super().run(spec, reporter)


_: type[Backend] = FlakyBackend
