"""Topic classification on Debian's ``fortunes``: real text, available offline, read at run time.

The package's data files (``/usr/share/games/fortunes/<topic>``) hold quotes separated by lines
containing only ``%``. The task: given a quote, name its file. We keep the 8 largest topics and
split each topic's quotes by a hash of their text (80 % train, 20 % test), so the split is fixed
across runs, machines and package versions that add quotes. Nothing from the package is committed
to this repository; ``ensure_installed`` installs it with apt when it is missing.

    python benchmarks/_fortunes.py out/fortunes     # writes train.csv and test.csv (text,label)
"""

from __future__ import annotations

import csv
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
TOPICS = 8
TEST_SHARE = 0.2


def ensure_installed() -> None:
    """Install Debian's ``fortunes`` package when its data files are missing (needs apt and root)."""
    if FORTUNES_DIR.is_dir() and any(FORTUNES_DIR.iterdir()):
        return
    if shutil.which("apt-get") is None:
        raise SystemExit(f"{FORTUNES_DIR} is missing and apt-get is not available; install Debian's "
                         "'fortunes' package by hand")
    print("installing Debian's 'fortunes' package ...", file=sys.stderr)
    subprocess.run(["apt-get", "install", "-y", "-q", "fortunes"], check=False, capture_output=True)
    if not FORTUNES_DIR.is_dir():
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "fortunes"], check=True, capture_output=True)


def _clean(quote: str) -> str:
    quote = re.sub(r".\x08", "", quote)  # some files "overstrike" (char, backspace) for bold
    return re.sub(r"\s+", " ", quote).strip()


def read_topic(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    quotes = (_clean(q) for q in re.split(r"^%\s*$", text, flags=re.MULTILINE))
    return list(dict.fromkeys(q for q in quotes if q))  # drop empties and exact duplicates, keep order


def _is_test(text: str) -> bool:
    digest = hashlib.sha256(text.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < TEST_SHARE


def load_fortunes(topics: int = TOPICS) -> tuple[list[dict], list[dict], list[str]]:
    """(train rows, test rows, topic names); rows are ``{"text": str, "label": topic}``.

    A quote that appears under two topics is dropped from both: its label would be ambiguous.
    """
    ensure_installed()
    files = [p for p in FORTUNES_DIR.iterdir() if p.is_file() and not p.suffix and not p.is_symlink()]
    by_topic = {p.name: read_topic(p) for p in files}
    names = sorted(by_topic, key=lambda n: (-len(by_topic[n]), n))[:topics]
    seen: dict[str, int] = {}
    for n in names:
        for q in by_topic[n]:
            seen[q] = seen.get(q, 0) + 1
    train, test = [], []
    for n in sorted(names):
        for q in by_topic[n]:
            if seen[q] == 1:
                (test if _is_test(q) else train).append({"text": q, "label": n})
    return train, test, sorted(names)


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/fortunes")
    train, test, names = load_fortunes()
    write_csv(train, out / "train.csv")
    write_csv(test, out / "test.csv")
    print(f"{len(train)} train / {len(test)} test quotes, topics: {', '.join(names)} → {out}")
