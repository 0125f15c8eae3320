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

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

__all__ = ["normalize_rope_scaling", "rope_frequencies", "apply_rope",
           "interpolate_position_table", "ROPE_TYPES"]

@dataclasses.dataclass(frozen=True)
class _Parameter:
    """One key of a rope_scaling dict: its default, what a value must be (the words of the
    error line, the test, the normalized form) and whether it may stay None (filled from
    the caller or derived below, or unused)."""
    default: Any
    describe: str
    accepts: Callable[[Any], bool]
    convert: Callable[[Any], Any] = lambda value: value
    optional: bool = False


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _positive(default=None) -> _Parameter:
    return _Parameter(default, "a positive number", lambda v: _is_real(v) and v > 0, float,
                      optional=default is None)


# factor < 1 would shrink the context, not extend it
_FACTOR = _Parameter(None, "a number >= 1", lambda v: _is_real(v) and v >= 1, float)
# L0, the length the scaling is relative to: None falls back to the caller's l_max
_L0 = _Parameter(None, "a positive integer",
                 lambda v: _is_real(v) and v >= 1 and float(v) == int(v), int, optional=True)
_NUMBER = _Parameter(None, "a number", _is_real, float, optional=True)
_FLAG = _Parameter(True, "true or false", lambda v: isinstance(v, bool))
# LongRoPE's per-frequency factors
_FACTORS = _Parameter(
    None, "a non-empty list of positive numbers (one per frequency)",
    lambda v: (not isinstance(v, (str, bytes)) and hasattr(v, "__len__") and len(v) > 0
               and all(_is_real(x) and x > 0 for x in v)),
    lambda v: [float(x) for x in v])

# The keys each rope_type accepts (Hugging Face's names). attention_factor: when absent,
# yarn derives it from factor (and mscale / mscale_all_dim), longrope from factor and L0.
_PARAMETERS = {
    "linear": {"factor": _FACTOR},
    "dynamic": {"factor": _FACTOR, "original_max_position_embeddings": _L0},
    "yarn": {"factor": _FACTOR, "original_max_position_embeddings": _L0,
             "beta_fast": _positive(32.0), "beta_slow": _positive(1.0),
             "attention_factor": _positive(), "mscale": _NUMBER, "mscale_all_dim": _NUMBER,
             "truncate": _FLAG},
    "llama3": {"factor": _FACTOR, "original_max_position_embeddings": _L0,
               "low_freq_factor": _positive(1.0), "high_freq_factor": _positive(4.0)},
    # LongRoPE (Ding et al. 2024) as Phi-3 uses it: inv_freq / short_factor for sequences
    # up to L0, inv_freq / long_factor beyond; cos/sin times attention_factor, by default
    # sqrt(1 + ln(factor) / ln(L0)).
    "longrope": {"factor": _FACTOR, "original_max_position_embeddings": _L0,
                 "short_factor": _FACTORS, "long_factor": _FACTORS,
                 "attention_factor": _positive()},
}
ROPE_TYPES = ("default",) + tuple(_PARAMETERS)

# What ties a type's keys together: (rope_type, holds(params), the error's words)
_RELATIONS = (
    ("yarn", lambda p: p["beta_fast"] >= p["beta_slow"],
     lambda p: f"beta_fast ({p['beta_fast']}) must be >= beta_slow ({p['beta_slow']})"),
    ("llama3", lambda p: p["high_freq_factor"] > p["low_freq_factor"],
     lambda p: f"high_freq_factor ({p['high_freq_factor']}) must be > low_freq_factor "
               f"({p['low_freq_factor']})"),
    ("longrope", lambda p: len(p["short_factor"]) == len(p["long_factor"]),
     lambda p: f"short_factor and long_factor differ in length ({len(p['short_factor'])} vs "
               f"{len(p['long_factor'])})"),
)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
    return 1.0 if scale <= 1.0 else 0.1 * mscale * math.log(scale) + 1.0


def _as_mapping(scaling):
    """None, or the rope_scaling value as a plain dict (parsed from JSON; ConfigDict
    unwrapped)."""
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
        raise ValueError(f"rope_scaling must be None, a dict or a JSON object string, "
                         f"got {type(scaling).__name__}")
    return dict(scaling)


