"""Phase stamps of the decode kernel (its TRACE constexpr; bench/probes/decode_timeline.py reads
them): per program, (globaltimer ns, clock64) at stamps 0..4, then its SM id."""
import triton
import triton.language as tl

TRACE_SLOTS = 16  # int64 slots per program
_TRACE_SLOTS = tl.constexpr(TRACE_SLOTS)


@triton.jit
def trace_row(trace_ptr, split, num_seqs, s, kvh, HKV: tl.constexpr):
    """The slots of program (split, sequence s, kv head kvh)."""
    return trace_ptr + ((split * num_seqs + s) * HKV + kvh) * _TRACE_SLOTS


@triton.jit
def stamp(row_ptr, k: tl.constexpr, after):
    """Stamp k of a traced program: globaltimer and clock64, taken once the scalar `after`
    (>= 0) is known -- the branch on it makes the warp wait for the load behind it."""
    if after >= 0:
        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                        is_pure=False, pack=1)
        clk = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64,
                                        is_pure=False, pack=1)
        tl.store(row_ptr + 2 * k, now)
        tl.store(row_ptr + 2 * k + 1, clk)
        if k == 0:
            sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32,
                                           is_pure=True, pack=1)
            tl.store(row_ptr + _TRACE_SLOTS - 1, sm.to(tl.int64))
