"""gptlab prepare (text -> token shards + manifest) and the TokenStream loader."""

from __future__ import annotations

import json
import pickle
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.data import (
    TokenStream,
    default_corpus_files,
    global_batch_indices,
    iter_documents,
    prepare,
    validation_batches,
)
from gptlab.data.prepare import MANIFEST_FILE, PROGRESS_FILE, token_dtype

EOT = "<|endoftext|>"


@pytest.fixture()
def corpus_dir(tmp_path: Path, tiny_corpus: list[str]) -> Path:
    """tiny_corpus as 40 files in nested directories (names chosen so sorted order != creation order)."""
    root = tmp_path / "corpus"
    for i, text in enumerate(tiny_corpus):
        file = root / f"d{i % 3}" / f"doc_{39 - i:02d}.txt"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(text, encoding="utf-8")
    return root


def _sorted_texts(root: Path) -> list[str]:
    return [
        f.read_text(encoding="utf-8") for f in sorted(root.rglob("*.txt"), key=lambda p: str(p.resolve()))
    ]


def _split_ids(out: Path, split: str) -> np.ndarray:
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    shards = manifest["splits"][split]["shards"]
    if not shards:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.fromfile(out / s["file"], dtype=manifest["dtype"]) for s in shards])


def _documents(tok, ids: np.ndarray) -> list[str]:
    text = tok.decode(ids.tolist())
    assert text.endswith(EOT), "every document, the last included, is followed by <|endoftext|>"
    return text.split(EOT)[:-1]


def _run(inputs, out, tok, **kw):
    return prepare(inputs, out, tok, progress=False, num_workers=1, **kw)


def _dir_bytes(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.iterdir()) if f.name != PROGRESS_FILE}