def _rope_type(params: dict) -> str:
    """The type named by "rope_type" (or the older "type"), popped from `params`."""
    if "type" in params and "rope_type" in params and params["type"] != params["rope_type"]:
        raise ValueError(f"rope_scaling has conflicting 'type' ({params['type']!r}) and "
                         f"'rope_type' ({params['rope_type']!r})")
    given = dict(params)
    alias = params.pop("type", None)
    rope_type = params.pop("rope_type", alias)
    if rope_type is None:
        raise ValueError(f"rope_scaling needs a 'rope_type' (one of {', '.join(ROPE_TYPES)}): "
                         f"{given}")
    if rope_type == "default":
        if params:
            raise ValueError(f"rope_scaling 'default' takes no parameters, got {sorted(params)}")
        return rope_type
    if rope_type not in _PARAMETERS:
        raise ValueError(f"unknown or unsupported rope_type {rope_type!r}; "
                         f"expected one of {', '.join(ROPE_TYPES)}")
    unknown = sorted(set(params) - set(_PARAMETERS[rope_type]))
    if unknown:
        hint = " (set the base with model.rope.theta)" if "rope_theta" in unknown else ""
        raise ValueError(f"rope_scaling {rope_type!r}: unknown keys {unknown}; allowed: "
                         f"{sorted(_PARAMETERS[rope_type])}{hint}")
    return rope_type


def _checked(rope_type: str, key: str, value):
    """`value` of `key` normalized, or one ValueError line."""
    parameter = _PARAMETERS[rope_type][key]
    if value is None:
        if parameter.optional:
            return None
        raise ValueError(f"rope_scaling {rope_type!r} needs a {key!r} ({parameter.describe})")
    if not parameter.accepts(value):
        raise ValueError(f"rope_scaling {rope_type!r}: {key} must be {parameter.describe}, "
                         f"got {value!r}")
    return parameter.convert(value)


def _derived_attention_factor(out: dict) -> float | None:
    """yarn and longrope's attention_factor when the dict gives none."""
    if out["rope_type"] == "yarn":
        # YaRN paper: 0.1 ln(s) + 1. Hugging Face (DeepSeek configs) uses the ratio
        # mscale(s, mscale) / mscale(s, mscale_all_dim) when both are given, nonzero.
        if out["mscale"] and out["mscale_all_dim"]:
            return (_yarn_mscale(out["factor"], out["mscale"])
                    / _yarn_mscale(out["factor"], out["mscale_all_dim"]))
        return _yarn_mscale(out["factor"])
    l0 = out["original_max_position_embeddings"]
    if l0 is None:                        # longrope: left to rope_frequencies' fallback
        return None
    return 1.0 if out["factor"] <= 1 else math.sqrt(1 + math.log(out["factor"]) / math.log(l0))


def normalize_rope_scaling(scaling, original_max_position_embeddings: int | None = None
                           ) -> dict | None:
    """Validates a Hugging Face style `rope_scaling` value and fills in its defaults.

    Args:
      scaling: None; a dict / Mapping / ml_collections ConfigDict such as
        `{"rope_type": "linear", "factor": 4.0}` (older configs say "type"); or the same as a
        JSON string (also "", "none", "null" for no scaling).
      original_max_position_embeddings: fallback L0 for the types that need one (dynamic,
        yarn, llama3, longrope) when the dict has none; the trainer passes its l_max.
        Without either, the result keeps "original_max_position_embeddings": None, and
        `rope_frequencies` fills it from its own fallback (or raises if it has none).

    Returns:
      None for no scaling or rope_type "default"; otherwise a new plain dict with
      "rope_type" and every key of that type (`_PARAMETERS`), defaults filled in; yarn's
      "attention_factor" is resolved to a number (given, or derived).

    Raises:
      ValueError (one line) for malformed JSON, an unknown rope_type, unknown keys, a
      missing required key or a value outside its `_PARAMETERS` entry, or a broken
      `_RELATIONS` tie.
    """
    params = None if scaling is None else _as_mapping(scaling)
    if params is None:
        return None
    rope_type = _rope_type(params)
    if rope_type == "default":
        return None
    out = {"rope_type": rope_type}
    for key, parameter in _PARAMETERS[rope_type].items():
        value = params.get(key)
        if key == "original_max_position_embeddings" and value is None:
            value = original_max_position_embeddings
        out[key] = _checked(rope_type, key, parameter.default if value is None else value)
    if "attention_factor" in out and out["attention_factor"] is None:
        out["attention_factor"] = _checked(rope_type, "attention_factor",
                                           _derived_attention_factor(out))
    for of_type, holds, words in _RELATIONS:
        if of_type == rope_type and not holds(out):
            raise ValueError(f"rope_scaling {rope_type!r}: {words(out)}")
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
