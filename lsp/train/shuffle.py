"""O(1) random access into a seeded shuffle of range(n): `shuffled_position(i, n, seed, epoch)`.

Materialising `rng.permutation(n)` to read one entry costs O(n) time and memory (1.35 s at n = 24M). Instead, a
keyed 4-round Feistel network permutes the integers of [0, 4^h) with 4^h the smallest power of 4 >= n (so < 4n);
"cycle walking" applies it again while the value falls outside [0, n), which restricts a permutation of the large
domain to a permutation of [0, n) (the walk from any x < n must come back below n, as the cycle through x does).
Expected walk length < 4, each step 4 rounds of a 64-bit integer hash: constant time, no memory.

Round r maps (L, R) -> (R, L xor F_r(R)) with F_r(R) = mix(key + r * phi + R) mod 2^h (mix = splitmix64's
finaliser, key derived from (seed, epoch)); every round is invertible, hence so is the network (Luby-Rackoff).
"""
from __future__ import annotations

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
ROUNDS = 4


def mix64(x: int) -> int:
    """splitmix64 finaliser: a bijective avalanche hash of a 64-bit integer."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def shuffle_key(seed: int, epoch: int) -> int:
    return mix64((mix64(seed & MASK64) + GOLDEN * (epoch + 1)) & MASK64)


def feistel(x: int, half_bits: int, key: int) -> int:
    """One pass of the keyed permutation of [0, 4^half_bits)."""
    mask = (1 << half_bits) - 1
    left, right = x >> half_bits, x & mask
    for r in range(ROUNDS):
        left, right = right, left ^ (mix64((key + r * GOLDEN + right) & MASK64) & mask)
    return (left << half_bits) | right


def shuffled_position(i: int, n: int, seed: int, epoch: int = 0) -> int:
    """Entry i of the (seed, epoch) permutation of range(n); a bijection of range(n) for every seed and epoch."""
    assert 0 <= i < n, f"position {i} outside [0, {n})"
    half_bits = max(1, -(-max(n - 1, 1).bit_length() // 2))
    key = shuffle_key(seed, epoch)
    x = feistel(i, half_bits, key)
    while x >= n:
        x = feistel(x, half_bits, key)
    return x
