"""Output helpers shared by every ``lamina-net bench`` command.

* :func:`progress`: a tqdm bar for sweeps that take more than a few seconds,
  off when stdout is not a terminal (CI logs, pipes) or tqdm is missing.
* :func:`plot_records`: latency (and GB/s, where records carry it) against
  message size, log-log, one line per system, hardware and date in the title.
* :func:`compare_records` / ``lamina-net bench compare A.json B.json``: the
  ratio B/A of every metric of every record present in both runs, matched on
  system/transport/op/size/path, so a regression shows at a glance.
* ``lamina-net bench table RUN.json [--markdown]``: a saved run as a table
  (docs/bench/*.md are made this way by scripts/bench_docs.sh).

Nothing heavy at import: lamina_net/cli.py imports the bench modules for every
command line it parses; matplotlib and tqdm are imported when used.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Any, Iterable, Optional

from .errors import UsageError

# Metrics a record may carry, and whether a higher value is better. Nested
# dicts (exchange records: per_layer_us = {"p50": .., "p99": ..}) are
# flattened to "per_layer_us.p50".
# GB/s under the names the bench commands write (exchange: gb_per_s; bandwidth: gbps).
_BANDWIDTH_METRICS = ("gb_per_s", "bandwidth_gb_s", "gbps")
_HIGHER_IS_BETTER = _BANDWIDTH_METRICS + ("ops_per_s",)
_METRICS = ("p50_us", "p99_us", "per_layer_us.p50", "per_layer_us.p99", "per_step_us.p50", "per_step_us.p99",
            *_BANDWIDTH_METRICS, "ops_per_s")
_BASELINE_SYSTEMS = {"gloo": "torch-gloo", "nccl": "torch-nccl"}


# ---------------------------------------------------------------- progress

class _NoBar:
    """Stands in for a disabled bar, so callers need not test for one."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def progress(total: int, desc: str, enabled: Optional[bool] = None):
    """A progress bar over ``total`` steps (context manager with ``update()``).

    ``enabled=None``: on when stdout is a terminal. Disabled (or tqdm not
    installed: it is optional) it is a do-nothing object. The bar goes to
    stderr so that stdout keeps only the tables.
    """
    if enabled is None:
        enabled = sys.stdout.isatty() and not os.environ.get("LAMINA_NET_NO_PROGRESS")
    if not enabled or total <= 0:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


# ---------------------------------------------------------------- records

def system_of(record: dict) -> str:
    """The system a record measured: its ``system`` field, else inferred from older records."""
    if record.get("system"):
        return str(record["system"])
    return _BASELINE_SYSTEMS.get(record.get("transport", ""), "lamina-net")


def record_key(record: dict) -> tuple:
    """What identifies a measurement across runs: system, transport, op, size, path."""
    return (system_of(record), record.get("transport", "-"), record.get("op", record.get("bench", "-")),
            record.get("size_bytes", "-"), record.get("path", "host"))


