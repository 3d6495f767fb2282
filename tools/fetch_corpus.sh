#!/usr/bin/env bash
# Fetch Debian's English fortune-cookie files and build the demo model's corpus.
#
#   tools/fetch_corpus.sh [OUT_DIR]          (default: data/ at the repository root)
#
# Writes OUT_DIR/fortunes.txt (one fortune per entry, entries separated by one blank
# line, no blank line inside an entry) and OUT_DIR/corpus.json (packages and versions,
# .deb sha256s, files used, entry and byte counts). tools/train_demo_model.py copies
# corpus.json beside the checkpoint it writes.
#
# Packages: $FORTUNE_PACKAGES (default "fortunes fortunes-min": the English,
# non-offensive cookie files; the offensive ones live in fortunes-off, never fetched).
# Needs apt-get (run as root, or apt-get download works unprivileged once the
# package lists are fresh), dpkg-deb and python3. Network: only the Debian mirror.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$(mkdir -p "${1:-$REPO_ROOT/data}" && cd "${1:-$REPO_ROOT/data}" && pwd)"
PACKAGES="${FORTUNE_PACKAGES:-fortunes fortunes-min}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
else
    echo "fetch_corpus: not root, skipping apt-get update (using the current package lists)" >&2
fi

cd "$WORK"
# APT's download sandbox user cannot write into a root-owned mktemp dir: download as ourselves.
# shellcheck disable=SC2086
apt-get -q -o APT::Sandbox::User="$(id -un)" download $PACKAGES
mkdir -p root
: > packages.tsv
for deb in ./*.deb; do
    name="$(dpkg-deb -f "$deb" Package)"
    version="$(dpkg-deb -f "$deb" Version)"
    sha="$(sha256sum "$deb" | cut -d' ' -f1)"
    printf '%s\t%s\t%s\t%s\n' "$name" "$version" "$(basename "$deb")" "$sha" >> packages.tsv
    echo "fetch_corpus: $name $version ($(basename "$deb"), sha256 $sha)"
    dpkg-deb -x "$deb" root
done

python3 - "$WORK/root/usr/share/games/fortunes" "$WORK/packages.tsv" "$OUT_DIR" <<'PY'
"""Clean the strfile sources (entries separated by lines holding only '%') into plain text."""
import hashlib
import json
import re
import sys
import unicodedata
from pathlib import Path

src, packages_tsv, out_dir = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
SKIP_FILES = {"ascii-art", "translate-me"}  # pictures, and a file of instructions to translators
MIN_LETTER_FRACTION = 0.6  # of non-space characters: drops ASCII-art and line-noise entries


def fix_mojibake(s: str) -> str:
    """UTF-8 bytes decoded as Latin-1 ("don\u00e2\u0080\u0099t"): undo it where a run decodes cleanly."""
    def fix(m: re.Match) -> str:
        try:
            return m.group(0).encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            return m.group(0)
    for _ in range(3):  # some text was mis-decoded twice
        s, before = re.sub("[\u00c2-\u00f4][\u0080-\u00bf]+", fix, s), s
        if s == before:
            break
    return s


def clean(entry: str) -> str | None:
    while "\x08" in entry:  # terminal overstrike ("___\x08\x08\x08not" underlines "not"): keep what shows last
        new = re.sub("[^\x08\n]\x08", "", entry)
        entry = new if new != entry else entry.replace("\x08", "")
    entry = unicodedata.normalize("NFC", fix_mojibake(entry))
    entry = "".join(c for c in entry if c in "\n\t" or unicodedata.category(c)[0] != "C")  # control chars
    lines = [re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in entry.split("\n")]
    lines = [line for line in lines if line]  # no blank line inside an entry: blank lines separate entries
    text = "\n".join(lines)
    visible = [c for c in text if not c.isspace()]
    if len(visible) < 8 or sum(c.isalpha() for c in visible) < MIN_LETTER_FRACTION * len(visible):
        return None
    return text


files = sorted(p for p in src.iterdir()
               if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")
               and p.name not in SKIP_FILES and "off" not in p.parts)
entries, seen, per_file, dropped = [], set(), {}, 0
for path in files:
    raw = path.read_bytes().decode("utf-8", errors="replace")
    kept = 0
    for chunk in re.split(r"^%[ \t]*$", raw.replace("\r\n", "\n"), flags=re.M):
        text = clean(chunk)
        if text is None or text in seen:
            dropped += chunk.strip() != ""
            continue
        seen.add(text)
        entries.append(text)
        kept += 1
    per_file[path.name] = kept

corpus = "\n\n".join(entries) + "\n"
out = out_dir / "fortunes.txt"
out.write_text(corpus, encoding="utf-8")
packages = [dict(zip(("name", "version", "deb", "sha256"), line.split("\t")))
            for line in packages_tsv.read_text().splitlines()]
info = {
    "source": "Debian packages (apt-get download), cleaned by tools/fetch_corpus.sh",
    "packages": packages,
    "files": per_file,
    "skipped_files": sorted(SKIP_FILES),
    "entries": len(entries),
    "dropped_entries": dropped,
    "bytes": len(corpus.encode("utf-8")),
    "sha256": hashlib.sha256(corpus.encode("utf-8")).hexdigest(),
}
(out_dir / "corpus.json").write_text(json.dumps(info, indent=2) + "\n")
print(f"fetch_corpus: {out}: {len(entries)} entries, {info['bytes']} bytes "
      f"(dropped {dropped} duplicate / non-text entries), sha256 {info['sha256']}")
print("fetch_corpus: packages: " + ", ".join(f"{p['name']} {p['version']}" for p in packages))
PY
