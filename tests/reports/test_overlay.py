import struct
import zlib

import nibabel as nib
import numpy as np

from bids_cadiff.labels import SYNTHSEG32
from bids_cadiff.reports.overlay import overlay_montage, overlay_png, png_bytes


def _decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        crc = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0]
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(height, width, 3)


def test_png_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decode_png(png_bytes(rgb)), rgb)


def test_overlay_colours_labels_and_keeps_lpi_images_upright(tmp_path):
    data = np.zeros((20, 24, 18), np.float32)
    data[4:16, 4:20, 4:14] = 100
    labels = np.zeros(data.shape, np.int16)
    labels[4:10, 4:20, 4:14] = 2  # left WM (RAS x small) : colour #f5f5f5
    labels[10:16, 4:20, 4:14] = 17  # hippocampus colour #dcd814
    lpi = np.diag([-1.0, 1.0, -1.0, 1.0])  # stored left-right and up-down flipped
    img = nib.Nifti1Image(data[::-1, :, ::-1].copy(), lpi)
    montage = overlay_montage(img, labels[::-1, :, ::-1], SYNTHSEG32, tile=64)
    assert montage.shape == (3 * 64, 3 * 64, 3) and montage.dtype == np.uint8
    coronal = montage[64:128, 64:128].astype(int)
    yellow = (coronal[..., 2] < coronal[..., 1] - 60)  # hippocampus tint: blue well below green
    cols = np.nonzero(yellow.any(axis=0))[0]
    assert cols.size and cols.min() > 20  # hippocampus (RAS right half) drawn on the right
    out = overlay_png(img, labels[::-1, :, ::-1], SYNTHSEG32, tmp_path / "f" / "x.png")
    assert _decode_png(out.read_bytes()).shape == (768, 768, 3)
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["x.png"]
