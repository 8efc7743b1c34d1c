"""The elastic step's displacement field at a fraction of albumentations' cost, from the same draws.

albumentations 2.x draws the field of ``ElasticTransform(alpha, sigma)`` as
white noise ``[2, H, W]`` (float32 standard normals from the transform's
generator), divided by its largest absolute value, blurred by a Gaussian of
standard deviation ``sigma`` (OpenCV's ``GaussianBlur``, automatic kernel
size, the two fields stacked as one ``[2H, W]`` plane with replicated
borders) and scaled by ``alpha``. At ``sigma = 50`` the blur is a 401-tap
filter over every pixel, about 11 ms a view, and most of the step's time.

The blur is linear, so it is a matrix on each axis: the ``[2H, W]`` plane ``N``
becomes ``Mv @ N @ Mh.T``, with the replicated border folded into the edge
columns of ``Mv`` and ``Mh``. A Gaussian this wide passes only the lowest
frequencies of a side a few hundred pixels long, so both matrices are of
very low numerical rank: their truncated singular value decompositions
(relative error below 1e-7) turn the blur into four thin float32 products,
about 0.1 ms. The noise is drawn exactly as albumentations draws it, so
the field is albumentations' field to float rounding (far below the 1/32
pixel step of OpenCV's remap) and a view's pixels do not change.

:class:`ElasticTransform` is albumentations' transform with this field; the
remap of image and mask is albumentations' own.
"""

from __future__ import annotations

from functools import lru_cache

import albumentations as A
import cv2
import numpy as np

_RANK_TOLERANCE = 1e-5  # singular values below this fraction of the largest are dropped


def opencv_kernel_size(sigma: float) -> int:
    """The kernel OpenCV's ``GaussianBlur`` picks for float images when the size is left at (0, 0)."""
    return int(round(sigma * 4 * 2 + 1)) | 1


def blur_matrix(*, length: int, sigma: float) -> np.ndarray:
    """[L, L] float64: OpenCV's 1-D Gaussian blur of a length-L line with replicated borders, as a matrix."""
    size = opencv_kernel_size(sigma)
    kernel = cv2.getGaussianKernel(size, sigma, cv2.CV_64F)[:, 0]
    half = size // 2
    rows = np.arange(length)[:, None]  # output index i reads x[clip(i + t - half)] with weight kernel[t]
    sources = np.clip(rows + np.arange(size)[None, :] - half, 0, length - 1)
    matrix = np.zeros((length, length))
    np.add.at(matrix, (np.broadcast_to(rows, sources.shape), sources), np.broadcast_to(kernel, sources.shape))
    return matrix


@lru_cache(maxsize=16)
def low_rank_blur(*, length: int, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """``(left [L, r], right [r, L])`` float32 with ``left @ right`` the blur matrix to 1e-7 of its norm."""
    u, s, vt = np.linalg.svd(blur_matrix(length=length, sigma=sigma))
    rank = max(1, int((s > s[0] * _RANK_TOLERANCE).sum()))
    return (np.ascontiguousarray(u[:, :rank] * s[:rank], np.float32),
            np.ascontiguousarray(vt[:rank], np.float32))


def prepare_blur(*, height: int, width: int, sigma: float) -> None:
    """Factor the blur of an H x W field now (a few tens of ms, once per process), not inside the first view."""
    low_rank_blur(length=2 * height, sigma=float(sigma))
    low_rank_blur(length=width, sigma=float(sigma))


def displacement_fields(*, shape: tuple[int, int], alpha: float, sigma: float,
                        random_generator: np.random.Generator) -> np.ndarray:
    """[2, H, W] float32 (dx, dy) in pixels, drawn as albumentations' ``generate_displacement_fields`` draws them.

    Its Gaussian noise, ``same_dxdy=False``, automatic kernel size; only the blur is computed another way.
    """
    height, width = shape
    fields = random_generator.standard_normal((2, height, width), dtype=np.float32)
    largest = float(np.abs(fields).max())
    if largest > 1e-6:
        fields /= largest
    left_v, right_v = low_rank_blur(length=2 * height, sigma=float(sigma))
    left_h, right_h = low_rank_blur(length=width, sigma=float(sigma))
    plane = fields.reshape(2 * height, width)  # albumentations blurs the two fields as one stacked plane
    # einsum's own loops, not BLAS: a few million multiply-adds, where a threaded BLAS only competes with the
    # other render processes for the cores.
    across = np.einsum("ij,kj->ik", plane, right_h, optimize=False)  # [2H, rh]
    core = np.einsum("ij,jk->ik", right_v, across, optimize=False)  # [rv, rh]
    rows = np.einsum("ij,jk->ik", left_v, core, optimize=False)  # [2H, rh]
    blurred = np.einsum("ik,lk->il", rows, left_h, optimize=False)  # [2H, W]
    blurred *= np.float32(alpha)
    return blurred.reshape(2, height, width)


class ElasticTransform(A.ElasticTransform):
    """albumentations' ``ElasticTransform`` whose Gaussian field is blurred by :func:`displacement_fields`."""

    def get_params_dependent_on_data(self, params, data):
        if self.approximate or self.same_dxdy or self.noise_distribution != "gaussian":
            return super().get_params_dependent_on_data(params, data)
        height, width = params["shape"][:2]
        dx, dy = displacement_fields(shape=(height, width), alpha=self.alpha, sigma=self.sigma,
                                     random_generator=self.random_generator)
        dx += np.arange(width, dtype=np.float32)[None, :]  # float32 sums, rounded as albumentations' float64 ones
        dy += np.arange(height, dtype=np.float32)[:, None]
        return {"map_x": dx, "map_y": dy}
