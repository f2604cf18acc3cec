"""Label remaps of the reference datasets (method.md §8, RV8). Pure: arrays in, int16 arrays out, -1 = ignore."""
from __future__ import annotations

import numpy as np

from pipeline.errors import InputError

IGNORE = -1

# --- cocostuff27: 182 fine COCO-Stuff ids -> 27 coarse classes (§8.1) -----------------------------
_COCO_COARSE_SOURCES: tuple[tuple[str, tuple[int | tuple[int, int], ...]], ...] = (
    ("electronic", ((71, 76),)),
    ("appliance", ((77, 82),)),
    ("food", ((51, 60),)),
    ("furniture", ((61, 70),)),
    ("indoor", ((83, 90),)),
    ("kitchen", ((43, 50),)),
    ("accessory", ((25, 32),)),
    ("animal", ((15, 24),)),
    ("outdoor", ((9, 14),)),
    ("person", (0,)),
    ("sports", ((33, 42),)),
    ("vehicle", ((1, 8),)),
    ("ceiling", ((101, 102),)),
    ("floor", (100, (113, 117))),
    ("food", ((120, 121), 152, 169)),
    ("furniture", (97, (106, 107), 109, 111, 122, 129, 132, 155, 160, 164)),
    ("rawmaterial", (99, 131, 138, 142)),
    ("textile", ((91, 92), (103, 104), 108, 130, 136, 140, 151, (166, 167))),
    ("wall", ((170, 176),)),
    ("window", ((179, 180),)),
    ("building", ((94, 95), 127, 150, 157, 165)),
    ("ground", (110, (124, 125), 135, 139, (143, 144), 146, 148, 153, 158)),
    ("plant", (93, 96, 118, 123, 128, 133, 141, 162, 168)),
    ("sky", (105, 156)),
    ("solid", (126, 134, 149, 159, 161, 181)),
    ("structural", (98, 112, 137, 145, 163)),
    ("water", (119, 147, 154, (177, 178))),
)

#: Names of the 27 coarse classes in index order ("food" and "furniture" appear twice, as in the reference).
COCO27_CLASS_NAMES: list[str] = [name for name, _ in _COCO_COARSE_SOURCES]


def _build_coco_fine_to_coarse() -> np.ndarray:
    table = np.full(182, -2, dtype=np.int16)
    for coarse, (_, sources) in enumerate(_COCO_COARSE_SOURCES):
        for src in sources:
            lo, hi = (src, src) if isinstance(src, int) else src
            if np.any(table[lo : hi + 1] != -2):
                raise RuntimeError(f"cocostuff map: fine ids {lo}..{hi} assigned twice")
            table[lo : hi + 1] = coarse
    if np.any(table == -2):
        raise RuntimeError(f"cocostuff map: fine ids {np.flatnonzero(table == -2).tolist()} unassigned")
    return table


#: ``COCO_FINE_TO_COARSE[f]`` = coarse class of fine id ``f`` (0..181).
COCO_FINE_TO_COARSE: np.ndarray = _build_coco_fine_to_coarse()

# Full uint8 lookup: 0..181 -> coarse, 255 -> ignore, anything else -> 0 (the reference's default).
_COCO_LUT = np.zeros(256, dtype=np.int16)
_COCO_LUT[:182] = COCO_FINE_TO_COARSE
_COCO_LUT[255] = IGNORE


def _check_range(label: np.ndarray, what: str, lo: int, hi: int) -> None:
    if not np.issubdtype(label.dtype, np.integer):
        raise InputError(f"{what}: label array must be integer, got {label.dtype}")
    if label.size and (int(label.min()) < lo or int(label.max()) > hi):
        raise InputError(
            f"{what}: label values must lie in {lo}..{hi}, got {int(label.min())}..{int(label.max())}"
        )


def coco_fine_to_coarse(fine: np.ndarray) -> np.ndarray:
    """COCO-Stuff fine ids (0..181, 255 = unlabeled) -> 27 coarse ids; 255 -> -1, 182..254 -> 0."""
    _check_range(fine, "cocostuff27", 0, 255)
    return _COCO_LUT[fine.astype(np.intp)]


# --- cityscapes: 27 classes = labelIds 7..33 (§8.2) ----------------------------------------------
# Names of Cityscapes labelIds 7..33 in id order (the official label table of cityscapesScripts'
# helpers/labels.py); kept here to avoid the package's obsolete `typing` backport dependency.
CITYSCAPES27_CLASS_NAMES: list[str] = [
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail",
    "bridge", "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train",
    "motorcycle", "bicycle",
]  # fmt: skip
CITYSCAPES_FIRST_ID = 7


def cityscapes_reference_remap(label_ids: np.ndarray) -> np.ndarray:
    """The reference's map exactly: ``labelId - 7``, negatives -> -1 (255 -> 248, left for metrics)."""
    _check_range(label_ids, "cityscapes", 0, 255)
    out = label_ids.astype(np.int16) - CITYSCAPES_FIRST_ID
    out[out < 0] = IGNORE
    return out


def cityscapes_remap(label_ids: np.ndarray) -> np.ndarray:
    """Cityscapes labelIds -> 27 classes (ids 7..33 -> 0..26); everything else -> -1."""
    out = cityscapes_reference_remap(label_ids)
    out[out >= len(CITYSCAPES27_CLASS_NAMES)] = IGNORE
    return out


# --- potsdam-3 (§8.3) ----------------------------------------------------------------------------
POTSDAM3_CLASS_NAMES: list[str] = ["roads and cars", "buildings and clutter", "trees and vegetation"]
_POTSDAM_FINE_TO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2, 255: IGNORE}


def potsdam_remap(gt: np.ndarray) -> np.ndarray:
    """Potsdam 6-class gt -> 3 classes: {0,4}->0, {1,5}->1, {2,3}->2, 255->-1, any other value -> 0."""
    if not np.issubdtype(gt.dtype, np.integer):
        raise InputError(f"potsdam: gt array must be integer, got {gt.dtype}")
    out = np.zeros(gt.shape, dtype=np.int16)
    for fine, coarse in _POTSDAM_FINE_TO_COARSE.items():
        out[gt == fine] = coarse
    return out


# --- folder / directory datasets (§8.4) ----------------------------------------------------------
def folder_remap(label: np.ndarray, n_classes: int) -> np.ndarray:
    """Pixel value = class id; values >= n_classes (or negative) -> -1."""
    if not np.issubdtype(label.dtype, np.integer):
        raise InputError(f"folder: label array must be integer, got {label.dtype}")
    big = label.astype(np.int64)
    return np.where((big >= 0) & (big < n_classes), big, IGNORE).astype(np.int16)


def label_uint8_roundtrip(label: np.ndarray) -> np.ndarray:
    """The reference five-crop label storage: write ``uint8(label + 1)``, read back ``- 1`` (wraps mod 256)."""
    stored = (label.astype(np.int64) + 1).astype(np.uint8)
    return stored.astype(np.int16) - 1
