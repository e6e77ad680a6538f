"""Which Parquet writer can keep up with corrupt's stream: the same 16k-row batches, read with pyarrow as corrupt
reads them, written (1) through a pyarrow ParquetWriter on a background thread (corrupt's writer until
2026-12-07) or (2) by polars' streaming ``sink_parquet`` fed from a Python IO source
(``polars.io.plugins.register_io_source``), which encodes on every core (every Parquet output's writer since:
``prefnoise/data/write.py``). No flips, no checks: the write path alone, each variant in its own process.

    .venv/bin/python bench/parquet_writers.py --source /tmp/bench-corrupt/pairs-2000000.parquet --rounds 2

(the source: bench/corrupt.py's generated file, kept with ``--data``).
"""

from __future__ import annotations

import argparse
import queue
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BATCH = 16_384


def run(variant: str, source: str, out: str) -> None:
    """Copy ``source`` to ``out`` through ``variant``'s writer; print wall and CPU seconds."""
    import polars as pl
    import pyarrow.parquet as pq

    start = time.perf_counter()
    reader = pq.ParquetFile(source, pre_buffer=False)

    def frames():
        for batch in reader.iter_batches(batch_size=BATCH):
            yield pl.from_arrow(batch)

    if variant == "polars-sink":
        from polars.io.plugins import register_io_source

        schema = pl.from_arrow(reader.schema_arrow.empty_table()).schema
        register_io_source(lambda *_: frames(), schema=schema).sink_parquet(
            out, compression="zstd", compression_level=1, row_group_size=BATCH)
    else:
        pending: queue.Queue = queue.Queue(4)

        def write() -> None:
            writer = None
            while (table := pending.get()) is not None:
                writer = writer or pq.ParquetWriter(out, table.schema, compression="zstd")
                writer.write_table(table)
            writer.close()

        thread = threading.Thread(target=write)
        thread.start()
        for frame in frames():
            pending.put(frame.to_arrow())
        pending.put(None)
        thread.join()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"{variant:18s} {time.perf_counter() - start:6.2f} s wall {usage.ru_utime + usage.ru_stime:6.2f} s CPU",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run(args.run, args.source, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for variant in ("pyarrow-thread", "polars-sink"):
                subprocess.run([sys.executable, __file__, "--run", variant, "--source", args.source,
                                "--out", str(Path(tmp) / f"{variant}.parquet")], check=True)
    print(subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
