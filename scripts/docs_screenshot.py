#!/usr/bin/env python3
"""Make docs/ohif-medlsam.png from the OHIF end-to-end test's page screenshot (a small crop).

    python scripts/docs_screenshot.py [build/artifacts/ohif/page-after.png]
"""

import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else REPO / "build" / "artifacts" / "ohif" / "page-after.png"
    if not source.exists():
        raise SystemExit(f"{source} not found: run the OHIF test first (pytest tests/test_dicomweb.py -k ohif)")
    page = Image.open(source).convert("RGB")
    width, height = page.size
    # the three viewports plus the MONAI Label panel, without the study list and the footer banner
    crop = page.crop((int(width * 0.20), int(height * 0.055), width, int(height * 0.80)))
    crop = crop.resize((crop.width * 3 // 4, crop.height * 3 // 4), Image.LANCZOS)
    out = REPO / "docs" / "ohif-medlsam.png"
    crop.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"{out}: {crop.size[0]}x{crop.size[1]}, {out.stat().st_size // 1024} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
