"""The README's Python example runs as written (two local processes)."""
import re
from pathlib import Path

from conftest import assert_all_ok, run_ranks

README = Path(__file__).resolve().parent.parent / "README.md"


def _example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    return blocks[0]


def _run_example(rank, world, store, code):
    code = code.replace('"127.0.0.1:29555"', repr(store))
    scope = {"rank": rank}
    exec(compile(code, "README.md", "exec"), scope)
    if rank == 1:
        return scope["q"].shape, int(scope["msg"][0])
    return None


def test_readme_example_runs():
    out = assert_all_ok(run_ranks(_run_example, args=(_example(),)))
    assert out[1] == ((64, 128), 42)
