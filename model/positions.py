"""Rotary position embeddings (RoPE) and the Hugging Face `rope_scaling` variants.

Pure functions, no parameters and no mesh code:
- `normalize_rope_scaling(scaling)`: validate a `rope_scaling` value (None, a dict or
  ConfigDict, or a JSON string) and fill in every default; None means plain RoPE.
- `rope_frequencies(head_dim, theta, scaling, seq_len)`: the inverse frequencies
  `[head_dim // 2]` (float64 numpy) and the attention factor for cos/sin, computed from
  static values at trace time.
- `apply_rope(x, positions, inv_freq)`: rotate `[batch, length, heads, head_dim]` by the
  global positions carried as data, Hugging Face Llama layout ("rotate half").
- `interpolate_position_table(table, rows)`: a learned-position table [L, d] resized to
  [rows, d] by linear interpolation along the position axis.
Scalings: `default`, `linear` (Position Interpolation), `dynamic` (NTK), `yarn` (with
DeepSeek's mscale / mscale_all_dim), `llama3`, `longrope` (Phi-3: per-frequency short and
long factors); their formulas and sources are in docs/positions.md ("Rotary positions and their
scalings").
"""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

__all__ = ["normalize_rope_scaling", "rope_frequencies", "apply_rope",
           "interpolate_position_table", "ROPE_TYPES"]

