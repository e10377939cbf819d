"""Contact sheet of key images from several modalities, rendered from the real test corpus.

Run with::

    .venv/bin/python bench/contact_sheet.py            # writes docs/contact-sheet.png

Each cell is one key image exactly as ``render_study`` produces it (336 px longest side), captioned
with its label and window, so a reader can check polarity, windows and colour at a glance.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from workers.render import instances_from_files, render_study
from workers.render.headers import sort_paths
from workers.render_config import RenderSettings

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "data" / "dicom"

#: (study folder or file, how many of its key images to show)
STUDIES: list[tuple[str, int]] = [
    ("ct/wg04_CT1/CT1_J2KR.dcm", 2),  # chest CT: soft tissue + lung windows
    ("mr/series_dcm4che_wrist", 2),  # MR volume ordered by position
    ("cr_dx/fodicom_CR-MONO1-10-chest.dcm", 1),  # MONOCHROME1 chest radiograph
    ("us/dcm4che_YBR_FULL-RLE_thyroid.dcm", 1),  # YBR_FULL ultrasound
    ("us/dcm4che_US-PAL-8-10x-echo.dcm", 1),  # palette-colour echo cine
    ("sm/cmu1_small_region_pyramid", 2),  # whole slide: overview + high-magnification patch
    ("vl_pathology/wg04_VL1_RLE.dcm", 1),  # visible-light endoscopy
    ("vl_pathology/wg04_VL6_J2KR.dcm", 1),  # light microscopy, YBR_RCT
]

CELL = 336
CAPTION = 34


def build(settings: RenderSettings) -> Image.Image:
    cells: list[tuple[Image.Image, str]] = []
    for rel, count in STUDIES:
        rendered = render_study(instances_from_files(sort_paths([CORPUS / rel])), settings)
        for key in rendered.key_images[:count]:
            img = Image.open(io.BytesIO(key.png)).convert("RGB")
            caption = key.label if key.window is None else f"{key.label} | {key.window}"
            cells.append((img, caption))
    cols = 4
    rows = (len(cells) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * CELL, rows * (CELL + CAPTION)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=12)
    for n, (img, caption) in enumerate(cells):
        x = (n % cols) * CELL
        y = (n // cols) * (CELL + CAPTION)
        sheet.paste(img, (x + (CELL - img.width) // 2, y + (CELL - img.height) // 2))
        lines = [caption[:52], caption[52:104]]
        for k, line in enumerate(lines):
            draw.text((x + 4, y + CELL + 3 + 14 * k), line, fill=(235, 235, 235), font=font)
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "contact-sheet.png")
    args = parser.parse_args()
    sheet = build(RenderSettings())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")


if __name__ == "__main__":
    main()
