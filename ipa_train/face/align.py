"""5-point similarity alignment (InsightFace's `norm_crop`) and the two image resamplers the pipeline needs, in numpy.

`warp_affine` is OpenCV's own bilinear warpAffine kernel (single-precision map `src = M^-1 dst`, fused multiply-add for
the column term, lerp along x then y, round half to even, zero border), so the crops equal `cv2.warpAffine(...,
borderValue=0)` byte for byte when OpenCV runs its own kernel (IPP builds can differ by one level on a few pixels
whose value lands on .5). `resize_bilinear` maps pixel centres and weights as `cv2.resize(INTER_LINEAR)` does.
"""

from __future__ import annotations

import numpy as np

# ArcFace's canonical landmark positions in a 112x112 crop: eyes, nose tip, mouth corners (x, y).
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655],
                        [70.7299, 92.2041]], dtype=np.float32)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src [N, 2] onto dst [N, 2] (Umeyama 1991),
    as a 2x3 float64 matrix.

    The sums run in the inputs' own precision (float32 landmarks stay float32 until the final matrix), which is
    what the reference implementation does; computing them in float64 instead moves the matrix by ~1e-5.
    """
    src, dst = np.asarray(src), np.asarray(dst)
    n, dim = src.shape
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / n
    d = np.ones(dim, dtype=np.float64)
    if np.linalg.det(cov) < 0:
        d[-1] = -1
    u, s, vt = np.linalg.svd(cov)
    rank = int(np.count_nonzero(s > s.max() * max(cov.shape) * np.finfo(float).eps))
    if rank == 0:
        raise ValueError("degenerate landmarks: all points coincide")
    if rank == dim - 1 and np.linalg.det(u) * np.linalg.det(vt) > 0:
        rot = (u @ vt).astype(np.float64)
    elif rank == dim - 1:
        d_last = d.copy()
        d_last[-1] = -1
        rot = u @ np.diag(d_last) @ vt
    else:
        rot = u @ np.diag(d) @ vt
    scale = 1.0 / src_c.var(axis=0).sum() * (s @ d)
    out = np.zeros((2, 3), dtype=np.float64)
    out[:, 2] = dst_mean - scale * (rot @ src_mean.T)
    out[:, :2] = rot * scale
    return out


def estimate_norm(kps: np.ndarray, size: int = 112) -> np.ndarray:
    """The 2x3 matrix taking the 5 landmarks onto ArcFace's template scaled to `size`.

    Sizes that are multiples of 112 scale the 112 template; multiples of 128 scale it by size/128 and shift it right by
    8 * size/128 (so 256 frames the face differently from 224).
    """
    if size % 112 == 0:
        ratio, shift = size / 112.0, 0.0
    elif size % 128 == 0:
        ratio, shift = size / 128.0, 8.0 * size / 128.0
    else:
        raise ValueError(f"crop size {size} must be a multiple of 112 or 128 (112, 224, 256, 336, ...)")
    dst = ARCFACE_DST * ratio  # float32, as the template
    dst[:, 0] += shift
    return similarity_transform(np.asarray(kps).reshape(5, 2), dst)


def _fma32(a, b, c) -> np.ndarray:
    """a * b + c rounded once to float32 (the float64 product of two float32 values is exact)."""
    a, b, c = np.broadcast_arrays(np.float32(a) if np.isscalar(a) else a, b, c)
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def _invert_affine(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
    det = 1.0 / det if det != 0 else 0.0
    a, b, c, d = m[1, 1] * det, -m[0, 1] * det, -m[1, 0] * det, m[0, 0] * det
    return np.array([a, b, -a * m[0, 2] - b * m[1, 2], c, d, -c * m[0, 2] - d * m[1, 2]])


def warp_affine(image: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """uint8 image [H, W, C] warped by the forward matrix m (src -> dst) into a size x size crop, zero outside."""
    inv = _invert_affine(m).astype(np.float32)
    ys = np.arange(size, dtype=np.float32)[:, None]
    xs = np.arange(size, dtype=np.float32)[None, :]
    row_x = (ys * inv[1]).astype(np.float32) + inv[2]  # per row: y * M1 + M2, two float32 roundings
    row_y = (ys * inv[4]).astype(np.float32) + inv[5]
    sx = _fma32(inv[0], xs, row_x)  # [size, size]
    sy = _fma32(inv[3], xs, row_y)
    ix, iy = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    ax = (sx - ix.astype(np.float32))[..., None]
    ay = (sy - iy.astype(np.float32))[..., None]
    h, w = image.shape[:2]
    src = image.astype(np.float32)

    def pixel(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
        values = src[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)]
        return np.where(inside[..., None], values, np.float32(0))

    p00, p01, p10, p11 = pixel(iy, ix), pixel(iy, ix + 1), pixel(iy + 1, ix), pixel(iy + 1, ix + 1)
    top = _fma32(ax, p01 - p00, p00)
    bottom = _fma32(ax, p11 - p10, p10)
    out = _fma32(ay, bottom - top, top)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def norm_crop(image: np.ndarray, kps: np.ndarray, size: int = 112) -> np.ndarray:
    """The face aligned on ArcFace's template at `size` (112 for the recognizer; 224/256 for the plus variants)."""
    return warp_affine(image, estimate_norm(kps, size), size)


def _resize_coefficients(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source index pairs and their 11-bit fixed-point weights per output pixel (pixel centres aligned)."""
    f = ((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    f = (f - i0).astype(np.float32)
    f = np.where(i0 < 0, np.float32(0), f)
    i0 = np.maximum(i0, 0)
    f = np.where(i0 >= n_in - 1, np.float32(0), f)
    i0 = np.minimum(i0, n_in - 1)
    w1 = np.rint(f.astype(np.float64) * 2048).astype(np.int64)
    w0 = np.rint((np.float32(1) - f).astype(np.float64) * 2048).astype(np.int64)
    return i0, np.minimum(i0 + 1, n_in - 1), w0, w1


def resize_bilinear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, C] -> [height, width, C] as cv2.resize(INTER_LINEAR): centre-aligned, edges clamped, 11-bit
    fixed-point weights (within one level of OpenCV on a few pixels; it only feeds the detector)."""
    h, w = image.shape[:2]
    x0, x1, a0, a1 = _resize_coefficients(width, w)
    y0, y1, b0, b1 = _resize_coefficients(height, h)
    src = image.astype(np.int64)
    rows = src[:, x0] * a0[None, :, None] + src[:, x1] * a1[None, :, None]  # [h, width, C], scale 2^11
    r0, r1 = rows[y0], rows[y1]
    acc = ((r0 >> 4) * b0[:, None, None] >> 16) + ((r1 >> 4) * b1[:, None, None] >> 16)
    return np.clip((acc + 2) >> 2, 0, 255).astype(np.uint8)
