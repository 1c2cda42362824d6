"""The Parquet data contracts between stages (see the README's "Data contracts")."""
from __future__ import annotations

import pyarrow as pa

IGNORE_INDEX = 255  # mask value for pixels that count for no class

SAMPLES = pa.schema([
    ("image_id", pa.string()),
    ("split", pa.string()),
    ("image", pa.binary()),          # encoded JPEG/PNG bytes as stored
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("labels", pa.list_(pa.int16())),  # foreground class ids; background (0) never listed
    ("gt_mask", pa.binary()),        # nullable PNG, uint8 class ids, 255 = ignore
])

SEEDS = pa.schema([
    ("image_id", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("classes", pa.list_(pa.int16())),
    ("scores", pa.binary()),         # npy float16 or uint8 [len(classes), h, w]; resolution in dataset.json
])

MASKS = pa.schema([
    ("image_id", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("mask", pa.binary()),           # PNG uint8 class ids, 255 = ignore
])

AFFINITY_LABELS = pa.schema([
    ("image_id", pa.string()),
    ("height", pa.int32()),          # the image's, as in every table
    ("width", pa.int32()),
    ("labels", pa.binary()),         # PNG uint8 [ceil(height/8), ceil(width/8)]: 0 background, class ids,
])                                   # 255 = ignore (PSA's confident-region labels at the feature stride)

ERRORS = pa.schema([
    ("image_id", pa.string()),
    ("stage", pa.string()),
    ("error", pa.string()),
])

SCHEMAS = {"samples": SAMPLES, "seeds": SEEDS, "masks": MASKS, "affinity_labels": AFFINITY_LABELS,
           "errors": ERRORS}
DEFAULT_COMPRESSION = "snappy"  # pyarrow's default: images and masks are PNGs already
# Columns written with another Parquet codec: zstd packs small score arrays and their repeated npy headers.
COLUMN_COMPRESSION = {"seeds": {"scores": "zstd"}}


def compression(table: str | None, columns: list[str]) -> dict[str, str]:
    """The Parquet codec of each column of ``table`` (pyarrow's per-column ``compression``)."""
    special = COLUMN_COMPRESSION.get(table or "", {})
    return {name: special.get(name, DEFAULT_COMPRESSION) for name in columns}

# A batch UDF returns rows of its table plus this column: null on success, the reason otherwise.
# `split_errors` turns such a batch into the table rows and the errors rows.
ERROR_COLUMN = "_error"
