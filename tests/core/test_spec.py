"""Policy spec strings, parameter conversion and the errors users see."""

from __future__ import annotations

import pytest

from cachepolicy.errors import CompositionError, ParameterError, SpecError, UnknownNameError
from cachepolicy.models import Sampler
from cachepolicy.policy import build_policies, parse_spec


def test_parse_composed_spec():
    terms = parse_spec("attention-sink:frames=3+sliding-window:frames=12")
    assert [(t.name, t.params) for t in terms] == [
        ("attention-sink", (("frames", "3"),)),
        ("sliding-window", (("frames", "12"),)),
    ]


def test_build_converts_types_and_spec_round_trips(registry):
    policies = build_policies(["attention-sink:frames=3", "sliding-window:frames=12"], registry.policies)
    assert [p.spec for p in policies] == ["attention-sink:frames=3", "sliding-window:frames=12"]
    assert policies[1].frames == 12 and isinstance(policies[1].frames, int)
    again = build_policies("+".join(p.spec for p in policies), registry.policies)
    assert again == policies


def test_defaults_apply(registry):
    (window,) = build_policies("sliding-window", registry.policies)
    assert window.frames == 12


@pytest.mark.parametrize("spec, message", [
    ("", "empty policy spec"),
    ("full+", "empty term"),
    ("sliding-window:", "has ':' but no parameters"),
    ("sliding-window:frames", "malformed parameter 'frames'"),
    ("sliding-window:frames=3,frames=4", "given twice"),
    ("Sliding Window", "bad policy name"),
])
def test_malformed_specs(registry, spec, message):
    with pytest.raises(SpecError, match=message):
        build_policies(spec, registry.policies)


def test_unknown_policy_suggests_closest(registry):
    with pytest.raises(UnknownNameError) as info:
        build_policies("sliding-windw:frames=3", registry.policies)
    text = str(info.value)
    assert "unknown policy 'sliding-windw'" in text
    assert "Did you mean 'sliding-window'" in text
    assert "Known policies:" in text and "attention-sink" in text


def test_unknown_parameter_lists_allowed(registry):
    with pytest.raises(ParameterError, match=r"no parameter 'size'; its parameters are: frames \(int\)"):
        build_policies("sliding-window:size=3", registry.policies)


@pytest.mark.parametrize("spec, message", [
    ("sliding-window:frames=3.5", "frames='3.5' is not an integer"),
    ("sliding-window:frames=abc", "frames='abc' is not an integer"),
    ("sliding-window:frames=0", "frames=0 is not allowed; it must be a positive integer"),
    ("attention-sink:frames=-2", "frames=-2 is not allowed; it must be a positive integer"),
])
def test_mistyped_and_out_of_range_values(registry, spec, message):
    with pytest.raises(ParameterError, match=message):
        build_policies(spec, registry.policies)


def test_same_policy_twice_is_refused(registry):
    with pytest.raises(CompositionError, match="appears twice"):
        build_policies("sliding-window:frames=3+sliding-window:frames=6", registry.policies)


def test_window_shorter_than_a_chunk_is_refused_before_the_run(registry, tiny_wan):
    from cachepolicy.engine import RolloutConfig, Session

    (window,) = build_policies("sliding-window:frames=2", registry.policies)
    session = Session(tiny_wan(), [window], RolloutConfig(num_chunks=2, prompts=["x"], seeds=[0]))
    with pytest.raises(ParameterError, match="frames=2 is shorter than one chunk.*use frames >= 3"):
        session.run()
    assert session.trace == []


def test_self_forcing_warped_steps():
    """Self Forcing's [1000, 750, 500, 250] warped with shift 5 (read off its code, brief section 3)."""
    assert Sampler().sigmas() == pytest.approx([1.0, 0.9375, 0.833333333, 0.625])


@pytest.mark.parametrize("kwargs, message", [
    ({"denoising_steps": ()}, "non-empty"),
    ({"denoising_steps": (500, 750)}, "strictly decreasing"),
    ({"denoising_steps": (1500,)}, r"in \(0, 1000\]"),
    ({"shift": 0}, "shift must be > 0"),
    ({"context_noise": -1}, "context_noise must be in"),
    ({"noise": "ddim"}, "noise=.ddim. is not allowed; choose fresh or predicted"),
])
def test_sampler_validation(kwargs, message):
    with pytest.raises(ParameterError, match=message):
        Sampler(**kwargs)
