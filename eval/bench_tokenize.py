"""Tokenizing a corpus larger than it is sensible to hold in memory: throughput and peak memory per tokenizer.

    nice -n 10 python eval/bench_tokenize.py [--size_mb 512] [--tokenizers char,byte,bpe] [--vocab_size 4096]

Generates a corpus of ``--size_mb`` MiB in a temporary folder (Tiny Shakespeare, or Python's help topics when
it is not on disk, repeated with its paragraphs shuffled differently in every copy, in 64 MiB files), then
builds the token cache of that folder (``cached_tokens``, as ``spiking-lm fit`` does) once per tokenizer, each
in a fresh child process, and deletes everything it wrote but its report. Per tokenizer: seconds, MB/s of
corpus, and the child's peak resident memory (``ru_maxrss`` of that child, from ``os.wait4``); for bpe the
training pass (on the leading 90%, the training split) and the encoding pass are also timed apart. The
"imports only" row is a child that imports the data code and tokenizes nothing: the floor under every row.

Writes eval/results/bench_tokenize_<device>_<date>.json and a Markdown table beside it (.md).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spiking_lm.eval.benchmark import REPO, choices, markdown_table, publish

TOKENIZERS = ("char", "byte", "bpe")
FILE_BYTES = 64 << 20
MB = 1e6

# What a child runs: build the cache of argv[1] with tokenizer argv[2], timing the BPE's training pass apart.
_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import spiking_lm.data.cache as cache
imported = time.perf_counter()
train_s = 0.0
if sys.argv[2] == "bpe":
    train_bpe = cache.train_bpe
    def timed(*args, **kwargs):
        global train_s
        start = time.perf_counter()
        result = train_bpe(*args, **kwargs)
        train_s = time.perf_counter() - start
        return result
    cache.train_bpe = timed
if sys.argv[2] != "none":
    tokens, tok = cache.cached_tokens(sys.argv[1], sys.argv[2], vocab_size=int(sys.argv[4]), cache_dir=sys.argv[3])
    n, vocab = len(tokens), tok.vocab_size
else:
    n, vocab = 0, None
print(json.dumps({"import_s": imported - t0, "total_s": time.perf_counter() - imported, "train_s": train_s,
                  "tokens": n, "vocab_size": vocab}))
"""


def make_corpus(folder: Path, size: int, seed: int = 0) -> int:
    """Write ``size`` bytes of shuffled copies of a seed text into ``folder``; return the bytes written."""
    shakespeare = Path(os.environ.get("SPIKING_LM_DATA_DIR", "~/.cache/spiking_lm/data")).expanduser()
    shakespeare = shakespeare / "tinyshakespeare.txt"
    if shakespeare.is_file():
        seed_text = shakespeare.read_text(encoding="utf-8")
    else:
        from spiking_lm.data import load_text

        seed_text = load_text("python-docs")
    paragraphs = seed_text.split("\n\n")
    rng = random.Random(seed)
    written, index = 0, 0
    while written < size:
        with open(folder / f"part-{index:04d}.txt", "w", encoding="utf-8") as f:
            in_file = 0
            while in_file < FILE_BYTES and written + in_file < size:
                rng.shuffle(paragraphs)
                copy = "\n\n".join(paragraphs) + "\n\n"
                f.write(copy)
                in_file += len(copy.encode("utf-8"))
        written += in_file
        index += 1
    return written


def measure(corpus: Path, tokenizer: str, vocab_size: int, cache: Path) -> dict:
    """Build one cache in a child process; its timings, token count and peak RSS."""
    with tempfile.TemporaryFile() as err:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(corpus), tokenizer, str(cache), str(vocab_size)],
            stdout=subprocess.PIPE,
            stderr=err,
        )
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, unlike RUSAGE_CHILDREN's running max
        child.returncode = os.waitstatus_to_exitcode(status)
        shutil.rmtree(cache, ignore_errors=True)
        if child.returncode != 0:
            err.seek(0)
            last = err.read().decode(errors="replace").strip().splitlines()[-1:]
            return {"error": f"child exited with status {child.returncode}: {' '.join(last)}"}
    # ru_maxrss is in KiB on Linux.
    return {**json.loads(out), "peak_rss_mb": usage.ru_maxrss * 1024 / MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size_mb", type=int, default=512, help="corpus size in MiB (default 512)")
    parser.add_argument("--tokenizers", default=",".join(TOKENIZERS), help="comma-separated, of char,byte,bpe")
    parser.add_argument("--vocab_size", type=int, default=4096, help="tokens of the BPE (default 4096)")
    parser.add_argument("--workdir", default=None, help="folder for the temporary corpus (default: the system's)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report path (default eval/results/...)")
    args = parser.parse_args()
    names = choices(parser, "--tokenizers", args.tokenizers, TOKENIZERS)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_tokenize.", dir=args.workdir) as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        size = make_corpus(corpus, args.size_mb << 20)
        print(f"corpus: {size / MB:.0f} MB in {len(list(corpus.iterdir()))} files", flush=True)
        for name in ("none", *names):
            start = time.perf_counter()
            row = {
                "tokenizer": "imports only" if name == "none" else name,
                **measure(corpus, name, args.vocab_size, Path(tmp) / "cache"),
            }
            if name != "none" and "error" not in row:
                row["mb_per_s"] = size / MB / row["total_s"]
                if name == "bpe":
                    row["train_mb_per_s"] = 0.9 * size / MB / row["train_s"]
                    row["encode_mb_per_s"] = size / MB / (row["total_s"] - row["train_s"])
            rows.append(row)
            print(f"  {time.perf_counter() - start:.0f} s: {json.dumps(row)}", flush=True)  # kept if a later row dies

    columns = [
        ("tokenizer", 12, "tokenizer", ""),
        ("vocab", 6, "vocab_size", "d"),
        ("tokens", 13, "tokens", ",d"),
        ("seconds", 8, "total_s", ".1f"),
        ("MB/s", 7, "mb_per_s", ".2f"),
        ("BPE train MB/s", 14, "train_mb_per_s", ".2f"),
        ("BPE encode MB/s", 15, "encode_mb_per_s", ".2f"),
        ("peak RSS MB", 11, "peak_rss_mb", ".0f"),
    ]
    out = args.out or REPO / "eval" / "results" / f"bench_tokenize_{datetime.date.today().isoformat()}.json"
    report = publish(
        "bench_tokenize",
        "cpu",
        rows,
        columns,
        out,
        corpus_bytes=size,
        cpus=os.cpu_count(),
        vocab_size=args.vocab_size,
        command=" ".join(["python", *sys.argv]),
    )
    md = out.with_suffix(".md")
    md.write_text(
        f"Tokenizing a {size / MB:.0f} MB corpus ({report['date']}, {report['device']}, {os.cpu_count()}"
        f" CPUs, commit {(report['commit'] or '?')[:10]}): `{report['command']}`\n\n" + markdown_table(rows, columns)
    )
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
