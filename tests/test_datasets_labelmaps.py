"""Label remaps (method.md §8, RV8)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import InputError
from stages.datasets.labelmaps import (
    CITYSCAPES27_CLASS_NAMES,
    COCO27_CLASS_NAMES,
    COCO_FINE_TO_COARSE,
    POTSDAM3_CLASS_NAMES,
    cityscapes_reference_remap,
    cityscapes_remap,
    coco_fine_to_coarse,
    folder_remap,
    label_uint8_roundtrip,
    potsdam_remap,
)

# Number of fine ids per coarse id, counted from the §8.1 table.
COCO_COUNTS = [6, 6, 10, 10, 8, 8, 8, 10, 6, 1, 10, 8, 2, 6, 4, 11, 4, 11, 7, 2, 6, 11, 9, 2, 6, 5, 5]
# (fine id, coarse id): every range end point and singleton of the §8.1 table.
COCO_SPOTS = {
    71: 0, 76: 0, 77: 1, 82: 1, 51: 2, 60: 2, 61: 3, 70: 3, 83: 4, 90: 4, 43: 5, 50: 5, 25: 6, 32: 6,
    15: 7, 24: 7, 9: 8, 14: 8, 0: 9, 33: 10, 42: 10, 1: 11, 8: 11, 101: 12, 102: 12, 100: 13, 113: 13,
    117: 13, 120: 14, 121: 14, 152: 14, 169: 14, 97: 15, 106: 15, 107: 15, 109: 15, 111: 15, 122: 15,
    129: 15, 132: 15, 155: 15, 160: 15, 164: 15, 99: 16, 131: 16, 138: 16, 142: 16, 91: 17, 92: 17,
    103: 17, 104: 17, 108: 17, 130: 17, 136: 17, 140: 17, 151: 17, 166: 17, 167: 17, 170: 18, 176: 18,
    179: 19, 180: 19, 94: 20, 95: 20, 127: 20, 150: 20, 157: 20, 165: 20, 110: 21, 124: 21, 125: 21,
    135: 21, 139: 21, 143: 21, 144: 21, 146: 21, 148: 21, 153: 21, 158: 21, 93: 22, 96: 22, 118: 22,
    123: 22, 128: 22, 133: 22, 141: 22, 162: 22, 168: 22, 105: 23, 156: 23, 126: 24, 134: 24, 149: 24,
    159: 24, 161: 24, 181: 24, 98: 25, 112: 25, 137: 25, 145: 25, 163: 25, 119: 26, 147: 26, 154: 26,
    177: 26, 178: 26,
}


def test_rv8_coco_fine_to_coarse_vector():
    fine = np.array([*range(182), 255], dtype=np.uint8)
    coarse = coco_fine_to_coarse(fine)
    assert coarse.dtype == np.int16 and coarse.shape == (183,)
    assert coarse[-1] == -1
    assert np.bincount(coarse[:-1], minlength=27).tolist() == COCO_COUNTS
    assert sum(COCO_COUNTS) == 182
    for f, c in COCO_SPOTS.items():
        assert coarse[f] == c, f"fine {f}"
    np.testing.assert_array_equal(coarse[:-1], COCO_FINE_TO_COARSE)
    # things are fine ids 0..90 -> coarse 0..11, stuff 91..181 -> 12..26
    assert coarse[:91].max() == 11 and coarse[91:182].min() == 12


def test_coco_unexpected_fine_ids_become_zero_and_names():
    np.testing.assert_array_equal(coco_fine_to_coarse(np.array([182, 200, 254], dtype=np.uint8)), [0, 0, 0])
    assert len(COCO27_CLASS_NAMES) == 27
    assert COCO27_CLASS_NAMES[9] == "person" and COCO27_CLASS_NAMES[23] == "sky"
    assert COCO27_CLASS_NAMES.count("food") == 2 and COCO27_CLASS_NAMES.count("furniture") == 2


def test_rv8_cityscapes():
    ids = np.array([*range(34), 255], dtype=np.uint8)
    ref = cityscapes_reference_remap(ids)
    assert ref.tolist() == [-1] * 7 + list(range(27)) + [248]
    assert cityscapes_remap(ids).tolist() == [-1] * 7 + list(range(27)) + [-1]
    assert len(CITYSCAPES27_CLASS_NAMES) == 27
    assert CITYSCAPES27_CLASS_NAMES[0] == "road" and CITYSCAPES27_CLASS_NAMES[-1] == "bicycle"
    assert CITYSCAPES27_CLASS_NAMES[11] == "polegroup"  # labelId 18


def test_rv8_potsdam():
    gt = np.array([0, 1, 2, 3, 4, 5, 255, 7], dtype=np.int32)
    assert potsdam_remap(gt).tolist() == [0, 1, 2, 2, 0, 1, -1, 0]
    assert len(POTSDAM3_CLASS_NAMES) == 3


def test_folder_remap_ignores_out_of_range():
    lab = np.array([[0, 1, 2], [3, 255, 4]], dtype=np.uint8)
    assert folder_remap(lab, 3).tolist() == [[0, 1, 2], [-1, -1, -1]]


def test_label_uint8_roundtrip():
    lab = np.array([-1, 0, 26, 248, 255], dtype=np.int16)
    assert label_uint8_roundtrip(lab).tolist() == [-1, 0, 26, 248, -1]  # 255 + 1 wraps to 0 -> -1


def test_non_integer_or_out_of_range_labels_are_input_errors():
    with pytest.raises(InputError, match="integer"):
        coco_fine_to_coarse(np.zeros(3, dtype=np.float32))
    with pytest.raises(InputError, match="0..255"):
        cityscapes_remap(np.array([300], dtype=np.int32))
