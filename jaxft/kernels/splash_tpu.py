"""TPU attention: jax's Pallas splash attention over packed rows, causal or sliding-window, with grouped KV heads.

Splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) takes a static mask (causal, local), segment
ids, and skips the blocks the static mask hides entirely (half the work at long lengths; all but `T * window` with a
window). Its kernel is built in each trace that calls it (splash caches the block-sparse mask tables itself): a
kernel kept from an earlier trace carries that trace's constant arrays, and `jax.export` of a second step holding
it fails ("Too many leaves for PyTreeDef").
Grouped-query attention runs the MQA form of the kernel (one KV head shared by the G query heads of a group) under
`vmap` over the KV heads and the batch, so K and V are never repeated per query head.

Splash lets segment 0 (padding) attend within itself where the oracle masks padding keys out entirely; padding
queries' outputs mean nothing either way and real queries never see a padding key, so every real token's output
and gradient are the same.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from jaxft.errors import UnsupportedConfigError

# Splash's tiles: the TPU's (8, 128) layout makes every block a multiple of 128 slots.
TILE = 128


def block_size(t: int) -> int:
    """The largest of 512, 256, 128 dividing `t` (bigger tiles amortise the per-block overhead on TPU)."""
    for block in (512, 256, TILE):
        if t % block == 0:
            return block
    raise UnsupportedConfigError(f"splash attention: sequence length {t} is not a multiple of {TILE}; "
                                 f"pad rows to a multiple of {TILE} or use the XLA path (model.attention: xla)")


def supported(t: int) -> bool:
    """Whether a length-`t` row fits splash attention's tiling (else use the XLA path)."""
    return t % TILE == 0


def _kernel(t: int, group: int, window: int | None, block: int, interpret: bool):
    """The MQA splash kernel for `group` query heads over one KV head: causal, or local `(window - 1, 0)`."""
    if window is None:
        head_mask = splash.CausalMask((t, t))
    else:
        # LocalMask keeps keys q - left <= k <= q + right: left = window - 1 is transformers' `q - k < window`.
        head_mask = splash.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa_single_device(splash.MultiHeadMask([head_mask] * group), block_sizes=sizes,
                                                interpret=interpret)


def splash_attention(q_bthd: jax.Array, k_bskd: jax.Array, v_bskd: jax.Array, segment_ids_bt: jax.Array, *,
                     window: int | None = None, block: int | None = None, interpret: bool = False) -> jax.Array:
    """Causal self-attention of packed rows, `q[B, T, H, hd]`, `k, v[B, T, K, hd]` (H a multiple of K) ->
    `[B, T, H, hd]`; same mask as `jaxft.kernels.flash_gpu.flash_attention` (a key not after the query, of the same
    segment, fewer than `window` slots before it). Softmax scale `hd ** -0.5`, applied to q in float32 and rounded
    once to q's dtype (splash takes pre-scaled queries). `window` must be a Python int (splash masks are static).
    `block` defaults to `block_size(T)`; `interpret=True` runs the kernel on any backend (the CPU tests).
    """
    b, t, h, hd = q_bthd.shape
    kh = k_bskd.shape[2]
    if k_bskd.shape[1] != t or h % kh:
        raise UnsupportedConfigError(f"splash_attention: q {q_bthd.shape} and k {k_bskd.shape} are not grouped "
                                     f"self-attention (same length, heads a multiple of the KV heads)")
    if window is not None and not isinstance(window, int):
        raise UnsupportedConfigError("splash_attention: the window must be a Python int (splash masks are static); "
                                     "a per-layer traced window takes the XLA path")
    block = block_size(t) if block is None else block
    kernel = _kernel(t, h // kh, window, block, interpret)
    g = h // kh
    q = (q_bthd.astype(jnp.float32) * hd ** -0.5).astype(q_bthd.dtype)
    q_bkgtd = q.reshape(b, t, kh, g, hd).transpose(0, 2, 3, 1, 4)
    k_bktd = k_bskd.transpose(0, 2, 1, 3)
    v_bktd = v_bskd.transpose(0, 2, 1, 3)
    seg = segment_ids_bt.astype(jnp.int32)

    def one_group(q_gtd, k_td, v_td, seg_t):
        return kernel(q_gtd, k_td, v_td, segment_ids=splash.SegmentIds(seg_t, seg_t))

    per_row = jax.vmap(one_group, in_axes=(0, 0, 0, None))  # over KV heads
    out_bkgtd = jax.vmap(per_row)(q_bkgtd, k_bktd, v_bktd, seg)
    return out_bkgtd.transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd).astype(q_bthd.dtype)
