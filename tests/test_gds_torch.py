"""gpuwire.gds.TorchLoader: clear ImportError without torch; tensors on the host path."""
import sys

import numpy as np
import pytest

from gpuwire.gds import DataLoader, HostReader, NpyDataset


@pytest.fixture
def ds(tmp_path):
    data = np.arange(50 * 3, dtype=np.float32).reshape(50, 3)
    np.save(tmp_path / "d.npy", data)
    return NpyDataset(str(tmp_path / "d.npy")), data


def test_missing_torch_gives_a_clear_error(ds, monkeypatch):
    from gpuwire.gds.torch import TorchLoader

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(ImportError, match="needs PyTorch.*pip install torch"):
        TorchLoader(DataLoader(ds[0], 8, reader=HostReader()))


def test_lazy_attribute_on_the_package():
    import gpuwire.gds as g
    from gpuwire.gds.torch import TorchLoader

    assert g.TorchLoader is TorchLoader
    with pytest.raises(AttributeError):
        g.NoSuchThing


def test_host_tensors(ds):
    torch = pytest.importorskip("torch", reason="torch is not installed here")
    from gpuwire.gds import TorchLoader

    d, data = ds
    tl = TorchLoader(DataLoader(d, 8, seed=3, reader=HostReader()))
    assert len(tl) == 7 and tl.batch_size == 8
    tl.set_epoch(2)
    order = tl.loader.epoch_order(2)
    out = [t.clone() for t in tl]
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in out)
    assert np.array_equal(torch.cat(out).numpy(), data[order])
