"""Packed boundaries once per batch (lsp.ops.boundaries): the loader records their host list with the device copy,
and no layer reads cu_seqlens back to the host, with or without SP; a tensor nobody recorded is read once per batch,
not once per layer. Host reads are counted on the tensor itself (a tensor subclass that sees every call)."""
import pytest
import torch

from lsp.models import HybridConfig, HybridLM
from lsp.ops.boundaries import boundaries, device_boundaries, remember
from lsp.parallel import SPContext

HOST_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__index__,
              torch.Tensor.__int__, torch.Tensor.__iter__}
BOUNDS = [0, 10, 50, 96]


class CountingTensor(torch.Tensor):
    """Counts the calls that copy its values (or those of any tensor derived from it) to the host."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            CountingTensor.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def _step_reads(kind, cu, sp=None, layers=8):
    # host reads of cu in one forward + backward of an 8-layer hybrid (6 linear, 2 softmax layers)
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(vocab_size=64, hidden_size=32, num_layers=layers, num_heads=2, num_kv_heads=2,
                                  layer_pattern="LLLS", linear_attn=kind))
    ids = torch.randint(0, 64, (1, BOUNDS[-1]), generator=torch.Generator().manual_seed(0))
    if sp is not None:
        ids = sp.shard(ids, 1)
    CountingTensor.reads = 0
    model(ids, labels=ids, sp=sp, cu_seqlens=cu).loss.backward()
    return CountingTensor.reads


def _counting():
    return torch.tensor(BOUNDS, dtype=torch.int32).as_subclass(CountingTensor)


@pytest.mark.parametrize("kind", ["gla", "gated_deltanet"])
def test_recorded_boundaries_are_never_read_back(kind):
    """Recorded by the loader: 0 host reads in the whole step, so 0 per layer, without SP and with SP."""
    assert _step_reads(kind, remember(_counting(), BOUNDS)) == 0
    assert _step_reads(kind, remember(_counting(), BOUNDS), SPContext(emulate=2, layout="zigzag")) == 0


@pytest.mark.parametrize("kind", ["gla", "gated_deltanet"])
def test_unrecorded_boundaries_are_read_once_per_batch(kind):
    """The control: the counter sees reads (it would catch a layer that reads), and a tensor nobody recorded is
    read once for the whole step (one cache of derived plans), where each layer used to read it (9 per step)."""
    assert _step_reads(kind, _counting()) == 1
    assert _step_reads(kind, _counting(), layers=4) == 1


def test_in_place_write_rebuilds_and_the_loader_records():
    cu = remember(_counting(), BOUNDS)
    first = boundaries(cu)
    assert boundaries(cu) is first and first.host == BOUNDS
    cu[1] = 20          # written in place: the recorded list no longer describes it, so it is read again
    CountingTensor.reads = 0
    assert boundaries(cu).host == [0, 20, 50, 96] and CountingTensor.reads == 1
    dev = device_boundaries(torch.tensor(BOUNDS, dtype=torch.int32), "cpu")   # the trainer's step (to_local)
    assert dev.dtype == torch.int32 and boundaries(dev).host == BOUNDS
