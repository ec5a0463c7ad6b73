"""Philox4x32-10 and the fire-mask bits as Triton device functions (same arithmetic as
csrc/include/fastnca/philox.h; tested against the same known-answer vectors)."""
import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten rounds on uint32 blocks; k0, k1 are uint32."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def fire_bits(cell, seed_lo, seed_hi, step_lo):
    """24 random bits of cell ``cell`` (int64 block) at step ``step_lo`` (uint32)."""
    c0 = (cell & 0xFFFFFFFF).to(tl.uint32)
    c1 = (cell >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + step_lo
    c3 = tl.zeros_like(c0)
    out0, _, _, _ = philox4x32_10(c0, c1, c2, c3, seed_lo, seed_hi)
    return out0 >> 8
