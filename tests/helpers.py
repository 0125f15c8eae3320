"""Shared test helpers: a small config that compiles and trains in seconds, readers of a
run's files, small corpora and row checks, random attention inputs, and a parser of the
markdown tables the code prints."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from configs.base import get_config
from configs.sections import settings as settings_of


def small_config(**overrides):
    """configs/tiny.py shrunk for tests; overrides are 'section.key' -> value."""
    config = tiny.get_config()
    config.model.d_model = 64
    config.model.n_layers = 2
    config.model.q_heads = 4
    config.model.kv_heads = 2
    config.model.head_dim = 16
    config.model.mlp_dim = 128
    config.model.block_q = 16
    config.model.block_k = 16
    # the scanned layers, as real sizes run them (configs/tiny.py itself loops over its 4)
    config.model.scan_layers = True
    config.curriculum.l_max = 64
    config.train.steps = 8
    config.train.batch_size = 8
    config.train.log_every_steps = 1
    config.checkpoint.every_steps = 4
    config.checkpoint.async_save = False
    config.eval.batch_size = 8
    config.eval.max_batches = 2
    config.eval.lengths = (64,)
    config.eval.sliding_max_windows = 8
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, value)
    return config


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(workdir):
    """{step: loss} of the training records in metrics.jsonl (eval records excluded)."""
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


# ------------------------------------------------------------------ data
KEYS = {"tokens": np.int32, "targets": np.int32, "positions": np.int32,
        "segment_ids": np.int32, "loss_mask": np.float32}


def data_config(**overrides):
    config = get_config().data
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def write_text_corpus(directory, texts, suffix=".txt"):
    """One file per text, doc_000.txt, doc_001.txt, ...; returns the glob."""
    os.makedirs(directory, exist_ok=True)
    for i, text in enumerate(texts):
        with open(os.path.join(directory, f"doc_{i:03d}{suffix}"), "w", encoding="utf-8") as f:
            f.write(text)
    return os.path.join(str(directory), f"*{suffix}")


def varied_texts(count, seed=0, min_len=5, max_len=90):
    """`count` distinct documents of varied length (distinct bytes sequences)."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "pi", "rho", "sigma", "tau", "omega", "mu"]
    texts = []
    for i in range(count):
        n = int(rng.integers(min_len, max_len))
        body = " ".join(rng.choice(words, size=n // 4 + 1))
        texts.append(f"#{i}: {body}"[:n])
    return texts


def text_config(tmp_path, texts, **overrides):
    return data_config(source="text", path=write_text_corpus(tmp_path / "corpus", texts),
                       **overrides)


def segments(batch):
    """(tokens, targets, positions) of every non-padding segment of every row."""
    out = []
    for row in range(batch["tokens"].shape[0]):
        ids = batch["segment_ids"][row]
        for segment in np.unique(ids[ids > 0]):
            where = ids == segment
            out.append((batch["tokens"][row][where], batch["targets"][row][where],
                        batch["positions"][row][where]))
    return out


def piece_bytes(tokens, targets):
    """The document bytes a piece covers: its inputs and then its last target."""
    return bytes(np.append(tokens, targets[-1]).astype(np.uint8))


def sorted_rows(batches):
    """The rows of some batches, as comparable tuples, sorted."""
    rows = []
    for batch in batches:
        for r in range(batch["tokens"].shape[0]):
            rows.append(tuple(batch[k][r].tobytes() for k in sorted(KEYS)))
    return sorted(rows)


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ------------------------------------------------------------------ attention inputs
def random_qkv(seed, batch=2, length=64, q_heads=4, kv_heads=2, head_dim=16, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (batch, length, q_heads, head_dim), dtype)
    k = jax.random.normal(kk, (batch, length, kv_heads, head_dim), dtype)
    v = jax.random.normal(kv, (batch, length, kv_heads, head_dim), dtype)
    return q, k, v


def packed_segments(seed, batch, length, documents=4):
    """Sorted random segment ids and positions restarting at 0 in each segment."""
    rng = np.random.default_rng(seed)
    segments = np.sort(rng.integers(0, documents, (batch, length)), axis=1)
    positions = np.zeros_like(segments)
    for row in range(batch):
        for t in range(1, length):
            same = segments[row, t] == segments[row, t - 1]
            positions[row, t] = positions[row, t - 1] + 1 if same else 0
    return jnp.asarray(positions, jnp.int32), jnp.asarray(segments, jnp.int32)


def reference_attention(q, k, v, positions=None, segment_ids=None, causal=True, window=None):
    """Attention written from its definition in float64 numpy, independent of model/: a
    query attends to the keys of its segment, not after it when causal, and less than
    `window` positions away. Rows that see nothing are zero. q [b, l, hq, d], k/v
    [b, l, hk, d] -> [b, l, hq, d] float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, length, hq, d = q.shape
    hk = k.shape[2]
    pos = (np.broadcast_to(np.arange(length), (b, length)) if positions is None
           else np.asarray(positions))
    seg = np.zeros((b, length), int) if segment_ids is None else np.asarray(segment_ids)
    k = np.repeat(k, hq // hk, axis=2)                     # query head h reads kv head h // g
    v = np.repeat(v, hq // hk, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    gap = pos[:, :, None] - pos[:, None, :]                # query position - key position
    visible = seg[:, :, None] == seg[:, None, :]
    if causal:
        visible &= gap >= 0
    if window is not None:
        visible &= np.abs(gap) < window if not causal else gap < window
    visible = visible[:, None]                             # [b, 1, q, k]
    scores = np.where(visible, scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    weights = np.where(visible, np.exp(scores - np.where(np.isfinite(top), top, 0)), 0.0)
    total = weights.sum(-1, keepdims=True)
    weights = weights / np.where(total > 0, total, 1.0)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def reference_grads(q, k, v, weights, **options):
    """Gradients of sum(reference_attention(q, k, v) * weights) w.r.t. q, k, v, by central
    differences would be slow: derived by hand from the softmax instead (float64 numpy)."""
    q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, weights))
    b, length, hq, d = q.shape
    hk = k.shape[2]
    g = hq // hk
    positions, segment_ids = options.get("positions"), options.get("segment_ids")
    causal, window = options.get("causal", True), options.get("window")
    pos = (np.broadcast_to(np.arange(length), (b, length)) if positions is None
           else np.asarray(positions))
    seg = np.zeros((b, length), int) if segment_ids is None else np.asarray(segment_ids)
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = 1 / np.sqrt(d)
    scores = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    gap = pos[:, :, None] - pos[:, None, :]
    visible = seg[:, :, None] == seg[:, None, :]
    if causal:
        visible &= gap >= 0
    if window is not None:
        visible &= np.abs(gap) < window if not causal else gap < window
    visible = visible[:, None]
    scores = np.where(visible, scores, -np.inf)
    top = np.max(scores, axis=-1, keepdims=True)
    p = np.where(visible, np.exp(scores - np.where(np.isfinite(top), top, 0)), 0.0)
    total = p.sum(-1, keepdims=True)
    p = p / np.where(total > 0, total, 1.0)                # [b, h, q, k]
    d_out = np.moveaxis(w, 2, 1)                           # [b, h, q, d]
    dv = np.einsum("bhqk,bhqd->bkhd", p, d_out)
    dp = np.einsum("bhqd,bkhd->bhqk", d_out, vr)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr)
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q)

    def fold(x):                     # sum over a group's heads
        return x.reshape(b, length, hk, g, d).sum(axis=3)

    return dq, fold(dk), fold(dv)


def relative_error(a, b):
    return float(jnp.linalg.norm((a - b).astype(jnp.float32))
                 / jnp.linalg.norm(a.astype(jnp.float32)))


# ------------------------------------------------------------------ markdown tables
def _cells(line):
    """The stripped cells of one markdown table line ("| a | b |")."""
    return [cell.strip() for cell in line.strip()[1:-1].split("|")]


def parse_markdown_table(lines):
    """(header, rows) of the first markdown table in `lines`: the header line, a rule line
    of dashes (and colons), then the rows up to the first line that is not a table row."""
    lines = list(lines)
    for i, line in enumerate(lines[:-1]):
        rule = lines[i + 1].strip()
        if line.strip().startswith("|") and rule.startswith("|") and set(rule) <= set("|-: "):
            header = _cells(line)
            rows = []
            for row in lines[i + 2:]:
                if not row.strip().startswith("|"):
                    break
                cells = _cells(row)
                assert len(cells) == len(header), (header, row)
                rows.append(cells)
            return header, rows
    raise AssertionError("no markdown table in:\n" + "\n".join(lines))


PLAN_COLUMNS = ["level", "length", "batch", "steps", "tokens", "share", "actual", "mesh",
                "rope theta", "rope scaling", "lr x"]


def plan_table(text):
    """The printed curriculum plan (Curriculum.format) in `text`, checked for its layout: a line
    "length curriculum: ...", the table with PLAN_COLUMNS, then "total: N steps, T tokens".
    Returns one {column: cell} dict per level."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("length curriculum: "))
    header, rows = parse_markdown_table(lines[start + 1:])
    assert header == PLAN_COLUMNS
    assert _cells(lines[start + 1])[0] == "level", lines[start + 1]  # right below
    assert lines[start + 3 + len(rows)].startswith("total: "), lines[start + 3 + len(rows)]
    return [dict(zip(header, row)) for row in rows]


def assert_drawn_png(path):
    """`path` decodes as a PNG of a real plot: over 100 x 100 pixels, RGB or RGBA, and not
    one flat colour (something was drawn on the background)."""
    from matplotlib import image as mpimg
    pixels = mpimg.imread(str(path), format="png")      # float [height, width, channels]
    assert pixels.ndim == 3, pixels.shape
    height, width, channels = pixels.shape
    assert height > 100 and width > 100 and channels in (3, 4), pixels.shape
    colours = np.unique(pixels.reshape(-1, channels), axis=0)
    assert len(colours) > 1, f"{path}: a blank image of one colour {colours[0]}"


def tiny_losses_on_8(settings: tuple, steps: int, rows: int = 2, length: int = 256):
    """(losses, kernel): configs/tiny.py with `settings` ((key, value) pairs such as
    ("model.attention", "ring")) on 8 simulated devices of mesh seq, `steps` train steps on
    one packed batch of `rows` x `length` (so the loss must fall as it learns it)."""
    from parallel import mesh as mesh_lib
    from tests.test_any_length_training import packed_batch
    from train.state import build_run, init_state
    from train.step import make_train_step, put_batch
    from train.validate import validate_config

    config = tiny.get_config()
    config.mesh.update(dict(data=1, fsdp=1, seq=8, tensor=1))
    for key, value in settings:
        section, name = key.split(".")
        config[section][name] = value
    validate_config(settings_of(config), len(jax.devices()), platform="cpu")
    run = build_run(settings_of(config))
    state = init_state(run, seed=0)
    step = make_train_step(run, 1, length)
    batch = put_batch(packed_batch(rows=rows, length=length), run.mesh, rows, run.layout,
                      run.layout_parts)
    losses = []
    with mesh_lib.use_mesh(run.mesh):
        for _ in range(steps):
            state, metrics = step(state, batch, np.float32(2e-3))
            losses.append(float(metrics["loss"]))
    return tuple(losses), run.kernel
