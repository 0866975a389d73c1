"""Counter-based random streams, written as elementwise integer ops: the per-RE draws of the frame generator and
the dropout masks of the model.

Why not `jax.random` for these: both need one fresh word per element of large arrays (a full frame has ~43k REs
per sample; dropout on the attention weights of the default model needs B x heads x 256 x 256 words per layer and
step). `jax.random.bits` compiles to an unrolled threefry that XLA:CPU does not fuse into its consumers; it made
dropout 40% of a CPU training step and the grid noise several times the cost of the rest of the generator. A word
that is a pure function of (key, element index), computed in plain `uint32` arithmetic, fuses into whatever uses
it, and gives the same value for an element however the batch is sharded or chunked, so a sharded run, a
pilots-only batch and a full frame drawn from one key agree.

Two strengths, for two needs:
- `threefry2x32`: Threefry-2x32 with 20 rounds (Random123, Salmon et al., SC'11; the generator behind
  `jax.random`), bit-identical to `jax.extend.random.threefry_2x32`. Used for channel noise and data symbols,
  whose statistics are what the estimator learns and is scored on.
- `hash_bits`: two rounds of the murmur3 32-bit finaliser over the element index, keyed by two words drawn with
  `jax.random` from the caller's key. A few integer ops per element; statistically good enough for Bernoulli
  masks (tested), and the cheapest thing that keeps dropout off the critical path.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = 0x1BD11BDA


def threefry2x32(key0: jax.Array, key1: jax.Array, counter0: jax.Array, counter1: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32 (20 rounds): the two uint32 output words for counter (counter0, counter1) under key
    (key0, key1), elementwise over broadcast uint32 arrays."""
    u32 = jnp.uint32
    key0, key1 = jnp.asarray(key0, u32), jnp.asarray(key1, u32)
    schedule = (key0, key1, key0 ^ key1 ^ u32(_THREEFRY_PARITY))
    x0 = jnp.asarray(counter0, u32) + key0
    x1 = jnp.asarray(counter1, u32) + key1
    for block in range(5):
        for rotation in _THREEFRY_ROTATIONS[block % 2]:
            x0 = x0 + x1
            x1 = (x1 << u32(rotation)) | (x1 >> u32(32 - rotation))
            x1 = x1 ^ x0
        x0 = x0 + schedule[(block + 1) % 3]
        x1 = x1 + schedule[(block + 2) % 3] + u32(block + 1)
    return x0, x1


def _fmix32(x: jax.Array) -> jax.Array:
    """The murmur3 32-bit finaliser: a bijection of uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Uniform uint32 words of `shape`, one per element, from a keyed hash of the element's flat index."""
    return seeded_hash_bits(hash_seed(key), shape)


def hash_seed(key: jax.Array) -> jax.Array:
    """The two uint32 words that key `seeded_hash_bits`: what a function that must not take a PRNG key (a
    `jax.custom_vjp` argument) carries instead."""
    return jax.random.bits(key, (2,), jnp.uint32)


def seeded_hash_bits(seed: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """`hash_bits` from its two seed words (`hash_seed(key)`): the same words for the same key."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % (1 << 32))
        stride *= shape[axis]
    return _fmix32(_fmix32(index * jnp.uint32(0x9E3779B9) + seed[0]) ^ seed[1])


def uniform(words: jax.Array) -> jax.Array:
    """float32 uniform on [0, 1) from the top 24 bits (a float32 mantissa's worth) of uint32 words."""
    return (words >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def uniform_open(words: jax.Array) -> jax.Array:
    """float32 uniform on (0, 1] from the top 24 bits of uint32 words (safe under log)."""
    return (jnp.uint32(1 << 24) - (words >> 8)).astype(jnp.float32) * jnp.float32(2.0 ** -24)
