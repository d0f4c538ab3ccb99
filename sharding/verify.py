"""``python -m sharding.verify ROOT``: check every shard of a root against its manifest.

Reads ``ROOT/manifest.json`` (local or ``s3://``), streams every shard of every split and
compares its size and sha256 (and its evaluation companion's) with what the manifest lists. Prints one line per bad shard
(missing, wrong size, wrong digest) and a summary; exit code 0 when every shard matches, 1 when
any does not, 2 when the manifest itself cannot be read.

Usage: python -m sharding.verify ROOT [--endpoint URL] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from dfmvr.data import storage
from dfmvr.data.shards import ManifestError, read_manifest


@dataclass
class ShardProblem:
    url: str
    problem: str


def verify(root: str, *, endpoint: str | None = None) -> tuple[int, list[ShardProblem]]:
    """``(files checked, problems)`` for every shard the manifest at ``root`` lists and its
    evaluation companion.

    Raises:
        ManifestError: the manifest is missing or unreadable (names the root).
    """
    manifest = read_manifest(root, endpoint=endpoint)
    problems: list[ShardProblem] = []
    checked = 0
    for split in manifest.splits:
        for shard in manifest.split(split).shards:
            for url, expected_size, expected_sha256 in shard.files():  # the shard, its evaluation companion
                checked += 1
                try:
                    digest, size = storage.sha256_and_size(url, endpoint=endpoint)
                except Exception as exn:  # missing object, no rights, an outage: each named
                    problems.append(ShardProblem(url, f"cannot be read ({str(exn)[:200]})"))
                    continue
                if size != expected_size:
                    problems.append(ShardProblem(url, f"{size} bytes, the manifest says {expected_size}"))
                elif digest != expected_sha256:
                    problems.append(ShardProblem(url, f"sha256 {digest[:16]}..., the manifest says "
                                                      f"{expected_sha256[:16]}..."))
    return checked, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sharding.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("root", help="shard root (local directory or s3://bucket/prefix)")
    p.add_argument("--endpoint", default=None, help="S3 endpoint URL (else AWS_ENDPOINT_URL)")
    p.add_argument("--json", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    try:
        checked, problems = verify(args.root, endpoint=args.endpoint)
    except (ManifestError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for pr in problems:
        print(f"BAD {pr.url}: {pr.problem}")
    print(f"{checked - len(problems)} of {checked} files (shards and evaluation companions) match the manifest")
    if args.json:
        Path(args.json).write_text(json.dumps({"checked": checked, "problems": [asdict(p) for p in problems]}, indent=1))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