# Parameters each rope_type accepts, with their defaults. `None` means "no default":
# factor is required; L0 falls back to the caller's `original_max_position_embeddings`;
# yarn's attention_factor is derived from factor (and mscale / mscale_all_dim) when absent.
_PARAMETERS = {
    "linear": {"factor": None},
    "dynamic": {"factor": None, "original_max_position_embeddings": None},
    "yarn": {
        "factor": None,
        "original_max_position_embeddings": None,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "attention_factor": None,
        "mscale": None,
        "mscale_all_dim": None,
        "truncate": True,
    },
    "llama3": {
        "factor": None,
        "original_max_position_embeddings": None,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
    # LongRoPE (Ding et al. 2024) as Phi-3 uses it: inv_freq / short_factor for sequences
    # up to L0, inv_freq / long_factor beyond; cos/sin times attention_factor, by default
    # sqrt(1 + ln(factor) / ln(L0)).
    "longrope": {
        "factor": None,
        "original_max_position_embeddings": None,
        "short_factor": None,
        "long_factor": None,
        "attention_factor": None,
    },
}
ROPE_TYPES = ("default",) + tuple(_PARAMETERS)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _positive_float(rope_type: str, key: str, value) -> float:
    if not _is_real(value) or value <= 0:
        raise ValueError(f"rope_scaling {rope_type!r}: {key} must be a positive number, "
                         f"got {value!r}")
    return float(value)


def _positive_int(rope_type: str, key: str, value) -> int:
    if not _is_real(value) or value < 1 or float(value) != int(value):
        raise ValueError(f"rope_scaling {rope_type!r}: {key} must be a positive integer, "
                         f"got {value!r}")
    return int(value)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def normalize_rope_scaling(scaling, original_max_position_embeddings: int | None = None
                           ) -> dict | None:
    """Validates a Hugging Face style `rope_scaling` value and fills in its defaults.

    Args:
      scaling: None; a dict / Mapping / ml_collections ConfigDict such as
        `{"rope_type": "linear", "factor": 4.0}` (older configs say "type"); or the same as a
        JSON string (also "", "none", "null" for no scaling).
      original_max_position_embeddings: fallback L0 for the types that need one (dynamic,
        yarn, llama3) when the dict has none; the trainer passes its training length l_max.
        Without either, the result keeps "original_max_position_embeddings": None, and
        `rope_frequencies` fills it from its own fallback (or raises if it has none).

    Returns:
      None for no scaling or rope_type "default"; otherwise a new plain dict with
      "rope_type" and every parameter of that type (see `_PARAMETERS`), defaults filled in.
      For yarn, "attention_factor" is resolved to a number (given, or from factor and mscale).

    Raises:
      ValueError (one line) for malformed JSON, an unknown or unsupported rope_type,
      unknown keys, a missing or invalid factor (factor < 1 is invalid), or an invalid
      parameter (including a non-positive or non-integer L0).
    """
    if scaling is None:
        return None
    if isinstance(scaling, (str, bytes)):
        text = scaling.decode() if isinstance(scaling, bytes) else scaling
        if text.strip().lower() in ("", "none", "null"):
            return None
        try:
            scaling = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"rope_scaling is not valid JSON ({e.msg}): {text!r}") from None
        if scaling is None:
            return None
    if hasattr(scaling, "to_dict") and not isinstance(scaling, Mapping):  # ml_collections
        scaling = scaling.to_dict()
    if not isinstance(scaling, Mapping):
        raise ValueError(
            f"rope_scaling must be None, a dict or a JSON object string, "
            f"got {type(scaling).__name__}"
        )
    params = dict(scaling)

    # Old Hugging Face configs name the type "type"; newer ones "rope_type".
    if "type" in params and "rope_type" in params and params["type"] != params["rope_type"]:
        raise ValueError(
            f"rope_scaling has conflicting 'type' ({params['type']!r}) and "
            f"'rope_type' ({params['rope_type']!r})"
        )
    alias = params.pop("type", None)
    rope_type = params.pop("rope_type", alias)
    if rope_type is None:
        raise ValueError(f"rope_scaling needs a 'rope_type' (one of {', '.join(ROPE_TYPES)}): "
                         f"{dict(scaling)}")
    if rope_type == "default":
        if params:
            raise ValueError(f"rope_scaling 'default' takes no parameters, got {sorted(params)}")
        return None
    if rope_type not in _PARAMETERS:
        raise ValueError(
            f"unknown or unsupported rope_type {rope_type!r}; "
            f"expected one of {', '.join(ROPE_TYPES)}"
        )

    allowed = _PARAMETERS[rope_type]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        hint = " (set the base with model.rope.theta)" if "rope_theta" in unknown else ""
        raise ValueError(
            f"rope_scaling {rope_type!r}: unknown keys {unknown}; allowed: {sorted(allowed)}{hint}"
        )
    out = {"rope_type": rope_type}
    for key, default in allowed.items():
        value = params.get(key)
        out[key] = default if value is None else value

    # factor: required, a real number >= 1 (s < 1 would shrink the context, not extend it).
    factor = out["factor"]
    if factor is None:
        raise ValueError(f"rope_scaling {rope_type!r} needs a 'factor' (a number >= 1)")
    if not _is_real(factor) or factor < 1:
        raise ValueError(f"rope_scaling {rope_type!r}: factor must be a number >= 1, "
                         f"got {factor!r}")
    out["factor"] = float(factor)

    if "original_max_position_embeddings" in out:
        l0 = out["original_max_position_embeddings"]
        if l0 is None:
            l0 = original_max_position_embeddings
        if l0 is not None:  # None: left to the fallback of `rope_frequencies`
            l0 = _positive_int(rope_type, "original_max_position_embeddings", l0)
        out["original_max_position_embeddings"] = l0

    if rope_type == "yarn":
        beta_fast = _positive_float(rope_type, "beta_fast", out["beta_fast"])
        beta_slow = _positive_float(rope_type, "beta_slow", out["beta_slow"])
        if beta_fast < beta_slow:
            raise ValueError(
                f"rope_scaling 'yarn': beta_fast ({beta_fast}) must be >= beta_slow ({beta_slow})"
            )
        out["beta_fast"], out["beta_slow"] = beta_fast, beta_slow
        if not isinstance(out["truncate"], bool):
            raise ValueError(f"rope_scaling 'yarn': truncate must be true or false, "
                             f"got {out['truncate']!r}")
        for key in ("mscale", "mscale_all_dim"):
            if out[key] is not None:
                if not _is_real(out[key]):
                    raise ValueError(f"rope_scaling 'yarn': {key} must be a number, "
                                     f"got {out[key]!r}")
                out[key] = float(out[key])
        if out["attention_factor"] is None:
            # YaRN paper: 0.1 ln(s) + 1. Hugging Face (DeepSeek configs) uses the
            # ratio mscale(s, mscale) / mscale(s, mscale_all_dim) when both are given, nonzero.
            if out["mscale"] and out["mscale_all_dim"]:
                out["attention_factor"] = _yarn_mscale(out["factor"], out["mscale"]) / _yarn_mscale(
                    out["factor"], out["mscale_all_dim"]
                )
            else:
                out["attention_factor"] = _yarn_mscale(out["factor"])
        out["attention_factor"] = _positive_float(rope_type, "attention_factor",
                                                  out["attention_factor"])

    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            factors = out[key]
            if isinstance(factors, (str, bytes)) or not hasattr(factors, "__len__") or \
                    len(factors) == 0 or not all(_is_real(x) and x > 0 for x in factors):
                raise ValueError(f"rope_scaling 'longrope': {key} must be a non-empty list of "
                                 f"positive numbers (one per frequency), got {factors!r}")
            out[key] = [float(x) for x in factors]
        if len(out["short_factor"]) != len(out["long_factor"]):
            raise ValueError(f"rope_scaling 'longrope': short_factor and long_factor differ in "
                             f"length ({len(out['short_factor'])} vs {len(out['long_factor'])})")
        if out["attention_factor"] is None and out["original_max_position_embeddings"]:
            l0 = out["original_max_position_embeddings"]
            out["attention_factor"] = 1.0 if out["factor"] <= 1 else math.sqrt(
                1 + math.log(out["factor"]) / math.log(l0))
        if out["attention_factor"] is not None:
            out["attention_factor"] = _positive_float(rope_type, "attention_factor",
                                                      out["attention_factor"])

    if rope_type == "llama3":
        low = _positive_float(rope_type, "low_freq_factor", out["low_freq_factor"])
        high = _positive_float(rope_type, "high_freq_factor", out["high_freq_factor"])
        if high <= low:
            raise ValueError(
                f"rope_scaling 'llama3': high_freq_factor ({high}) must be > "
                f"low_freq_factor ({low})"
            )
        out["low_freq_factor"], out["high_freq_factor"] = low, high
    return out