# ---- prepare ------------------------------------------------------------------------------------
def test_shards_decode_to_documents_joined_by_eot(tmp_path, corpus_dir, tiny_tokenizer):
    out = tmp_path / "ds"
    m = _run([str(corpus_dir)], out, tiny_tokenizer, val_fraction=0.1, shard_tokens=300)
    texts = _sorted_texts(corpus_dir)
    train, val = (_documents(tiny_tokenizer, _split_ids(out, s)) for s in ("train", "val"))
    assert sorted(train + val) == sorted(texts) and len(train) + len(val) == len(texts)
    assert (len(train), len(val)) == (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"])
    assert len(val) == 4  # round(40 * 0.1)
    # Each split keeps the sorted file order.
    assert train == [t for t in texts if t in train] and val == [t for t in texts if t in val]
    # Ids are the tokenizer's own encoding of each document, then the eot id.
    expected = [i for t in train for i in [*tiny_tokenizer.encode(t), tiny_tokenizer.eot_id]]
    assert _split_ids(out, "train").tolist() == expected
    # Shards hold whole documents, >= shard_tokens except the last, with counts that match the files.
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 3
    for k, s in enumerate(shards):
        ids = np.fromfile(out / s["file"], dtype=np.uint16)
        assert ids.size == s["tokens"] and ids[-1] == tiny_tokenizer.eot_id
        assert ids.tolist().count(tiny_tokenizer.eot_id) == s["documents"]
        assert s["tokens"] >= 300 or k == len(shards) - 1
    assert m["dtype"] == "uint16" and m["tokens"] == len(expected) + m["splits"]["val"]["tokens"]
    assert m["tokenizer"] == {
        "name": tiny_tokenizer.name,
        "fingerprint": tiny_tokenizer.fingerprint(),
        "vocab_size": 300,
        "eot_id": 299,
    }
    assert m["sources"]["inputs"] == [str(corpus_dir)] and len(m["sources"]["files"]) == 40
    assert m["settings"] == {"val_fraction": 0.1, "seed": 0, "shard_tokens": 300, "jsonl_field": "text"}
    assert json.loads((out / MANIFEST_FILE).read_text()) == m


def test_split_is_deterministic_and_seeded(tmp_path, corpus_dir, tiny_tokenizer):
    a = _run([corpus_dir], tmp_path / "a", tiny_tokenizer, val_fraction=0.2, seed=1)
    b = _run([corpus_dir], tmp_path / "b", tiny_tokenizer, val_fraction=0.2, seed=1)
    _run([corpus_dir], tmp_path / "c", tiny_tokenizer, val_fraction=0.2, seed=2)
    assert a == b and _dir_bytes(tmp_path / "a") == _dir_bytes(tmp_path / "b")
    val_a = _documents(tiny_tokenizer, _split_ids(tmp_path / "a", "val"))
    val_c = _documents(tiny_tokenizer, _split_ids(tmp_path / "c", "val"))
    assert len(val_a) == len(val_c) == 8 and val_a != val_c
    # Threads change nothing in the output.
    prepare(
        [corpus_dir], tmp_path / "t", tiny_tokenizer, val_fraction=0.2, seed=1, progress=False, num_workers=2
    )
    assert _dir_bytes(tmp_path / "t") == _dir_bytes(tmp_path / "a")


def test_val_split_edge_cases(tmp_path, tiny_tokenizer):
    for i, text in enumerate(["first document", "second document"]):
        (tmp_path / f"{i}.txt").write_text(text)
    m = _run([tmp_path / "0.txt", tmp_path / "1.txt"], tmp_path / "two", tiny_tokenizer, val_fraction=0.01)
    assert (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"]) == (1, 1)
    m = _run([tmp_path / "0.txt"], tmp_path / "one", tiny_tokenizer)
    assert (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"]) == (1, 0)
    m = _run([str(tmp_path / "*.txt")], tmp_path / "none", tiny_tokenizer, val_fraction=0)
    assert m["splits"]["val"] == {"documents": 0, "tokens": 0, "shards": []}
    with pytest.raises(ValueError, match="val_fraction"):
        _run([tmp_path / "0.txt"], tmp_path / "bad", tiny_tokenizer, val_fraction=1.0)


class _OffsetBytes:
    """A byte tokenizer with ids 65600 + byte: exercises ids beyond 16 bits (uint32 shards)."""

    name, vocab_size, eot_id = "offset-bytes", 66000, 65999

    def fingerprint(self) -> str:
        return "offset-bytes-v1"

    def encode_batch(self, texts, num_threads=None):
        return [[65600 + b for b in t.encode()] for t in texts]


def test_dtype_uint16_or_uint32(tmp_path, corpus_dir, tiny_tokenizer):
    assert token_dtype(300) == token_dtype(50257) == token_dtype(65536) == np.uint16
    assert token_dtype(65537) == token_dtype(100277) == np.uint32
    m = _run([corpus_dir], tmp_path / "wide", _OffsetBytes(), shard_tokens=500)
    assert m["dtype"] == "uint32"
    ids = _split_ids(tmp_path / "wide", "train")
    assert ids.dtype == np.uint32 and ids.max() == 65999 and ids.min() >= 65600
    first = (_sorted_texts(corpus_dir)[0]).encode()
    assert ids[: len(first)].tolist() == [65600 + b for b in first]
    x, y = TokenStream(tmp_path / "wide", seq_len=16).batch([0])
    assert x.dtype == torch.int64 and int(x.min()) >= 65600


def test_jsonl_field_and_bad_lines(tmp_path, tiny_tokenizer):
    records = [{"body": f"record number {i} " * 3, "id": i} for i in range(6)]
    lines = [json.dumps(r) for r in records]
    lines[2:2] = ["", json.dumps({"body": "   ", "id": -1})]  # a blank line, an empty text
    file = tmp_path / "data.jsonl"
    file.write_text("\n".join(lines) + "\n")
    m = _run([file], tmp_path / "out", tiny_tokenizer, jsonl_field="body", val_fraction=0)
    assert _documents(tiny_tokenizer, _split_ids(tmp_path / "out", "train")) == [r["body"] for r in records]
    assert m["skipped"]["empty_documents"] == 2 and m["documents"] == 6
    assert list(iter_documents([file], "body")) == [r["body"] for r in records]

    with pytest.raises(ValueError, match=r"data\.jsonl line 1: no field 'text'.*\['body', 'id'\]"):
        _run([file], tmp_path / "x", tiny_tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": "broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 3: not valid JSON"):
        _run([bad], tmp_path / "y", tiny_tokenizer)
    bad.write_text('{"text": "fine"}\n{"text": 7}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: field 'text' holds a int"):
        _run([bad], tmp_path / "z", tiny_tokenizer)


def test_empty_binary_and_undecodable_are_counted(tmp_path, tiny_tokenizer):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a_empty.txt").write_bytes(b"")
    (src / "b_blank.txt").write_bytes(b" \n\t\n")
    (src / "c_bad.txt").write_bytes(b"caf\xe9 ok \xff\xfe end")  # 3 undecodable bytes (latin-1 e-acute)
    (src / "d_good.txt").write_text("plain text")
    (src / "e_binary.bin").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    (src / ".hidden.txt").write_text("hidden files are not read")
    m = _run([src], tmp_path / "out", tiny_tokenizer, val_fraction=0)
    assert m["skipped"] == {"empty_files": 2, "binary_files": 1, "empty_documents": 0}
    assert m["replaced_bytes"] == 3 and m["documents_with_replaced_bytes"] == 1
    docs = _documents(tiny_tokenizer, _split_ids(tmp_path / "out", "train"))
    assert docs == ["caf\ufffd ok \ufffd\ufffd end", "plain text"]
    assert len(m["sources"]["files"]) == 5


def test_missing_input_is_a_clear_error(tmp_path, tiny_tokenizer):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        _run([tmp_path / "nope.txt"], tmp_path / "o", tiny_tokenizer)
    with pytest.raises(FileNotFoundError, match=r"glob .*\*\.md.* matched no files"):
        _run([str(tmp_path / "*.md")], tmp_path / "o", tiny_tokenizer)
    with pytest.raises(ValueError, match="no inputs given"):
        _run([], tmp_path / "o", tiny_tokenizer)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="contains no files"):
        _run([tmp_path / "empty_dir"], tmp_path / "o", tiny_tokenizer)
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="empty or binary"):
        _run([tmp_path / "e.txt"], tmp_path / "o", tiny_tokenizer)
    assert not (tmp_path / "o" / MANIFEST_FILE).exists()


def test_resume_after_interruption_skips_finished_shards(tmp_path, corpus_dir, tiny_tokenizer):
    settings = dict(val_fraction=0.1, shard_tokens=250)
    reference = _run([corpus_dir], tmp_path / "ref", tiny_tokenizer, **settings)
    n_train, n_val = (len(reference["splits"][s]["shards"]) for s in ("train", "val"))
    assert n_train >= 5

    class Interrupt(Exception):
        pass

    written: list[tuple[str, int]] = []

    def stop_after_three(split, index):
        written.append((split, index))
        if len(written) == 3:
            raise Interrupt

    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        _run([corpus_dir], out, tiny_tokenizer, on_shard=stop_after_three, **settings)
    assert not (out / MANIFEST_FILE).exists()
    assert sorted(f.name for f in out.glob("*.bin")) == [
        "train_00000.bin",
        "train_00001.bin",
        "train_00002.bin",
    ]

    written.clear()
    resumed = _run(
        [corpus_dir], out, tiny_tokenizer, on_shard=lambda s, i: written.append((s, i)), **settings
    )
    assert written == [("train", i) for i in range(3, n_train)] + [("val", i) for i in range(n_val)]
    assert resumed == reference and _dir_bytes(out) == _dir_bytes(tmp_path / "ref")

    # A lost manifest and a lost middle shard: only that shard is rebuilt.
    (out / MANIFEST_FILE).unlink()
    (out / "train_00001.bin").unlink()
    written.clear()
    assert (
        _run([corpus_dir], out, tiny_tokenizer, on_shard=lambda s, i: written.append((s, i)), **settings)
        == reference
    )
    assert written == [("train", 1)] and _dir_bytes(out) == _dir_bytes(tmp_path / "ref")

    # A complete dataset re-run writes nothing; changed settings start over without stale shards.
    written.clear()
    _run([corpus_dir], out, tiny_tokenizer, on_shard=lambda s, i: written.append((s, i)), **settings)
    assert written == []
    m = _run([corpus_dir], out, tiny_tokenizer, val_fraction=0.1, shard_tokens=100_000)
    assert sorted(f.name for f in out.glob("*.bin")) == ["train_00000.bin", "val_00000.bin"]
    assert m["splits"]["train"]["tokens"] == reference["splits"]["train"]["tokens"]

    # Output inside an input directory is not read back as input.
    inner = _run([corpus_dir], corpus_dir / "ds", tiny_tokenizer, **settings)
    written.clear()
    again = _run(
        [corpus_dir], corpus_dir / "ds", tiny_tokenizer, on_shard=lambda s, i: written.append(i), **settings
    )
    assert inner == again == reference and written == []


def test_progress_bar_reports_documents_and_tokens(tmp_path, corpus_dir, tiny_tokenizer, capsys):
    prepare([corpus_dir], tmp_path / "out", tiny_tokenizer, num_workers=2)
    err = capsys.readouterr().err
    assert "tokenize" in err and "40/40" in err and "tok/s" in err


def test_default_corpus_is_the_stdlib():
    files = default_corpus_files()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    names = {f.relative_to(stdlib).as_posix() for f in files}
    assert {"os.py", "json/__init__.py", "asyncio/tasks.py"} <= names
    assert all(f.suffix == ".py" for f in files) and files == sorted(files, key=str)
    assert not any({"site-packages", "test", "tests"} & set(n.split("/")) for n in names)


# ---- loader -------------------------------------------------------------------------------------
@pytest.fixture()
def dataset(tmp_path, corpus_dir, tiny_tokenizer) -> Path:
    out = tmp_path / "ds"
    _run([corpus_dir], out, tiny_tokenizer, val_fraction=0.2, shard_tokens=200)
    return out


def test_token_stream_indexing_permutation_and_shard_crossing(dataset):
    seq_len = 37
    stream = TokenStream(dataset, "train", seq_len=seq_len, seed=3)
    full = _split_ids(dataset, "train").astype(np.int64)
    n = (full.size - 1) // seq_len
    assert len(stream) == n and stream.n_tokens == full.size
    assert stream.tokenizer["fingerprint"] == stream.manifest["tokenizer"]["fingerprint"]
    assert stream.vocab_size == 300 and stream.eot_id == 299
    sizes = [s["tokens"] for s in stream.manifest["splits"]["train"]["shards"]]
    boundaries = np.cumsum(sizes)[:-1]

    indices = list(range(2 * n + 5))  # two epochs and a bit
    x, y = stream.batch(indices)
    assert x.shape == y.shape == (len(indices), seq_len) and x.dtype == y.dtype == torch.int64
    crossing = 0
    for row, i in enumerate(indices):
        epoch = i // n
        c = int(np.random.default_rng([3, epoch]).permutation(n)[i % n])
        start = c * seq_len
        assert x[row].tolist() == full[start : start + seq_len].tolist()
        assert y[row].tolist() == full[start + 1 : start + seq_len + 1].tolist()
        crossing += bool(((boundaries > start) & (boundaries < start + seq_len + 1)).any())
    assert crossing > 3, "the test must cover sequences that span shard boundaries"
    # Each epoch visits every chunk once, in an order that changes with the epoch and the seed.
    epoch0 = [stream.chunk(i) for i in range(n)]
    epoch1 = [stream.chunk(i) for i in range(n, 2 * n)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(n)) and epoch0 != epoch1
    other = TokenStream(dataset, "train", seq_len=seq_len, seed=4)
    assert [other.chunk(i) for i in range(n)] != epoch0
    # Deterministic across instances: the position is the only state.
    x2, _ = TokenStream(dataset, "train", seq_len=seq_len, seed=3).batch([n + 2, 5])
    assert torch.equal(x2, x[[n + 2, 5]])
    # Pickled (e.g. into DataLoader workers) without copying the shards.
    blob = pickle.dumps(stream)
    assert full[:200].astype(np.uint16).tobytes() not in blob
    assert torch.equal(pickle.loads(blob).batch([n + 2, 5])[0], x2)


def test_ranks_split_the_global_batch(dataset):
    stream = TokenStream(dataset, seq_len=16)
    position, global_batch = 11, 8
    single = stream.batch(global_batch_indices(position, global_batch))
    for world in (2, 4):
        parts = [stream.batch(global_batch_indices(position, global_batch, r, world)) for r in range(world)]
        assert torch.equal(torch.cat([p[0] for p in parts]), single[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), single[1])
    with pytest.raises(ValueError, match="not divisible"):
        global_batch_indices(0, 6, 0, 4)


def test_validation_batches_are_deterministic_and_unshuffled(dataset):
    val = _split_ids(dataset, "val").astype(np.int64)
    seq_len, batch_size = 8, 3
    n = (val.size - 1) // seq_len
    batches = validation_batches(dataset, seq_len, batch_size, max_batches=1000)
    again = validation_batches(dataset, seq_len, batch_size, max_batches=1000)
    assert len(batches) == -(-n // batch_size)
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True)
    )
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.flatten().tolist() == val[: n * seq_len].tolist()
    assert y.flatten().tolist() == val[1 : n * seq_len + 1].tolist()
    assert len(validation_batches(dataset, seq_len, batch_size, max_batches=2)) == 2


def test_loader_errors_name_the_problem(tmp_path, dataset):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json.*gptlab prepare"):
        TokenStream(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="fewer than one sequence of seq_len 100000"):
        TokenStream(dataset, seq_len=100_000)
    with pytest.raises(ValueError, match="split 'test'"):
        TokenStream(dataset, "test")
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    shard = broken / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"train_00001\.bin is .* bytes, expected"):
        TokenStream(broken)
    (broken / MANIFEST_FILE).write_text('{"format": "gptlab-tokens", "spl')
    with pytest.raises(ValueError, match=r"manifest\.json is corrupted"):
        TokenStream(broken)


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_prepare(tmp_path, corpus_dir, tiny_tokenizer, capsys):
    from gptlab.cli import main

    tok_dir = tiny_tokenizer.save(tmp_path / "tok")
    out = tmp_path / "ds"
    args = ["prepare", str(corpus_dir / "d0"), str(corpus_dir / "d1" / "*.txt"), "--tokenizer", str(tok_dir)]
    rc = main([*args, "--out", str(out), "--val-fraction", "0.1", "--shard-tokens", "500", "--no-progress"])
    assert rc == 0
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert m["documents"] == 27 and m["tokenizer"]["fingerprint"] == tiny_tokenizer.fingerprint()
    assert m["settings"]["shard_tokens"] == 500 and "train: 24 documents" in capsys.readouterr().out

    rc = main(["prepare", str(tmp_path / "*.none"), "--tokenizer", str(tok_dir), "--out", str(out)])
    assert rc == 2 and "matched no files" in capsys.readouterr().err


def test_default_corpus_leaves_out_generated_tables_and_data(tmp_path):
    import sysconfig

    from gptlab.data.documents import corpus_exclusion, default_corpus_files, default_corpus_left_out

    root = Path(sysconfig.get_paths()["stdlib"])
    kept = {str(f.relative_to(root)) for f in default_corpus_files()}
    for name in ("os.py", "argparse.py", "json/decoder.py", "collections/__init__.py", "opcode.py"):
        assert name in kept, name  # real modules, opcode.py included (45% literals: below the cut)
    left_out = default_corpus_left_out()
    gone = {p for entry in left_out.values() for p in entry["paths"]}
    for name in ("encodings/cp1252.py", "encodings/cp437.py", "html/entities.py", "pydoc_data/topics.py"):
        if (root / name).is_file():
            assert name in gone and name not in kept, name
    assert not kept & gone and len(kept) > 400
    assert sum(e["files"] for e in left_out.values()) == len(gone)

    table = tmp_path / "table.py"
    table.write_text("# a mapping\nT = {\n" + "".join(f"    0x{i:04x}: 0x{i + 1:04x},\n" for i in range(40)) + "}\n")
    code = tmp_path / "code.py"
    code.write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(20)))
    assert corpus_exclusion(table).startswith("a table") and corpus_exclusion(code) is None
