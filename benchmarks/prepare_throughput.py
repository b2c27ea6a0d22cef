"""prepare_throughput: Ray Data prepare rows/s ÷ a plain single-process pyarrow loop.

Raw inputs are generated into a temporary folder: random PNGs in ImageNet class folders
(decoded, resized and centre-cropped) and random sentence pairs in WMT files (tokenised with a
small vocabulary trained once). Both sides run the same reader, the same per-row function
(`pipelines.rows.convert_batch`) and the same part writer (`pipelines.sink.write_parts`):

    ray    items -> pipelines.sink.run_split (Ray Data map_batches + ShardSink) on `--cpus` CPUs
    plain  items -> convert_batch over slices -> write_parts, in this one process

Ray start-up is treated apart: `ratio` compares runs on a started Ray whose workers have run
once (as on a cluster that is up); `ratio_cold` charges the Ray side with `ray.init` and its
first run, which starts the worker processes. Both are printed, with the seconds behind them.

    python -m benchmarks.prepare_throughput [--images 20000] [--pairs 50000] [--cpus 2]
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from benchmarks.common import compare, emit, seconds
from mm.config import CorpusConfig
from mm.vocab import Vocabulary, train_vocabulary
from pipelines.prepare import items_table
from pipelines.readers import Reader, reader_for
from pipelines.rows import RowContext, convert_batch
from pipelines.sink import item_blocks, run_split, write_parts

SHARD_ROWS = 20000
WORDS = [
    f"{a}{b}" for a in ("ka", "lo", "mi", "nu", "pe", "ro", "su", "ti") for b in ("n", "s", "t", "ra", "lo")
]


def make_images(root: Path, count: int, classes: int = 10, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / "train" / f"class_{c:02d}").mkdir(parents=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(
            root / "train" / f"class_{i % classes:02d}" / f"{i:06d}.png", compress_level=1
        )


def make_pairs(root: Path, count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    root.mkdir(parents=True)
    sentences = [[" ".join(rng.choices(WORDS, k=rng.randint(5, 20))) for _ in range(count)] for _ in range(2)]
    for lang, lines in zip(("en", "de"), sentences):
        (root / f"train.{lang}").write_text("\n".join(lines) + "\n")
    return sentences[0][:2000] + sentences[1][:2000]


def plain_loop(items: pa.Table, reader: Reader, context: RowContext, out: Path) -> int:
    """The same per-row work and part writing in one process, no Ray."""
    converted = [
        convert_batch(block, reader, context)
        for block in item_blocks(items, reader.block_rows(context), cpus=1)
    ]
    report = write_parts(pa.concat_tables(converted), out, SHARD_ROWS)
    return sum(part.rows for part in report.parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--pairs", type=int, default=50000)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="prepare_throughput-"))
    try:
        make_images(work / "images", args.images)
        vocab = train_vocabulary(make_pairs(work / "text", args.pairs), 1000, ["<2x>"])
        jobs: list[tuple[pa.Table, Reader, RowContext]] = []
        enumerate_s = seconds(lambda: jobs.extend(build_jobs(work, vocab, args.image_size)))
        rows = sum(items.num_rows for items, _, _ in jobs)
        out = work / "out"

        def with_ray() -> None:
            for n, (items, reader, context) in enumerate(jobs):
                run_split(items, reader, context, out / f"ray-{n}", SHARD_ROWS)
            shutil.rmtree(out, ignore_errors=True)

        def plain() -> None:
            for n, (items, reader, context) in enumerate(jobs):
                plain_loop(items, reader, context, out / f"plain-{n}")
            shutil.rmtree(out, ignore_errors=True)

        import ray

        init_s = seconds(lambda: ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False))
        cold_s = seconds(with_ray)  # starts the worker processes
        ray_s, plain_s = compare(with_ray, plain, repeats=args.repeats, warmup=0)
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    emit(
        {
            "benchmark": "prepare_throughput",
            "ratio": round(plain_s / ray_s, 3),
            "ratio_cold": round(plain_s / (init_s + cold_s), 3),
            "rows": rows,
            "ray_rows_per_s": round(rows / ray_s, 1),
            "plain_rows_per_s": round(rows / plain_s, 1),
            "ray_s": round(ray_s, 2),
            "plain_s": round(plain_s, 2),
            "ray_init_s": round(init_s, 2),
            "ray_first_run_s": round(cold_s, 2),
            "enumerate_s": round(enumerate_s, 2),
            "cpus": args.cpus,
            "images": args.images,
            "pairs": args.pairs,
        }
    )


def build_jobs(work: Path, vocab: Vocabulary, image_size: int) -> list[tuple[pa.Table, Reader, RowContext]]:
    """Enumerated items, reader and row context of each corpus. Enumeration is left out of the
    timing: both sides would do it alike on the driver."""
    jobs = []
    corpora = [
        ("images", "image_classification", CorpusConfig(path=work / "images", layout="imagenet")),
        (
            "text",
            "translation",
            CorpusConfig(path=work / "text", layout="wmt", source_lang="en", target_lang="de"),
        ),
    ]
    for name, kind, corpus in corpora:
        reader = reader_for(corpus.layout)
        items = items_table(reader.items(corpus, "train"))
        context = RowContext(
            task=name,
            kind=kind,
            split="train",
            image_size=image_size,
            vocab_proto=vocab.proto,
        )
        jobs.append((items, reader, context))
    return jobs


if __name__ == "__main__":
    main()
