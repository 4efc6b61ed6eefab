"""2-D CT geometry, the sparse system matrix, filtered back-projection and fan->parallel rebinning.

Image convention (one CT slice, as `Volume.array[z]`): a `(H, W)` array indexed `[row, col]`,
pixel size `pixel_size_mm` (square), rotation centre at the geometric centre of the grid.
Coordinates in mm: `x = (col - (W-1)/2) * pixel_size` (patient Left in LPS), `y = (row - (H-1)/2)
* pixel_size` (patient Posterior).

Parallel ray `(theta, t)`: the line `{p : p . e_t = t}` with `e_t = (cos theta, -sin theta)` in
(x, y); it runs along `e_s = (sin theta, cos theta)`. At theta = 0 rays run down the columns
(along +y) and `t = x`. This is exactly `skimage.transform.radon(image, theta=degrees(theta))`
for an odd-sized image (skimage puts its centre at `n // 2`, which is the geometric centre only
when n is odd). Detector element `k` sits at `t_k = (k - (n_det-1)/2) * det_spacing_mm`.

Fan ray `(beta, gamma)`: source at `-source_to_iso_mm * e_s(beta)`; the ray at fan angle gamma is
the parallel ray `theta = beta + gamma`, `t = source_to_iso_mm * sin(gamma)`; equiangular detector,
`gamma_k = (k - (n_det-1)/2) * det_spacing` (radians).

Units: attenuation `mu` in 1/mm, matrix weights in mm, line integrals dimensionless.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Union

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["ParallelBeam", "FanBeam", "Geometry", "Projector", "fbp", "filter_sinogram", "FILTERS"]

FILTERS = ("ramp", "shepp-logan", "hann")


@dataclass(frozen=True)
class ParallelBeam:
    """Parallel-beam geometry.

    n_angles views at `theta_j = j * angle_range / n_angles` (radians, endpoint excluded);
    n_det detector elements spaced `det_spacing_mm` (mm), centred on the rotation axis.
    angle_range is pi (the usual half scan) or 2*pi.
    """

    n_angles: int
    n_det: int
    det_spacing_mm: float = 1.0
    angle_range: float = math.pi

    def angles(self) -> np.ndarray:
        """View angles theta (radians), shape (n_angles,)."""
        return np.arange(self.n_angles, dtype=np.float64) * (self.angle_range / self.n_angles)

    def det_positions(self) -> np.ndarray:
        """Detector coordinates t (mm), shape (n_det,)."""
        return (np.arange(self.n_det, dtype=np.float64) - (self.n_det - 1) / 2) * self.det_spacing_mm

    def ray_params(self) -> tuple[np.ndarray, np.ndarray]:
        """(theta, t) of every ray, flattened view-major: shape (n_angles * n_det,) each."""
        th, t = np.meshgrid(self.angles(), self.det_positions(), indexing="ij")
        return th.ravel(), t.ravel()


@dataclass(frozen=True)
class FanBeam:
    """Fan-beam geometry with an equiangular (arc) detector.

    n_angles source positions `beta_j = j * angle_range / n_angles` (radians); n_det detector
    elements `det_spacing` radians apart (fan angle), centred on the central ray.
    source_to_iso_mm: source to rotation axis; source_to_det_mm: source to detector arc (it
    sets the physical element pitch, `det_spacing * source_to_det_mm`, and nothing else here).
    Full scans (angle_range = 2*pi) are required for `fbp` (rebinning); forward/adjoint work for
    any range.
    """

    n_angles: int
    n_det: int
    det_spacing: float
    source_to_iso_mm: float
    source_to_det_mm: float
    angle_range: float = 2 * math.pi

    def angles(self) -> np.ndarray:
        """Source angles beta (radians), shape (n_angles,)."""
        return np.arange(self.n_angles, dtype=np.float64) * (self.angle_range / self.n_angles)

    def fan_angles(self) -> np.ndarray:
        """Fan angles gamma (radians), shape (n_det,)."""
        return (np.arange(self.n_det, dtype=np.float64) - (self.n_det - 1) / 2) * self.det_spacing

    def ray_params(self) -> tuple[np.ndarray, np.ndarray]:
        """Equivalent parallel (theta, t) of every ray, view-major: theta = beta + gamma,
        t = source_to_iso_mm * sin(gamma)."""
        b, g = np.meshgrid(self.angles(), self.fan_angles(), indexing="ij")
        return (b + g).ravel(), (self.source_to_iso_mm * np.sin(g)).ravel()

    def rebinned_geometry(self) -> ParallelBeam:
        """The parallel geometry `fbp` rebins to: same number of views over 2*pi, detector pitch
        `source_to_iso_mm * det_spacing`, covering the fan's field of view."""
        dt = self.source_to_iso_mm * self.det_spacing
        t_max = self.source_to_iso_mm * math.sin(abs(self.fan_angles()[0]))
        return ParallelBeam(self.n_angles, 2 * int(math.floor(t_max / dt + 1e-9)) + 1, dt, 2 * math.pi)


