"""Tier 2 (one GPU): GPU memory over the byte-stream transports. Skipped, with the reason, elsewhere."""
import pytest

from conftest import assert_all_ok, run_ranks
import _workers

torch = pytest.importorskip("torch")
from lamina_net import _core  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not _core.HAVE_CUDA, reason="lamina-net built without CUDA"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (or a CPU build of torch)"),
]


@pytest.mark.parametrize("nbytes", [1, 4096, 3 << 20])
def test_gpu_to_gpu_put_with_host_signal(transport, nbytes):
    out = assert_all_ok(run_ranks(_workers.cuda_put, args=(transport, nbytes)))
    assert out == {0: True, 1: True}
