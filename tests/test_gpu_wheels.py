"""eval/gpu_wheels.txt, the wheels the GPU check carries: exact pins that pyproject.toml's own bounds admit."""

from importlib.metadata import requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def test_every_wheel_is_pinned_within_the_projects_bounds():
    declared = [Requirement(r) for r in requires("spiking-lm")]  # pyproject.toml's, extras included
    bounds = {canonicalize_name(r.name): r.specifier for r in declared}
    lines = (ROOT / "eval" / "gpu_wheels.txt").read_text().splitlines()
    pins = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert pins
    for pin in pins:
        (spec,) = pin.specifier  # one exact version, so that the check installs what the suite ran with
        assert spec.operator == "==", pin
        name = canonicalize_name(pin.name)
        if name in bounds:
            assert bounds[name].contains(spec.version), f"{pin} is outside pyproject.toml's {bounds[name]}"
    pinned = {canonicalize_name(p.name) for p in pins}
    # What the check imports that the GPU machine's image lacks (the rest it has: docs/performance.md).
    assert {"jsonargparse", "datasets", "snntorch", "spikingjelly"} <= pinned