def _default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/d), i = 0 .. d/2 - 1.  -> [d // 2] float64."""
    return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def rope_frequencies(
    head_dim: int,
    theta: float,
    scaling,
    seq_len: int,
    original_max_position_embeddings: int | None = None,
) -> tuple[np.ndarray, float]:
    """Inverse frequencies and cos/sin attention factor of a (scaled) rotary embedding.

    Pure numpy, for static values at trace time.

    Args:
      head_dim: d, the rotary dimension (even).
      theta: the RoPE base (e.g. 10_000, or 500_000 for ABF-style larger bases).
      scaling: anything `normalize_rope_scaling` accepts (None: plain RoPE).
      seq_len: static length L of the sequence being processed (the largest position + 1);
        "dynamic" and "longrope" (long factors when L > L0, as transformers decides) use it.
      original_max_position_embeddings: fallback L0 when `scaling` has none (the trainer
        passes its training length l_max).

    Returns:
      (inv_freq [head_dim // 2] float64, attention_factor): angles are position * inv_freq,
      cos and sin are multiplied by attention_factor (1 except for yarn).
    """
    if (isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim < 2
            or head_dim % 2):
        raise ValueError(f"RoPE needs an even head_dim >= 2, got {head_dim!r}")
    head_dim = int(head_dim)
    if not _is_real(theta) or theta <= 1:
        raise ValueError(f"RoPE theta must be a number > 1, got {theta!r}")
    theta = float(theta)
    params = normalize_rope_scaling(scaling, original_max_position_embeddings)
    d = head_dim
    inv_freq = _default_inv_freq(d, theta)  # [d/2]
    if params is None:
        return inv_freq, 1.0

    rope_type, s = params["rope_type"], params["factor"]
    if rope_type == "linear":
        # Chen et al. 2023: positions p -> p / s, i.e. every frequency divided by s.
        return inv_freq / s, 1.0

    l0 = params["original_max_position_embeddings"]
    if l0 is None:
        raise ValueError(
            f"rope_scaling {rope_type!r} needs 'original_max_position_embeddings' (the training "
            "length L0): give it in the scaling dict or as original_max_position_embeddings="
        )
    if rope_type == "dynamic":
        # NTK-aware base change, recomputed for the current length; a no-op for L <= L0.
        if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 1:
            raise ValueError(f"dynamic RoPE needs a static positive integer seq_len, "
                             f"got {seq_len!r}")
        if d == 2:
            raise ValueError("dynamic RoPE needs head_dim > 2 (the exponent is d / (d - 2))")
        if seq_len <= l0:
            return inv_freq, 1.0
        theta_new = theta * ((s * seq_len / l0) - (s - 1)) ** (d / (d - 2))
        return _default_inv_freq(d, theta_new), 1.0

    if rope_type == "yarn":
        # Peng et al. 2023, "NTK-by-parts": the pair index that makes r rotations over L0 is
        # dim(r) = d ln(L0 / (2 pi r)) / (2 ln theta). Pairs below dim(beta_fast) (many
        # rotations, short wavelengths) are kept; above dim(beta_slow) interpolated by s.
        def correction_dim(rotations: float) -> float:
            return d * math.log(l0 / (2 * math.pi * rotations)) / (2 * math.log(theta))

        low = correction_dim(params["beta_fast"])
        high = correction_dim(params["beta_slow"])
        if params["truncate"]:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if high == low:
            high += 1e-3  # avoid 0/0; Hugging Face does the same
        i = np.arange(d // 2, dtype=np.float64)
        ramp = np.clip((i - low) / (high - low), 0.0, 1.0)  # [d/2]: 0 keep, 1 interpolate
        inv_freq = (inv_freq / s) * ramp + inv_freq * (1.0 - ramp)
        return inv_freq, float(params["attention_factor"])

    if rope_type == "llama3":
        # Llama 3.1: wavelengths longer than L0 / low_freq_factor are interpolated by s,
        # shorter than L0 / high_freq_factor kept, and blended in between.
        low_ff, high_ff = params["low_freq_factor"], params["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq  # [d/2]
        low_freq_wavelen = l0 / low_ff
        high_freq_wavelen = l0 / high_ff
        t = (l0 / wavelen - low_ff) / (high_ff - low_ff)  # [d/2], 0 at low_ff, 1 at high_ff
        blended = (1.0 - t) * inv_freq / s + t * inv_freq
        out = np.where(
            wavelen > low_freq_wavelen,
            inv_freq / s,
            np.where(wavelen < high_freq_wavelen, inv_freq, blended),
        )
        return out, 1.0

    if rope_type == "longrope":
        factors = params["long_factor"] if seq_len > l0 else params["short_factor"]
        if len(factors) != d // 2:
            raise ValueError(f"rope_scaling 'longrope': short_factor/long_factor need "
                             f"head_dim / 2 = {d // 2} entries, got {len(factors)}")
        attention_factor = params["attention_factor"]
        if attention_factor is None:   # L0 came from the fallback only now
            attention_factor = 1.0 if s <= 1 else math.sqrt(1 + math.log(s) / math.log(l0))
        return inv_freq / np.asarray(factors, np.float64), float(attention_factor)

    raise AssertionError(rope_type)  # normalize_rope_scaling rejects other types


def apply_rope(x, positions, inv_freq, attention_factor: float = 1.0):
    """Rotates x by its tokens' global positions (rotate-half / Hugging Face Llama layout).

    Dimension i is paired with i + head_dim / 2 and the pair is rotated by the angle
    position * inv_freq[i]:
      out[..., :h] = x1 * cos - x2 * sin,   out[..., h:] = x2 * cos + x1 * sin,
    with h = head_dim / 2, x1 = x[..., :h], x2 = x[..., h:], and cos, sin multiplied by
    attention_factor. So <rope(q, m), rope(k, n)> depends only on m - n (for factor 1).

    Args:
      x: [batch, length, heads, head_dim], any float dtype.
      positions: [batch, length] (or broadcastable to it, e.g. [1, length]) global positions
        as data, int32 normally; floats are accepted (fractional positions).
      inv_freq: [head_dim // 2] from `rope_frequencies` (numpy or jax).
      attention_factor: multiplies cos and sin (YaRN's factor; 1 otherwise).

    Returns:
      [batch, length, heads, head_dim] in x.dtype. Angles and the rotation are computed in
      float32 (or float64 if x is float64).
    """
    if x.ndim != 4:
        raise ValueError(f"apply_rope expects x [batch, length, heads, head_dim], "
                         f"got shape {x.shape}")
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"apply_rope needs an even head_dim, got {head_dim}")
    half = head_dim // 2
    if tuple(np.shape(inv_freq)) != (half,):
        raise ValueError(f"inv_freq must have shape ({half},) for head_dim {head_dim}, "
                         f"got {np.shape(inv_freq)}")
    if np.ndim(positions) != 2:
        raise ValueError(f"positions must be [batch, length], got shape {np.shape(positions)}")
    try:
        np.broadcast_shapes(np.shape(positions), x.shape[:2])
    except ValueError:
        raise ValueError(
            f"positions shape {np.shape(positions)} does not match "
            f"x [batch, length] = {x.shape[:2]}"
        ) from None

    compute = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 for float64 x
    # [b, l, h]
    angles = jnp.asarray(positions).astype(compute)[..., None] * jnp.asarray(inv_freq, compute)
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]  # [b, l, 1, d/2]
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]  # [b, l, 1, d/2]
    xf = x.astype(compute)
    x1, x2 = xf[..., :half], xf[..., half:]  # [b, l, heads, d/2] each
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def interpolate_position_table(table, rows: int):
    """A learned-position table [L, d] resized to [rows, d] by linear interpolation along
    the position axis: new row j is the old table at x = j (L - 1) / (rows - 1), i.e.
    (1 - w) table[floor(x)] + w table[floor(x) + 1] with w = x - floor(x). The first and
    last rows are kept; rows = L returns the table unchanged. (The learned-table analogue
    of Position Interpolation: the new positions 0 .. rows - 1 are squeezed onto 0 .. L - 1.)

    Works on numpy or jax arrays (jit-able: the weights are static, computed in float64);
    the result has the table's dtype.
    """
    old = int(np.shape(table)[0])
    rows = int(rows)
    if old < 1 or rows < 1:
        raise ValueError(f"interpolate_position_table: tables need rows, got {old} -> {rows}")
    if rows == old:
        return table
    x = np.arange(rows, dtype=np.float64) * ((old - 1) / (rows - 1) if rows > 1 else 0.0)
    low = np.minimum(np.floor(x).astype(np.int64), old - 1)
    high = np.minimum(low + 1, old - 1)
    weight = (x - low)[:, None]
    xp = np if isinstance(table, np.ndarray) else jnp
    compute = xp.promote_types(table.dtype, xp.float32)
    t = table.astype(compute)
    out = t[low] * (1.0 - weight).astype(compute) + t[high] * weight.astype(compute)
    return out.astype(table.dtype)