def metric_value(record: dict, name: str) -> Optional[float]:
    value: Any = record
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def load_records(path: str) -> list[dict]:
    """The records of a saved ``--json`` run; a typed error names what is wrong with the file."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path} is not a JSON file: {e}") from None
    if isinstance(data, dict) and isinstance(data.get("records"), list):
        data = data["records"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise UsageError(f"{path}: expected a JSON list of benchmark records (a --json output)")
    return data


# ---------------------------------------------------------------- compare

def compare_records(a: list[dict], b: list[dict], threshold: float = 0.10) -> dict:
    """Ratios B/A per matched record and metric; ``regressions`` lists those worse by more than threshold."""
    if not threshold >= 0:
        raise UsageError(f"threshold must be >= 0, got {threshold!r}")
    index_a = {record_key(r): r for r in a}
    index_b = {record_key(r): r for r in b}
    rows, regressions = [], []
    for key, ra in index_a.items():
        rb = index_b.get(key)
        if rb is None:
            continue
        for metric in _METRICS:
            va, vb = metric_value(ra, metric), metric_value(rb, metric)
            if va is None or vb is None or va <= 0:
                continue
            ratio = vb / va
            higher_better = metric.split(".")[0] in _HIGHER_IS_BETTER
            worse = ratio < 1 - threshold if higher_better else ratio > 1 + threshold
            better = ratio > 1 + threshold if higher_better else ratio < 1 - threshold
            row = {"key": key, "metric": metric, "a": va, "b": vb, "ratio": ratio,
                   "verdict": "worse" if worse else "better" if better else ""}
            rows.append(row)
            if worse:
                regressions.append(row)
    return {"rows": rows, "regressions": regressions,
            "only_a": [k for k in index_a if k not in index_b], "only_b": [k for k in index_b if k not in index_a]}


def _key_text(key: tuple) -> str:
    system, transport, op, size, path = key
    return f"{system:<12} {transport:<6} {op:<8} {str(size):>9} {path:<6}"


def print_compare(result: dict, name_a: str, name_b: str, threshold: float, file=sys.stdout) -> None:
    header = f"{'system':<12} {'trans':<6} {'op':<8} {'size':>9} {'path':<6} {'metric':<16} " \
             f"{'A':>11} {'B':>11} {'B/A':>7}"
    print(f"A = {name_a}\nB = {name_b}", file=file)
    print(header, file=file)
    print("-" * len(header), file=file)
    for row in result["rows"]:
        mark = {"worse": "  << worse", "better": "  better"}.get(row["verdict"], "")
        print(f"{_key_text(row['key'])} {row['metric']:<16} {row['a']:11.4g} {row['b']:11.4g} "
              f"{row['ratio']:7.3f}{mark}", file=file)
    for label, keys in (("only in A", result["only_a"]), ("only in B", result["only_b"])):
        for key in keys:
            print(f"{label}: {_key_text(key).strip()}", file=file)
    n = len(result["regressions"])
    print(f"B/A: times (us) above {1 + threshold:.2f} and rates below {1 - threshold:.2f} are marked worse; "
          f"{n} regression{'s' if n != 1 else ''} among {len(result['rows'])} compared values", file=file)


# ---------------------------------------------------------------- tables of saved runs

def _table_columns(records: list[dict]) -> list[tuple[str, str]]:
    columns = [("system", "system"), ("transport", "transport"), ("op", "op"), ("size", "size_bytes"),
               ("path", "path")]
    for title, metric in (("p50 us", "p50_us"), ("p99 us", "p99_us"), ("layer p50 us", "per_layer_us.p50"),
                          ("layer p99 us", "per_layer_us.p99"), ("step p50 us", "per_step_us.p50"),
                          ("step p99 us", "per_step_us.p99"), *(("GB/s", m) for m in _BANDWIDTH_METRICS),
                          ("C ref p50", "ref_p50_us"), ("blocking ref p50", "blocking_ref_p50_us"),
                          ("memcpy us", "memcpy_us")):
        if any(metric_value(r, metric) is not None for r in records):
            columns.append((title, metric))
    ratios = sorted({k for r in records for k in r if k.startswith("ratio_vs_")})
    columns += [("vs " + k[len("ratio_vs_"):], k) for k in ratios]
    return columns


def _cell(record: dict, key: str) -> str:
    if key == "system":
        return system_of(record)
    if key == "path":
        return str(record.get("path", "host"))
    value = metric_value(record, key) if key not in ("transport", "op", "size_bytes") else record.get(key)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if key.startswith("ratio_vs_") else f"{value:.2f}"
    return str(value)


def format_table(records: list[dict], markdown: bool = False) -> str:
    columns = _table_columns(records)
    rows = [[_cell(r, key) for _, key in columns] for r in records]
    titles = [title for title, _ in columns]
    if markdown:
        lines = ["| " + " | ".join(titles) + " |",
                 "|" + "|".join("---" if i < 5 else "---:" for i in range(len(titles))) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines) + "\n"
    widths = [max(len(t), *(len(row[i]) for row in rows)) if rows else len(t) for i, t in enumerate(titles)]
    lines = ["  ".join(t.rjust(w) if i >= 3 else t.ljust(w) for i, (t, w) in enumerate(zip(titles, widths)))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
              for row in rows]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plot

def hardware_description() -> str:
    """One line: CPU model, cores, GPU (when torch sees one); used in plot titles and docs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    if "torch" in sys.modules:  # never import torch just for a title
        torch = sys.modules["torch"]
        try:
            if torch.cuda.is_available():
                text += f", {torch.cuda.get_device_name(0)}"
        except Exception:  # a broken CUDA setup must not stop the plot
            pass
    return text


def _series_label(record: dict) -> str:
    system = system_of(record)
    transport = record.get("transport", "")
    label = system if transport in ("gloo", "nccl") else f"{system} {transport}".strip()
    op = record.get("op")
    if op and op not in ("send", "exchange") or (op == "send" and system == "lamina-net"):
        label += f" {op}"
    if record.get("path") == "device":
        label += " (device)"
    return label


