"""Ranks started by torchrun, and the "auto" transport choice."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lamina_net as ln
from conftest import assert_all_ok, free_port, run_ranks

TORCHRUN_SCRIPT = textwrap.dedent("""
    import numpy as np, lamina_net as ln
    with ln.Endpoint(group="torchrun", timeout=30) as ep:   # RANK, WORLD_SIZE, MASTER_ADDR/PORT from torchrun
        peer = 1 - ep.rank
        out = np.zeros(2, np.int64)
        ch = ep.channel(peer)
        ch.send(np.array([ep.rank, ep.world_size], np.int64))
        ch.recv(out)
        assert out.tolist() == [peer, 2], out
        print(f"rank {ep.rank} ok over {ch.transport}", flush=True)
""")


def test_torchrun_ranks_find_each_other(tmp_path):
    pytest.importorskip("torch")
    script = tmp_path / "ranks.py"
    script.write_text(TORCHRUN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script)],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 0 ok over shm" in proc.stdout and "rank 1 ok over shm" in proc.stdout


def _auto(rank, world, store):
    with ln.Endpoint(rank, world, store, group="auto", timeout=20) as ep:
        choice = ep.choose_transport(1 - rank)
        ch = ep.channel(1 - rank, "auto")
        used = ch.transport
        ch.send(np.zeros(1))
        ch.recv(np.zeros(1))
    with ln.Endpoint(rank, world, store.rsplit(":", 1)[0] + ":" + str(int(store.rsplit(":", 1)[1]) + 1),
                     group="auto-tcp", timeout=20, transports=("tcp",)) as ep:
        tcp_only = ep.channel(1 - rank, "auto").transport
    return choice, used, tcp_only


def test_auto_picks_shm_on_one_host_and_tcp_without_it():
    out = assert_all_ok(run_ranks(_auto))
    for choice, used, tcp_only in out.values():
        assert choice[0] == "shm" and "same host" in choice[1]
        assert used == "shm"
        assert tcp_only == "tcp"
