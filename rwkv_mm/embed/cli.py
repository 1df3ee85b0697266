"""`rwkv-embed`: index folders and search them by meaning.

    rwkv-embed index docs/                    # create or update ./.rwkv-embed/ (incremental)
    rwkv-embed search "resume a chat" -k 5    # path:start-end  score  snippet
    rwkv-embed search "resume a chat" --json  # one JSON object per line
    rwkv-embed status
    rwkv-embed index docs/ --shard 0/2        # scale-out: one shard per process, then
    rwkv-embed merge                          # one IVF index from all shards

Index location, the same for every command: --index PATH, else $RWKV_EMBED_INDEX, else the nearest
.rwkv-embed/ in the current folder or its parents; `index` creates ./.rwkv-embed/ when none is found.
The CLI is thin over :class:`rwkv_mm.embed.store.Index`; torch is imported only when something is encoded,
so a re-index with nothing changed takes well under a second.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from rwkv_mm.embed.ingest import ChunkConfig
from rwkv_mm.embed.store import (
    ChunkerMismatchError,
    EmbedderMismatchError,
    Index,
    IndexNotFoundError,
    StoreError,
    merge_shards,
    shard_path,
    shard_paths,
)

ENV_INDEX = "RWKV_EMBED_INDEX"
INDEX_DIR = ".rwkv-embed"
log = logging.getLogger("rwkv_mm.embed")


class UsageError(Exception):
    """A one-line error meant for the user, exit code 2 (missing folder or index, wrong embedder)."""


def locate_index(explicit: str | None, create: bool = False) -> Path:
    """The index folder: ``--index``, else $RWKV_EMBED_INDEX, else the nearest ``.rwkv-embed/`` upwards.

    With ``create``, ``./.rwkv-embed`` when none is found; otherwise :class:`UsageError`.
    """
    if explicit:
        return Path(explicit)
    if os.environ.get(ENV_INDEX):
        return Path(os.environ[ENV_INDEX])
    cwd = Path.cwd()
    for folder in (cwd, *cwd.parents):
        if (folder / INDEX_DIR).is_dir():
            return folder / INDEX_DIR
    if create:
        return cwd / INDEX_DIR
    raise UsageError(
        f"No index found (no --index, no ${ENV_INDEX}, no {INDEX_DIR}/ in {cwd} or its parents); "
        "run `rwkv-embed index DIR` first"
    )


def _open_read_only(path: Path, model: str | None = None) -> Index:
    try:
        return Index.open(path, embedder=model)
    except IndexNotFoundError:
        if shard_paths(path):
            hint = "run `rwkv-embed merge` to build it from its shards"
        else:
            flag = "" if path.name == INDEX_DIR else f" --index {path}"
            hint = f"run `rwkv-embed index DIR{flag}` first"
        raise UsageError(f"No index at {path}; {hint}") from None


def _shown(index: Index, key: str) -> str:
    """A stored path as the user should see it: relative to the current folder when under it."""
    path = str(index.resolve(key))
    cwd = os.getcwd()
    return path[len(cwd) + 1 :] if path.startswith(cwd + os.sep) else path


def _snippet(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


# ---------------------------------------------------------------------------------------------------------
# commands


def cmd_index(args: argparse.Namespace) -> int:
    """Create or update the index from one or more folders and print one summary line per folder."""
    for folder in args.dirs:
        if not Path(folder).exists():
            raise UsageError(f"No such folder: {folder}; check the path (rwkv-embed index DIR)")
    location = locate_index(args.index, create=True)
    path = shard_path(location, args.shard) if args.shard else location
    model = args.model
    if model is None and args.shard and (location / "config.json").exists():
        # a new shard of an existing index: the index's recorded model, not the bundled default
        model = json.loads((location / "config.json").read_text())["embedder"]["model"]
    kind = "ivf" if args.ivf else "auto"
    root = location.resolve().parent if args.shard else None
    chunker = ChunkConfig(max_chars=args.chunk_chars) if args.chunk_chars else None
    index = Index.open_or_create(
        path, embedder=model, kind=kind, shard=args.shard, root=root, chunker=chunker
    )
    with index:
        for folder in args.dirs:
            stats = index.update(
                folder,
                exclude=args.exclude or (),
                gitignore=not args.no_gitignore,
                batch_size=args.batch_size,
                progress=_progress_bar(args.quiet),
            )
            if args.json:
                print(json.dumps({"folder": folder, "index": str(path), **stats.as_dict()}))
                continue
            skipped = sum(stats.skipped.values())
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(stats.skipped.items()))
            print(
                f"{folder}: {stats.added} added, {stats.updated} updated, {stats.removed} removed, "
                f"{stats.unchanged} unchanged, {skipped} skipped"
                + (f" ({reasons})" if reasons else "")
                + f" files; {stats.chunks_added} chunks added ({stats.chunks_embedded} embedded, "
                f"{stats.chunks_reused} reused), {stats.chunks_removed} removed; {stats.seconds:.2f} s"
            )
    return 0


def _progress_bar(quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (CI logs, pipes)
    return lambda items: tqdm(items, unit="file", desc="indexing", disable=None, leave=False)


def cmd_search(args: argparse.Namespace) -> int:
    """Print the best chunks for a query: `path:start-end  score  snippet`, or JSON lines with --json."""
    if args.k < 1:
        raise UsageError(f"-k must be at least 1, got {args.k}")
    with _open_read_only(locate_index(args.index), args.model) as index:
        hits = index.search(args.query, k=args.k)
        for hit in hits:
            if args.json:
                record = {
                    "path": str(index.resolve(hit.path)),
                    "start_line": hit.start_line,
                    "end_line": hit.end_line,
                    "score": round(hit.score, 6),
                    "text": hit.text,
                    "id": hit.id,
                }
                print(json.dumps(record, ensure_ascii=False))
            else:
                shown = _shown(index, hit.path)
                print(f"{shown}:{hit.start_line}-{hit.end_line}  {hit.score:.3f}  {_snippet(hit.text)}")
        if not hits:
            print("rwkv-embed: the index is empty", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print what the index holds: embedder, vectors, files, folders, size."""
    with _open_read_only(locate_index(args.index)) as index:
        s = index.stats()
    if args.json:
        print(json.dumps(s))
        return 0
    skipped = sum(s["skipped"].values())
    updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["updated"])) if s["updated"] else "never"
    kind = f"IVF{s['nlist']}" if s["kind"] == "ivf" else "flat"
    lines = [
        ("index", f"{s['index']} (paths relative to {s['root']})"),
        (
            "model",
            f"{s['model_id']} (dim {s['dim']}, pooling {s['pooling']}, from {s['model'] or 'bundled'})",
        ),
        ("vectors", f"{s['chunks']} chunks, {kind}" + (f", {s['pending']} pending" if s["pending"] else "")),
        ("files", f"{s['files']} indexed" + (f", {skipped} skipped" if skipped else "")),
        ("folders", ", ".join(s["folders"]) or "none"),
        ("updated", updated),
        ("size", f"{s['bytes'] / 2**20:.1f} MiB"),
    ]
    if s["shard"]:
        lines.insert(1, ("shard", f"{s['shard'][0]} of {s['shard'][1]}"))
    for name, value in lines:
        print(f"{name:<8} {value}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge ``<index>/shards/*`` into one IVF index (FAISS on-disk merge) and print its summary."""
    location = locate_index(args.index)
    start = time.perf_counter()
    try:
        s = merge_shards(location, nlist=args.nlist, nprobe=args.nprobe)
    except IndexNotFoundError as e:
        raise UsageError(str(e)) from None
    seconds = time.perf_counter() - start
    if args.json:
        print(json.dumps({**s, "seconds": seconds}))
    else:
        what = f"{s['chunks']} chunks in {s['files']} files, IVF{s['nlist']}"
        print(f"merged into {s['index']}: {what}; {seconds:.2f} s")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """Remove files, or every file under folders, from the index."""
    path = locate_index(args.index)
    if not (path / "config.json").exists():
        _open_read_only(path).close()  # raises the "no index" error
    with Index.open_or_create(path) as index:
        removed = index.remove(args.paths)
    print(f"removed {removed} files")
    return 0


# ---------------------------------------------------------------------------------------------------------
# parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rwkv-embed",
        description="Index folders and search them by meaning.",
        epilog="Index location: --index PATH, else $RWKV_EMBED_INDEX, else the nearest .rwkv-embed/ upwards.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the index does")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_index(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--index",
            metavar="PATH",
            help="index folder (default: $RWKV_EMBED_INDEX or the nearest .rwkv-embed/)",
        )
        return p

    def with_json(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--json", action="store_true", help=what)

    p = with_index(sub.add_parser("index", help="create or update the index from folders"))
    p.add_argument("dirs", nargs="+", metavar="DIR", help="folders (or files) to index")
    p.add_argument("--model", metavar="PATH", help="embedder folder or module:factory (default: bundled)")
    p.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="embedding batch size (default 32)"
    )
    p.add_argument("--exclude", action="append", metavar="GLOB", help="leave out matching paths (repeatable)")
    p.add_argument("--no-gitignore", action="store_true", help="index files that .gitignore excludes")
    p.add_argument("--shard", type=_parse_shard, metavar="I/N", help="index shard I of N (then `merge`)")
    p.add_argument("--ivf", action="store_true", help="use an IVF index now (default: above 200k chunks)")
    p.add_argument(
        "--chunk-chars",
        type=_positive,
        metavar="N",
        help="chunk size of a new index in characters (default: the embedder's, else 1000)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    with_json(p, "print the summary as JSON")
    p.set_defaults(func=cmd_index)

    p = with_index(sub.add_parser("search", help="print the chunks most similar to a query"))
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5, help="number of results (default 5)")
    p.add_argument("--model", metavar="PATH", help="embedder for the query (default: the index's)")
    with_json(p, "one JSON object per line")
    p.set_defaults(func=cmd_search)

    p = with_index(sub.add_parser("status", help="what the index holds"))
    with_json(p, "print as JSON")
    p.set_defaults(func=cmd_status)

    p = with_index(sub.add_parser("merge", help="merge shards (index --shard I/N) into one IVF index"))
    p.add_argument("--nlist", type=int, metavar="N", help="IVF cells (default 4·sqrt(chunks))")
    p.add_argument("--nprobe", type=int, metavar="N", help="IVF cells searched per query")
    with_json(p, "print the summary as JSON")
    p.set_defaults(func=cmd_merge)

    p = with_index(sub.add_parser("rm", help="remove files or folders from the index"))
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.set_defaults(func=cmd_rm)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `rwkv-embed`; returns the exit code: 0 ok, 1 error, 2 missing folder or index."""
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("rwkv-embed: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    log.propagate = False
    try:
        if getattr(args, "quiet", True):
            return args.func(args)
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm([log]):
            return args.func(args)
    except (UsageError, EmbedderMismatchError, ChunkerMismatchError, FileNotFoundError) as e:
        print(f"rwkv-embed: error: {e}", file=sys.stderr)
        return 2
    except StoreError as e:
        print(f"rwkv-embed: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rwkv-embed: interrupted; the next `rwkv-embed index` carries on", file=sys.stderr)
        return 130
    finally:
        log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
