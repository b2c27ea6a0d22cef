"""The corpus readers on tiny corpora in every layout, through the real Ray Data pipeline: rows,
bad rows, manifests, the shared vocabulary, and shards that train the model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from mm.batch import EOS, FIRST_COMMAND_ID
from mm.config import ModelConfig
from mm.model import MultiModel
from mm.shards import VOCAB, bytes_to_array, collate, load_manifest, part_files
from mm.tasks import TaskSpec
from mm.vocab import Vocabulary
from pipelines.prepare import prepare
from pipelines.readers.imagenet import ImageNetReader

from corpora import (
    LINEARISED,
    SENTENCES,
    WORDS,
    make_config,
    task_entry,
    write_coco,
    write_imagenet,
    write_librispeech,
    write_ptb,
    write_speech_manifest,
    write_tsv,
    write_wmt,
)

WRITERS = {
    "imagenet": (write_imagenet, "imagenet", {}),
    "wmt": (write_wmt, "wmt", {}),
    "tsv": (write_tsv, "tsv", {"splits": ("train",)}),
    "coco": (write_coco, "coco", {"image_size": 32}),
    "librispeech": (write_librispeech, "librispeech", {}),
    "speech_csv": (write_speech_manifest, "speech_manifest", {}),
    "ptb": (write_ptb, "ptb", {}),
}


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    """Every layout, with bad rows of every kind, prepared once."""
    root = tmp_path_factory.mktemp("pipelines")
    tasks = []
    for name, (write, layout, options) in WRITERS.items():
        write(root / "raw" / name, bad=True)
        tasks.append(task_entry(name, layout, root / "raw" / name, **options))
    config = make_config(root / "shards", tasks, max_rejected_fraction=0.6)
    log: list[str] = []
    manifests = prepare(config, log=log.append)
    return config, manifests, log


def read_split(config, task: str, split: str) -> dict[str, list]:
    files = part_files(config.data.shards, task, split)
    return pa.concat_tables([pq.read_table(path) for path in files]).to_pydict()


def vocabulary(config) -> Vocabulary:
    return Vocabulary.load(config.data.shards / VOCAB)


# ---------------------------------------------------------------------------------------- readers


def test_imagenet_folders(prepared):
    config, manifests, _ = prepared
    manifest = manifests["imagenet"]
    assert manifest.class_names == ["n02_dog", "n01_cat"]  # the order of classes.txt
    assert manifest.num_classes == 2
    assert (manifest.rows("train"), manifest.rows("dev")) == (6, 2)
    assert manifest.splits["train"].rejected == {"undecodable_image": 1}
    rows = read_split(config, "imagenet", "train")
    for data, shape, label, reference in zip(
        rows["inputs"], rows["input_shape"], rows["targets"], rows["reference"]
    ):
        assert shape == [28, 28, 3]  # grey PNGs are stored as RGB too
        assert bytes_to_array(data, shape, np.uint8).shape == (28, 28, 3)
        assert manifest.class_names[label] == reference
    assert sorted(rows["targets"]) == [0, 0, 0, 1, 1, 1]


def test_imagenet_labels_without_class_list_are_sorted_folders(tmp_path):
    write_imagenet(tmp_path / "raw", class_list=False)
    corpus = make_config(tmp_path, [task_entry("i", "imagenet", tmp_path / "raw")]).tasks[0].corpus
    assert ImageNetReader().class_names(corpus) == ["n01_cat", "n02_dog"]


def test_wmt_parallel_text(prepared):
    config, manifests, _ = prepared
    stats = manifests["wmt"].splits["train"]
    assert stats.rows == 4
    assert stats.rejected == {"not_utf8": 1, "unmatched_line": 1}
    assert stats.filtered == {"input_too_long": 1}
    rows = read_split(config, "wmt", "train")
    vocab = vocabulary(config)
    kept = [0, 1, 3, 5]  # line 3 is not UTF-8, line 5 too long
    # training rows are shuffled at prepare time: compare the pairs, not their order
    pairs = list(zip([vocab.decode(ids) for ids in rows["inputs"]], rows["reference"]))
    assert sorted(pairs) == sorted(SENTENCES[i] for i in kept)
    assert all(ids[-1] == EOS for ids in rows["inputs"] + rows["targets"])
    assert manifests["wmt"].rows("dev") == 2  # plain text next to gzip


def test_tsv_pairs(prepared):
    _, manifests, _ = prepared
    stats = manifests["tsv"].splits["train"]
    assert (stats.rows, stats.rejected) == (6, {"malformed_line": 1})


def test_coco_captions(prepared):
    config, manifests, _ = prepared
    manifest = manifests["coco"]
    assert manifest.splits["train"].rejected == {"missing_image": 1}
    train = read_split(config, "coco", "train")
    assert len(train["id"]) == 6  # one row per caption
    assert train["input_shape"][0] == [32, 32, 3]  # the task's own image size
    dev = read_split(config, "coco", "dev")
    assert len(dev["id"]) == 3  # one row per image, every caption a reference
    for reference, references in zip(dev["reference"], dev["references"]):
        assert len(references) == 2 and reference == references[0]
    assert "an image with 0 things" in dev["references"][0]  # whitespace normalised


def test_librispeech_flac(prepared):
    config, manifests, _ = prepared
    stats = manifests["librispeech"].splits["train"]
    assert stats.rows == 4
    assert stats.rejected == {"empty_audio": 1, "unreadable_audio": 1}
    rows = read_split(config, "librispeech", "train")
    assert sorted(rows["reference"]) == sorted(SENTENCES[i][0] for i in range(4))  # lower-cased
    for data, shape in zip(rows["inputs"], rows["input_shape"]):
        # 0.3 s at 16 kHz, 10 ms hop; the 8 kHz stereo files are mixed down and resampled
        assert shape == [31, 80]
        assert np.isfinite(bytes_to_array(data, shape, np.float16)).all()
    assert manifests["librispeech"].features["sample_rate"] == 16000


def test_speech_manifest_csv_and_jsonl(prepared):
    config, manifests, _ = prepared
    manifest = manifests["speech_csv"]
    assert manifest.splits["train"].rejected == {"empty_audio": 1, "missing_audio": 1, "not_utf8": 1}
    assert sorted(read_split(config, "speech_csv", "train")["reference"]) == [
        "good morning",
        "hello world",
        "third one",
    ]
    assert manifest.rows("dev") == 2


def test_ptb_trees(prepared):
    config, manifests, _ = prepared
    manifest = manifests["ptb"]
    assert manifest.splits["train"].rejected == {"unbalanced_brackets": 1}
    rows = read_split(config, "ptb", "train")
    vocab = vocabulary(config)
    # the trees after the unbalanced one survive, each row's words matching its tree
    decoded = zip(
        rows["reference"],
        [vocab.decode(ids) for ids in rows["inputs"]],
        [vocab.decode(ids) for ids in rows["targets"]],
    )
    assert sorted(decoded) == sorted(zip(LINEARISED, WORDS, LINEARISED))
    assert manifest.rows("dev") == 3  # a folder of .mrg files


def test_empty_captions_and_transcripts_are_rejected_and_bad_bytes_name_their_file(ray_local, tmp_path):
    """An empty COCO caption and an empty transcript are counted rejections with their own
    reasons; a Latin-1 line in the target file of a WMT pair is named by that file and line."""
    coco = tmp_path / "raw" / "coco"
    write_coco(coco)
    annotations = coco / "annotations" / "captions_train.json"
    data = json.loads(annotations.read_text())
    data["annotations"].append({"id": 500, "image_id": 1, "caption": "  "})  # image 1 keeps two captions
    shutil.copy(coco / "train" / "0000.png", coco / "train" / "0003.png")
    data["images"].append({"id": 4, "file_name": "0003.png"})
    data["annotations"].append({"id": 501, "image_id": 4, "caption": ""})  # its only caption
    annotations.write_text(json.dumps(data))

    wmt = tmp_path / "raw" / "wmt"
    wmt.mkdir()
    (wmt / "latin1.en").write_text("".join(f"{s}\n" for s, _ in SENTENCES))
    targets = [t.encode() for _, t in SENTENCES]
    targets[1] = "schöne grüße".encode("latin-1")
    (wmt / "latin1.de").write_bytes(b"".join(t + b"\n" for t in targets))

    speech = tmp_path / "raw" / "speech"
    write_speech_manifest(speech)
    with (speech / "train.csv").open("a") as csv:
        csv.write("clips/2.wav,\nclips/3.wav,   \n")  # nothing said

    latin1 = task_entry("wmt", "wmt", wmt)
    latin1["corpus"]["splits"] = {"train": "latin1"}
    tasks = [
        task_entry("coco", "coco", coco, image_size=32),
        latin1,
        task_entry("speech", "speech_manifest", speech),
    ]
    config = make_config(tmp_path / "shards", tasks, max_rejected_fraction=0.6)
    log: list[str] = []
    manifests = prepare(config, log=log.append)

    coco_train = manifests["coco"].splits["train"]
    assert (coco_train.rows, coco_train.rejected, coco_train.filtered) == (6, {"empty_caption": 2}, {})
    assert (
        "coco/train: rejected (empty_caption) captions_train.json: annotation 500 of image 1 (0000.png)"
        in log
    )

    assert manifests["wmt"].splits["train"].rejected == {"not_utf8": 1}
    assert any(line.startswith("wmt/train: rejected (not_utf8) latin1.de:2: target:") for line in log)

    speech_train = manifests["speech"].splits["train"]
    assert (speech_train.rows, speech_train.rejected, speech_train.filtered) == (
        2,
        {"empty_transcript": 2},
        {},
    )
    assert "speech/train: rejected (empty_transcript) train.csv:4: the transcript is empty" in log
    assert not [line for line in log if line.startswith("speech/") and "max_input_length" in line]


# ----------------------------------------------------------------------------- manifests, vocabulary


def test_first_bad_rows_are_logged_with_their_place(prepared):
    _, _, log = prepared
    assert any("rejected (not_utf8) train.en.gz:3" in line for line in log)
    assert any("rejected (unmatched_line) train.de.gz:7" in line for line in log)
    assert any("rejected (unbalanced_brackets) train.mrg:8" in line for line in log)
    # 1 of 7 WMT rows is over max_input_length: the hint names the limits
    assert any(
        line.startswith("wmt/train: 1 of 7 rows filtered") and "max_input_length" in line for line in log
    )


def test_manifest_describes_the_parts(prepared):
    config, manifests, _ = prepared
    for name, manifest in manifests.items():
        assert load_manifest(config.data.shards, name) == manifest
        assert manifest.layout == config.task(name).corpus.layout
        assert len(manifest.source_fingerprint) == 64
        for split, stats in manifest.splits.items():
            files = part_files(config.data.shards, name, split)
            assert stats.parts == len(files)
            assert all(pq.read_metadata(path).num_rows <= config.data.shard_rows for path in files)
            assert stats.bytes == sum(path.stat().st_size for path in files)
            assert sum(pq.read_metadata(path).num_rows for path in files) == stats.rows
            assert stats.seconds > 0
    assert manifests["coco"].features["image_size"] == 32
    assert manifests["librispeech"].features["mel_bins"] == 80
    assert manifests["wmt"].features["max_input_length"] == 64


def test_vocabulary_is_shared_and_holds_the_command_tokens(prepared):
    config, manifests, _ = prepared
    vocab = vocabulary(config)
    for offset, token in enumerate(config.command_tokens):
        assert vocab.command_id(token) == FIRST_COMMAND_ID + offset
    assert {m.vocab_sha256 for m in manifests.values()} == {vocab.sha256}
    assert (config.data.shards / "vocab.json").is_file()


# ------------------------------------------------------------------------------------ round trip


def test_shards_train_the_model(prepared):
    """Shards -> `mm.shards.collate` -> MultiModel -> one optimiser step, for every task."""
    config, manifests, _ = prepared
    vocab = vocabulary(config)
    specs = [
        TaskSpec(name, m.kind, vocab.command_id(config.task(name).command), m.num_classes or 0)
        for name, m in manifests.items()
    ]
    torch.manual_seed(0)
    model = MultiModel(ModelConfig.model_validate({"preset": "tiny"}), specs, vocab.size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for spec in specs:
        rows = {column: values[:4] for column, values in read_split(config, spec.name, "train").items()}
        batch = collate(spec, rows)
        before = [p.detach().clone() for p in model.parameters()]
        out = model(batch)
        assert torch.isfinite(out.loss), spec.name
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        changed = sum(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        assert changed > 0, spec.name


def test_read_only_class_labels_from_arrow_collate_without_a_warning_into_labels_of_the_batch(recwarn):
    """Arrow hands out a numeric column zero-copy, read-only; the batch must own its labels
    (torch warned in every Ray worker before, and writing to them would write into Arrow)."""
    labels = pa.array([3, 0, 2], type=pa.int64()).to_numpy(zero_copy_only=True)
    assert not labels.flags.writeable
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    rows = {
        "inputs": [image.tobytes()] * 3,
        "input_shape": [list(image.shape)] * 3,
        "targets": labels,
        "id": ["a", "b", "c"],
    }
    batch = collate(TaskSpec("images", "image_classification", FIRST_COMMAND_ID, 4), rows)
    assert batch.targets.tolist() == [3, 0, 2]
    batch.targets[0] = 1
    assert labels[0] == 3  # a copy, not a view of Arrow's buffer
    assert not [w for w in recwarn if "not writable" in str(w.message)]