Geometry = Union[ParallelBeam, FanBeam]


# --------------------------------------------------------------------------- sparse operators

class _SparseOp:
    """A fixed sparse matrix (scipy CSR, float32 on CPU) plus lazily built transpose and
    per-(dtype, device) torch CSR copies (int32 indices)."""

    def __init__(self, csr: sp.csr_matrix):
        self._csr = {False: csr}
        self._torch: dict = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self._csr[False].shape

    def scipy(self, transpose: bool = False) -> sp.csr_matrix:
        if transpose not in self._csr:
            self._csr[True] = self._csr[False].T.tocsr()
        return self._csr[transpose]

    def torch(self, transpose: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (transpose, dtype, str(device))
        if key not in self._torch:
            m = self.scipy(transpose)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                self._torch[key] = torch.sparse_csr_tensor(
                    torch.from_numpy(m.indptr.astype(np.int32, copy=False)),
                    torch.from_numpy(m.indices.astype(np.int32, copy=False)),
                    torch.from_numpy(m.data).to(dtype),
                    size=m.shape, check_invariants=False,
                ).to(device)
        return self._torch[key]


class _SparseMatmul(torch.autograd.Function):
    """y = M x (or M^T x) for a fixed sparse M; backward applies the other one."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, op: _SparseOp, transpose: bool) -> torch.Tensor:
        ctx.op, ctx.transpose = op, transpose
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return op.torch(transpose, x2d.dtype, x2d.device) @ x2d.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _SparseMatmul.apply(grad, ctx.op, not ctx.transpose), None, None


def _apply(op: _SparseOp, x: torch.Tensor, transpose: bool, out_shape: tuple[int, ...]) -> torch.Tensor:
    """Apply to a batch (B, *in_shape) -> (B, *out_shape)."""
    b = x.shape[0]
    y = _SparseMatmul.apply(x.reshape(b, -1).transpose(0, 1), op, transpose)
    return y.transpose(0, 1).reshape(b, *out_shape)


def _csr_from_chunks(n_rows: int, n_cols: int, counts, cols, vals) -> sp.csr_matrix:
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.concatenate(counts), out=indptr[1:])
    idx_dtype = np.int32 if indptr[-1] < 2**31 - 1 else np.int64
    m = sp.csr_matrix((np.concatenate(vals), np.concatenate(cols).astype(idx_dtype, copy=False),
                       indptr.astype(idx_dtype)), shape=(n_rows, n_cols))
    return m


def _joseph_matrix(theta: np.ndarray, t: np.ndarray, shape: tuple[int, int], ps: float,
                   chunk: int = 4096) -> sp.csr_matrix:
    """Joseph's method: rows = rays (theta, t), columns = pixels (row-major), weights in mm.

    A ray steps through the image one row at a time when it runs closer to the y axis
    (|cos theta| >= |sin theta|), otherwise one column at a time; at each step the image is
    linearly interpolated between the two neighbouring pixels of that row (column) and weighted
    by the path length per step, ps / |cos| (ps / |sin|). Vectorised over chunks of rays.
    """
    H, W = shape
    S = max(H, W)
    counts, cols, vals = [], [], []
    k = np.arange(S, dtype=np.float64)
    for r0 in range(0, theta.size, chunk):
        th, tt = theta[r0:r0 + chunk], t[r0:r0 + chunk]
        c, s = np.cos(th), np.sin(th)
        rowstep = np.abs(c) >= np.abs(s)
        a = np.where(rowstep, s, c)                    # secondary = (t' + primary * a) / b
        b = np.where(rowstep, c, s)
        tp = np.where(rowstep, tt, -tt)
        n_p = np.where(rowstep, H, W)[:, None]         # steps along the primary axis
        n_q = np.where(rowstep, W, H)[:, None]
        stride_p = np.where(rowstep, W, 1)[:, None]
        stride_q = np.where(rowstep, 1, W)[:, None]
        prim = (k[None, :] - (n_p - 1) / 2) * ps       # (n, S) mm
        u = (tp[:, None] + prim * a[:, None]) / b[:, None] / ps + (n_q - 1) / 2
        q0 = np.floor(u)
        f = u - q0
        q0 = q0.astype(np.int64)
        L = (ps / np.abs(b))[:, None]
        kk = np.broadcast_to(k[None, :].astype(np.int64), u.shape)
        inside = kk < n_p
        q = np.stack([q0, q0 + 1], axis=-1)             # (n, S, 2)
        w = np.stack([(1 - f) * L, f * L], axis=-1)
        valid = inside[..., None] & (q >= 0) & (q < n_q[..., None]) & (w > 0)
        pix = kk[..., None] * stride_p[..., None] + q * stride_q[..., None]
        counts.append(valid.reshape(valid.shape[0], -1).sum(1))
        cols.append(pix[valid].astype(np.int32))
        vals.append(w[valid].astype(np.float32))
    return _csr_from_chunks(theta.size, H * W, counts, cols, vals)


def _pixel_backprojection_matrix(geom: ParallelBeam, shape: tuple[int, int], ps: float,
                                 chunk: int = 2048) -> sp.csr_matrix:
    """Pixel-driven back-projector: rows = pixels, columns = rays; for every view the sinogram is
    linearly interpolated at t = x cos(theta) - y sin(theta). Weights are pure interpolation
    weights (no angular step). Used by `fbp` (as `iradon` does), not as an adjoint."""
    H, W = shape
    th = geom.angles()
    c, s = np.cos(th), np.sin(th)
    yy, xx = np.meshgrid((np.arange(H) - (H - 1) / 2) * ps, (np.arange(W) - (W - 1) / 2) * ps, indexing="ij")
    xx, yy = xx.ravel(), yy.ravel()
    base = (np.arange(geom.n_angles, dtype=np.int64) * geom.n_det)[None, :, None]
    counts, cols, vals = [], [], []
    for p0 in range(0, H * W, chunk):
        u = (xx[p0:p0 + chunk, None] * c[None] - yy[p0:p0 + chunk, None] * s[None]) / geom.det_spacing_mm \
            + (geom.n_det - 1) / 2
        k0 = np.floor(u)
        f = u - k0
        k = np.stack([k0, k0 + 1], axis=-1).astype(np.int64)   # (P, A, 2)
        w = np.stack([1 - f, f], axis=-1)
        valid = (k >= 0) & (k < geom.n_det) & (w > 0)
        counts.append(valid.reshape(valid.shape[0], -1).sum(1))
        cols.append((base + k)[valid].astype(np.int32))
        vals.append(w[valid].astype(np.float32))
    return _csr_from_chunks(H * W, geom.n_angles * geom.n_det, counts, cols, vals)


def _rebin_matrix(fan: FanBeam) -> sp.csr_matrix:
    """Fan (beta, gamma) -> parallel (theta, t) bilinear interpolation, periodic in beta."""
    par = fan.rebinned_geometry()
    th, t = par.ray_params()
    g = np.arcsin(np.clip(t / fan.source_to_iso_mm, -1, 1))
    beta = th - g
    db = fan.angle_range / fan.n_angles
    bi = beta / db
    gi = g / fan.det_spacing + (fan.n_det - 1) / 2
    b0, g0 = np.floor(bi), np.floor(gi)
    fb, fg = bi - b0, gi - g0
    rows, cols, vals = [], [], []
    ray = np.arange(th.size)
    for db_, wb in ((0, 1 - fb), (1, fb)):
        for dg_, wg in ((0, 1 - fg), (1, fg)):
            bb = (b0.astype(np.int64) + db_) % fan.n_angles
            gg = g0.astype(np.int64) + dg_
            w = wb * wg
            ok = (gg >= 0) & (gg < fan.n_det) & (w > 0)
            rows.append(ray[ok]); cols.append(bb[ok] * fan.n_det + gg[ok]); vals.append(w[ok])
    return sp.coo_matrix((np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(th.size, fan.n_angles * fan.n_det)).tocsr()


@functools.lru_cache(maxsize=8)
def _system_op(geom: Geometry, shape: tuple[int, int], ps: float) -> _SparseOp:
    return _SparseOp(_joseph_matrix(*geom.ray_params(), shape, ps))


@functools.lru_cache(maxsize=8)
def _backprojection_op(geom: ParallelBeam, shape: tuple[int, int], ps: float) -> _SparseOp:
    return _SparseOp(_pixel_backprojection_matrix(geom, shape, ps))


@functools.lru_cache(maxsize=8)
def _rebin_op(geom: FanBeam) -> _SparseOp:
    return _SparseOp(_rebin_matrix(geom))


# --------------------------------------------------------------------------- Projector

def _as_batch(x, ndim: int, device: torch.device) -> tuple[torch.Tensor, bool]:
    x = torch.as_tensor(x, device=device)
    if not x.is_floating_point():
        x = x.float()
    if x.dim() == ndim:
        return x.unsqueeze(0), True
    if x.dim() != ndim + 1:
        raise ValueError(f"expected {ndim} or {ndim + 1} dimensions, got shape {tuple(x.shape)}")
    return x, False


class Projector:
    """CT forward projector for one geometry and image grid, with its exact adjoint.

    `forward(mu)`: (H, W) or (B, H, W) attenuation in 1/mm -> line integrals (n_angles, n_det)
    or (B, n_angles, n_det), dimensionless. `adjoint(sino)` is the exact transpose. Both are
    differentiable (each one's backward is the other) and work on the projector's device in
    float32 or float64. The sparse matrix (Joseph's method) is built once per
    (geometry, image_shape, pixel_size_mm) and cached for the process; `.to(device)` is cheap.
    """

    def __init__(self, geometry: Geometry, image_shape: tuple[int, int], pixel_size_mm: float = 1.0,
                 device: str | torch.device = "cpu"):
        if not isinstance(geometry, (ParallelBeam, FanBeam)):
            raise TypeError(f"geometry must be ParallelBeam or FanBeam, got {type(geometry).__name__}")
        self.geometry = geometry
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.pixel_size_mm = float(pixel_size_mm)
        self.device = torch.device(device)
        if isinstance(geometry, FanBeam):
            half_diag = 0.5 * math.hypot(*self.image_shape) * self.pixel_size_mm
            if geometry.source_to_iso_mm <= half_diag:
                raise ValueError(f"source_to_iso_mm {geometry.source_to_iso_mm} lies inside the image "
                                 f"(half diagonal {half_diag:.1f} mm)")
        self._op = _system_op(geometry, self.image_shape, self.pixel_size_mm)

    @property
    def sino_shape(self) -> tuple[int, int]:
        return (self.geometry.n_angles, self.geometry.n_det)

    def to(self, device: str | torch.device) -> "Projector":
        return Projector(self.geometry, self.image_shape, self.pixel_size_mm, device)

    def forward(self, mu) -> torch.Tensor:
        """Line integrals of `mu` (1/mm): (H, W) -> (n_angles, n_det), (B, H, W) -> (B, n_angles, n_det)."""
        x, single = _as_batch(mu, 2, self.device)
        if tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"image shape {tuple(x.shape[1:])} != projector's {self.image_shape}")
        y = _apply(self._op, x, False, self.sino_shape)
        return y[0] if single else y

    __call__ = forward

    def adjoint(self, sino) -> torch.Tensor:
        """Exact transpose of `forward`: (.., n_angles, n_det) -> (.., H, W); units mm per unit sinogram."""
        y, single = _as_batch(sino, 2, self.device)
        if tuple(y.shape[1:]) != self.sino_shape:
            raise ValueError(f"sinogram shape {tuple(y.shape[1:])} != projector's {self.sino_shape}")
        x = _apply(self._op, y, True, self.image_shape)
        return x[0] if single else x

    def rebin_to_parallel(self, sino) -> torch.Tensor:
        """Fan sinogram (.., n_angles, n_det) -> parallel sinogram on `geometry.rebinned_geometry()`
        (bilinear in (beta, gamma), differentiable). Needs a full 2*pi fan scan."""
        g = self.geometry
        if not isinstance(g, FanBeam):
            raise TypeError("rebin_to_parallel needs a FanBeam projector")
        if abs(g.angle_range - 2 * math.pi) > 1e-9:
            raise ValueError("fan->parallel rebinning needs a full 2*pi scan (short scans are not supported)")
        y, single = _as_batch(sino, 2, self.device)
        par = g.rebinned_geometry()
        out = _apply(_rebin_op(g), y, False, (par.n_angles, par.n_det))
        return out[0] if single else out


# --------------------------------------------------------------------------- FBP

@functools.lru_cache(maxsize=32)
def _filter_np(n_det: int, window: str) -> tuple[int, np.ndarray]:
    """Ramp filter for unit detector pitch, built from the band-limited spatial kernel
    (h[0] = 1/4, h[odd n] = -1/(pi n)^2; Kak & Slaney eq. 3.61) zero-padded to P >= 2 n_det,
    times an apodisation window. Returns (P, rfft-domain real filter of length P//2 + 1)."""
    P = max(64, int(2 ** math.ceil(math.log2(2 * n_det))))
    n = np.concatenate([np.arange(1, P // 2 + 1, 2), np.arange(P // 2 - 1, 0, -2)])
    h = np.zeros(P)
    h[0] = 0.25
    h[1::2] = -1.0 / (np.pi * n) ** 2
    H = np.real(np.fft.fft(h))[: P // 2 + 1]
    freq = np.fft.rfftfreq(P)                           # cycles / sample, 0 .. 0.5
    if window == "shepp-logan":
        w = np.ones_like(freq)
        w[1:] = np.sinc(freq[1:])                       # sin(pi f) / (pi f)
        H = H * w
    elif window == "hann":
        H = H * 0.5 * (1 + np.cos(2 * np.pi * freq))
    elif window != "ramp":
        raise ValueError(f"unknown filter {window!r}; choose from {FILTERS}")
    return P, H


def filter_sinogram(sino: torch.Tensor, det_spacing_mm: float, filter: str = "ramp") -> torch.Tensor:
    """Convolve each projection (last axis) with the ramp filter; returns 1/mm per unit line integral."""
    n_det = sino.shape[-1]
    P, H = _filter_np(n_det, filter)
    Ht = torch.as_tensor(H, dtype=sino.dtype, device=sino.device)
    spec = torch.fft.rfft(sino, n=P, dim=-1) * Ht
    return torch.fft.irfft(spec, n=P, dim=-1)[..., :n_det] / det_spacing_mm


def fbp(sino, projector: Projector, filter: str = "ramp", *, circle: bool = False) -> torch.Tensor:
    """Filtered back-projection: line integrals (.., n_angles, n_det) -> mu (.., H, W) in 1/mm.

    Parallel beam: ramp filtering in the frequency domain (zero-padded), then pixel-driven
    linear-interpolation back-projection scaled by pi / n_angles, so fbp(forward(x)) ~= x.
    Fan beam (full scan): rebinned to parallel first (`Projector.rebin_to_parallel`), so the
    whole chain is one differentiable "Radon inversion layer". `filter`: "ramp",
    "shepp-logan" or "hann". `circle=True` zeroes pixels outside the detector's field of view.
    """
    y, single = _as_batch(sino, 2, projector.device)
    g = projector.geometry
    if isinstance(g, FanBeam):
        y = projector.rebin_to_parallel(y)
        g = g.rebinned_geometry()
    elif tuple(y.shape[1:]) != projector.sino_shape:
        raise ValueError(f"sinogram shape {tuple(y.shape[1:])} != projector's {projector.sino_shape}")
    q = filter_sinogram(y, g.det_spacing_mm, filter)
    bp = _backprojection_op(g, projector.image_shape, projector.pixel_size_mm)
    x = _apply(bp, q, False, projector.image_shape) * (math.pi / g.n_angles)
    if circle:
        H, W = projector.image_shape
        ps = projector.pixel_size_mm
        yy = (torch.arange(H, device=x.device, dtype=x.dtype) - (H - 1) / 2) * ps
        xx = (torch.arange(W, device=x.device, dtype=x.dtype) - (W - 1) / 2) * ps
        r_fov = (g.n_det - 1) / 2 * g.det_spacing_mm
        x = x * ((yy[:, None] ** 2 + xx[None, :] ** 2) <= r_fov ** 2).to(x.dtype)
    return x[0] if single else x
