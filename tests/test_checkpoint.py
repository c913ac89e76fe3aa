import pytest
import torch

from segcore.config import InputContract, ModelSpec, Normalization
from segcore.errors import CheckpointError, InputError
from segcore.models import build_model
from segcore.models.checkpoint import load_checkpoint, save_checkpoint


def _model():
    torch.manual_seed(0)
    return build_model(ModelSpec(arch="unet", in_channels=1, out_channels=1,
                                 kwargs={"depth": 2, "width": 4})).eval()


CONTRACT = InputContract(channels=1, normalization=Normalization(mean=(0.5,), std=(0.25,)),
                         class_names=("interior", "membrane"), pixel_size=0.004,
                         pixel_unit="micrometer")


def test_round_trip_is_bit_identical(tmp_path):
    model = _model()
    uri = str(tmp_path / "m.safetensors")
    save_checkpoint(model, uri, CONTRACT, extra={"steps": 3})
    loaded, ckpt = load_checkpoint(uri)
    x = torch.rand(2, 1, 64, 48)
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    assert ckpt.contract == CONTRACT
    assert ckpt.spec == model.spec
    assert ckpt.extra == {"steps": 3}


def test_flipped_weight_byte_is_refused(tmp_path):
    uri = tmp_path / "m.safetensors"
    save_checkpoint(_model(), str(uri), CONTRACT)
    data = bytearray(uri.read_bytes())
    data[-10] ^= 0xFF
    uri.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="digest"):
        load_checkpoint(str(uri))


def test_spec_swapped_for_another_arch_is_refused(tmp_path):
    uri = tmp_path / "m.safetensors"
    save_checkpoint(_model(), str(uri), CONTRACT)
    data = uri.read_bytes()
    # same-length edit of the header: the weights no longer match the spec
    data = data.replace(b'\\"depth\\":2', b'\\"depth\\":3')
    uri.write_bytes(data)
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(str(uri))


@pytest.mark.parametrize("content", [b"", b"hello world, not a model", b"\x00" * 64])
def test_foreign_files_are_refused(tmp_path, content):
    uri = tmp_path / "x.safetensors"
    uri.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a segcore checkpoint"):
        load_checkpoint(str(uri))


def test_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    uri = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, uri)
    with pytest.raises(CheckpointError):
        load_checkpoint(str(uri))
    assert not marker.exists()


def test_missing_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_checkpoint(str(tmp_path / "nope.safetensors"))
