import pytest
import torch

from segcore.config import ModelSpec
from segcore.errors import ConfigError, UnknownModelError
from segcore.models import build_model, count_parameters
from segcore.models.fields import input_multiple, measure_receptive_field


@pytest.mark.parametrize(
    ("arch", "kwargs", "cin", "cout", "paper_millions"),
    [
        ("unet", {"depth": 4, "width": 64, "padding": "valid"}, 1, 2, 31.0),
        ("u2net", {}, 3, 1, 44.0),
        ("u2netp", {}, 3, 1, 1.13),
    ],
)
def test_parameter_counts_match_papers(arch, kwargs, cin, cout, paper_millions):
    model = build_model(ModelSpec(arch=arch, in_channels=cin, out_channels=cout, kwargs=kwargs))
    n = count_parameters(model) / 1e6
    assert abs(n - paper_millions) / paper_millions < 0.01, n


def test_unet_valid_mode_572_gives_388():
    model = build_model(ModelSpec(arch="unet", in_channels=1, out_channels=2,
                                  kwargs={"depth": 4, "width": 4, "padding": "valid"})).eval()
    with torch.inference_mode():
        y = model(torch.zeros(1, 1, 572, 572))
    assert y.shape == (1, 2, 388, 388)
    assert model.valid_output_size(572) == 388


@pytest.mark.parametrize("arch", ["unet", "u2netp", "u2netp-rec"])
def test_models_return_logits_of_input_size(arch):
    kwargs = {"depth": 3, "width": 4} if arch == "unet" else {}
    model = build_model(ModelSpec(arch=arch, in_channels=3, out_channels=2, kwargs=kwargs)).eval()
    m = input_multiple(model)
    with torch.inference_mode():
        y = model(torch.rand(1, 3, 2 * m, 3 * m))
    assert y.shape == (1, 2, 2 * m, 3 * m)
    # logits, not probabilities: the last layer is linear, so its bias shifts outputs 1:1
    head = model.head if arch == "unet" else model.fuse
    with torch.inference_mode():
        head.bias += 10.0
        assert torch.allclose(model(torch.zeros(1, 3, m, m)) - 10.0,
                              (head.bias.add_(-10.0), model(torch.zeros(1, 3, m, m)))[1],
                              atol=1e-4)


def test_u2net_side_outputs_for_deep_supervision():
    model = build_model(ModelSpec(arch="u2netp", out_channels=1)).eval()
    with torch.inference_mode():
        outs = model.forward_all(torch.rand(1, 3, 64, 96))
    assert len(outs) == 7
    assert all(o.shape == (1, 1, 64, 96) for o in outs)
    assert torch.equal(outs[0], model(torch.rand(1, 3, 64, 96)) * 0 + outs[0])


def test_recurrent_variant_really_recurs():
    from segcore.models.blocks import RecurrentConv

    rec = build_model(ModelSpec(arch="u2netp-rec"))
    units = [m for m in rec.modules() if isinstance(m, RecurrentConv)]
    assert units and all(u.t == 2 for u in units)
    plain = build_model(ModelSpec(arch="u2netp"))
    assert not [m for m in plain.modules() if isinstance(m, RecurrentConv)]
    t3 = build_model(ModelSpec(arch="u2netp-rec", kwargs={"t": 3}))
    assert {u.t for u in t3.modules() if isinstance(u, RecurrentConv)} == {3}


def test_unknown_arch_lists_known_names_and_closest():
    with pytest.raises(UnknownModelError) as e:
        build_model(ModelSpec(arch="u2nett"))
    msg = str(e.value)
    for name in ("unet", "u2net", "u2netp", "u2netp-rec"):
        assert name in msg
    assert "Did you mean 'u2net'" in msg
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)


def test_unknown_kwarg_refused_with_the_allowed_ones():
    with pytest.raises(ConfigError, match="does not take depthh.*depth"):
        build_model(ModelSpec(arch="unet", kwargs={"depthh": 3}))


def test_spec_is_frozen_and_forbids_extra():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        ModelSpec(arch="unet", colour="red")
    spec = ModelSpec(arch="unet")
    with pytest.raises(ValidationError):
        spec.arch = "u2net"


def _brute_force_field(model, width=160, phases=8):
    """Independent of gradients: perturb each input column, see which outputs move."""
    model = model.double().eval()
    torch.manual_seed(1)
    x = torch.rand(1, model.spec.in_channels, 8, width, dtype=torch.float64)
    with torch.inference_mode():
        base = model(x)[0, :, 4]
        left = right = 0
        c0 = width // 2
        for j in range(width):
            xp = x.clone()
            xp[..., j] += 1.0
            changed = (model(xp)[0, :, 4] - base).abs().amax(dim=0) > 0
            for c in range(c0, c0 + phases):
                if changed[c]:
                    left, right = max(left, c - j), max(right, j - c)
    return left, right


@pytest.mark.parametrize("depth", [1, 2])
def test_receptive_field_matches_independent_computation(depth):
    """The gradient probe (on a one-channel avg-pool twin) against brute-force perturbation of
    the real max-pool model, one input column at a time. Positive weights keep every unit alive
    so the brute force sees every dependency (random weights leave dead ReLUs)."""
    from segcore.models.fields import _positive_copy

    spec = ModelSpec(arch="unet", in_channels=1, out_channels=1,
                     kwargs={"depth": depth, "width": 3, "norm": "none"})
    model = build_model(spec)
    field = measure_receptive_field(model, 1)
    brute = _positive_copy(model)
    brute.spec = spec
    assert (field.left, field.right) == _brute_force_field(brute)
    assert field.radius > 4 * 2**depth  # more than the bottleneck convs alone


def test_group_norm_has_no_finite_field():
    model = build_model(ModelSpec(arch="unet", kwargs={"depth": 2, "width": 4, "norm": "group"}))
    assert measure_receptive_field(model, 3).is_global
