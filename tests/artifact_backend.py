"""A test backend whose trials return an artifact, to see what a failure to store one does."""

from __future__ import annotations

from harness.backends.base import Backend, Reporter, TrialResult, TrialSpec
from harness.backends.fake import FakeBackend


class ArtifactBackend(FakeBackend):
    def run(self, spec: TrialSpec, reporter: Reporter) -> TrialResult:
        result = super().run(spec, reporter)
        spec.workdir.mkdir(parents=True, exist_ok=True)
        path = spec.workdir / "predictions.txt"
        path.write_text(f"trial {spec.number}\n")
        result.artifacts.append(path)
        return result


_: type[Backend] = ArtifactBackend