def plot_records(records: list[dict], path: str, what: str, x_label: str = "message size (bytes)",
                 hardware: Optional[str] = None, date: Optional[str] = None) -> None:
    """Writes a PNG: p50 latency vs size (log-log), and GB/s vs size when records carry it.

    Exchange records are plotted per layer (``per_layer_us.p50`` against the
    bytes that cross per layer). One line per system (and transport, op, path).
    """
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib (pip install 'lamina-net[plot]')") from None
    latency: dict[str, list[tuple[float, float]]] = {}
    bandwidth: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        size = r.get("size_bytes")
        if not isinstance(size, (int, float)) or size <= 0:
            continue
        label = _series_label(r)
        lat = metric_value(r, "per_layer_us.p50")
        lat = metric_value(r, "p50_us") if lat is None else lat
        if lat is not None and lat > 0:
            latency.setdefault(label, []).append((size, lat))
        # The plain C reference measured beside it in the same run (bench latency) is a system of its own.
        ref = metric_value(r, "ref_p50_us")
        if ref is not None and ref > 0 and r.get("path", "host") == "host":
            latency.setdefault(f"plain C {r.get('transport', '')} ping-pong", []).append((size, ref))
        bw = next((v for v in (metric_value(r, m) for m in _BANDWIDTH_METRICS) if v is not None), None)
        if bw is not None and bw > 0:
            bandwidth.setdefault(label, []).append((size, bw))
    if not latency and not bandwidth:
        raise UsageError("--plot: no record has a size and a latency or bandwidth to plot")
    panels = [p for p in (("latency", latency), ("bandwidth", bandwidth)) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (kind, series) in zip(axes[0], panels):
        for label, points in sorted(series.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(x_label)
        ax.set_ylabel("p50 latency (us)" if kind == "latency" else "bandwidth (GB/s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    date = date or datetime.date.today().isoformat()
    fig.suptitle(f"lamina-net bench {what}: {hardware or hardware_description()}, {date}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- CLI: compare, table

def add_arguments(sub) -> None:
    """Registers ``compare`` and ``table`` on the ``lamina-net bench`` subparsers."""
    cmp = sub.add_parser("compare", help="ratios B/A between two saved --json runs, record by record")
    cmp.add_argument("a", metavar="A.json", help="the reference run")
    cmp.add_argument("b", metavar="B.json", help="the run compared with it")
    cmp.add_argument("--threshold", type=float, default=0.10,
                     help="a time more than this fraction above A (a rate below) is marked worse (default 0.10)")
    cmp.add_argument("--fail-on-regression", action="store_true", help="exit with status 1 when any value is worse")
    table = sub.add_parser("table", help="print a saved --json run as a table")
    table.add_argument("run", metavar="RUN.json")
    table.add_argument("--markdown", action="store_true", help="a Markdown table (for docs/bench/*.md)")
    table.add_argument("--plot", metavar="PATH.png", help="also plot it")
    table.add_argument("--date", help="the date the run was measured, for the plot's title (default today)")
    table.add_argument("--hardware", help="what it ran on, for the plot's title (default this machine)")


def run_compare(args: argparse.Namespace) -> int:
    try:
        result = compare_records(load_records(args.a), load_records(args.b), args.threshold)
    except UsageError as e:
        raise SystemExit(f"lamina-net bench compare: {e}")
    if not result["rows"]:
        print_compare(result, args.a, args.b, args.threshold)
        raise SystemExit("lamina-net bench compare: no record of A matches one of B "
                         "(matched on system/transport/op/size/path)")
    print_compare(result, args.a, args.b, args.threshold)
    return 1 if args.fail_on_regression and result["regressions"] else 0


def run_table(args: argparse.Namespace) -> int:
    try:
        records = load_records(args.run)
        sys.stdout.write(format_table(records, args.markdown))
        if args.plot:
            plot_records(records, args.plot, Path(args.run).stem, hardware=args.hardware, date=args.date)
    except UsageError as e:
        raise SystemExit(f"lamina-net bench table: {e}")
    return 0


def emit(records: list[dict], args: argparse.Namespace, what: str, x_label: str = "message size (bytes)") -> None:
    """The ``--json`` and ``--plot`` outputs of a bench command (either may be absent from args)."""
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(records, indent=2))
    if getattr(args, "plot", None):
        try:
            plot_records(records, args.plot, what, x_label)
        except UsageError as e:
            raise SystemExit(f"lamina-net bench {what}: {e}")


def iter_with_progress(items: Iterable, total: int, desc: str):
    """Yields items while advancing a progress bar (see :func:`progress`)."""
    with progress(total, desc) as bar:
        for item in items:
            yield item
            bar.update()
