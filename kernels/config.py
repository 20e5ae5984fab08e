"""Launch heuristics: a frozen dataclass per kernel family, built from the shape by one small rule.

Every threshold says why it is what it is. The numbers are first estimates from the register
budget of sm_80/sm_90 (64K 32-bit registers per SM, at most 255 per thread), checked for spills by
``python -m normops.kernels.aot``; they are to be re-tuned against GPU timings (benchmarks/).

Every kernel is launched with ``maxnreg`` = 128, the registers a thread may take while 16 warps
fit in an SM (``common.launch_options``, the occupancy ``programs_per_wave`` plans for). The
spills quoted below as the reason for a limit were seen before that (up to 2026-11-25), when ptxas
chose its own, lower register targets: some of those limits may now be tighter than they need be,
which only GPU timings can say is worth changing.
"""
import contextlib
import contextvars
import dataclasses
import functools

import torch


def next_pow2(n):
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=None)
def sm_count(device_index):
    """Streaming multiprocessors of a CUDA device; asked once per device, on first launch."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def programs_per_sm(num_warps):
    """Programs of `num_warps` warps planned to an SM: 16 warps (see programs_per_wave)."""
    return max(1, 16 // num_warps)


def programs_per_wave(device, num_warps):
    """How many persistent programs fill the device at once. At the ~128 registers a thread these
    kernels use, an SM holds about 16 warps (64K registers / (128 x 32)), so 16 // num_warps
    programs per SM; more would only queue, and grow the per-program dW/dB partials ([programs, N]
    fp32 each) that are written and summed afterwards. Under the CPU interpreter, where programs
    run one after another, a handful; on meta tensors, the GPU `planning_for` names (the roofline
    plans launches for a GPU it does not have), else that handful."""
    if device.type == "cuda":
        sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
    elif device.type == "meta" and _planned_sms.get():
        sms = _planned_sms.get()
    else:
        return 4
    return sms * programs_per_sm(num_warps)


# The batch-invariant mode (normops.batch_invariant): every reduction is planned from the shape
# alone, never from the SM count. A backward's dW/dB partials then come from one program per
# BI_CHUNK_ROWS rows (a program p of g takes rows p, p + g, ... as today, g now a function of the
# row count), summed by the glue kernels in their fixed order: the same bits on any GPU, run to run.
# 32 rows: M = 4096 (a 4K-token batch) gives 128 programs, about one per SM of an H100 (132); fewer
# rows a program would grow the [g, N] fp32 partials (4 bytes x N a program and array: 2 KB of
# partials for 32 rows of 2-byte x is 1/16 more traffic) for no more parallelism than the GPU has.
# At most BI_MAX_PROGRAMS: a 1M-row batch takes 1024 programs of 1K rows, not 32K programs whose
# partials (32K x N x 4 bytes each) would outweigh x itself. The SM-count-dependent plans of the
# other families (BatchNorm's split, GroupNorm's looped-or-split) are made for BI_PLANNED_SMS
# SMs (an H100 SXM's) or pinned to a shape-only choice (GroupNormConfig).
BI_CHUNK_ROWS = 32
BI_MAX_PROGRAMS = 1024
BI_PLANNED_SMS = 132


def invariant_programs(tasks, task_rows=1):
    """The programs of a backward in the batch-invariant mode, for `tasks` units of work (row
    blocks, tiles) of `task_rows` rows each: one per BI_CHUNK_ROWS rows, between 1 and
    BI_MAX_PROGRAMS. A function of the shape only."""
    per_program = max(1, BI_CHUNK_ROWS // max(1, task_rows))
    return max(1, min(BI_MAX_PROGRAMS, -(-tasks // per_program)))


_planned_sms = contextvars.ContextVar("normops_planned_sms", default=None)


@contextlib.contextmanager
def planning_for(sms):
    """Within it, launches on meta tensors are planned for a GPU of `sms` multiprocessors."""
    token = _planned_sms.set(sms)
    try:
        yield
    finally:
        _planned_sms.reset(token)


# A row up to this many elements is held in registers for the whole forward: one read of x, one
# write of y. 16K elements over 16 warps (512 threads) is 32 fp32 values a thread for each live
# row-sized value (x, x - mean, y): 86-128 registers in the AOT table, within the 128 a thread
# gets at 512 threads, no spills.
FWD_ONE_PASS_MAX = 16384
# The backward keeps x, dy, x_hat, the gradient and the dw/db accumulators alive at once: about
# twice the forward's live values, so half the width. Rows of 4-byte (or wider) elements stop at
# 4K: the fp32 residual+gelu backward at 8K reached the 128-register cap of 16 warps and spilled 40
# bytes under triton 3.6 (sm_90), and fp64 needs twice fp32's registers. A gate (gated RMSNorm) is
# one more row-sized value, and its backward stops at 4K too: at 8K the bf16 gated backward spilled
# 48-144 bytes (sm_80, sm_90, triton 3.9).
BWD_ONE_PASS_MAX = 8192
BWD_ONE_PASS_MAX_WIDE = 4096
# Column block of the looped (wide-row) kernels: 4K fp32 values over 8 warps = 16 a thread.
# (16 warps spilled 8 bytes in the looped forward on sm_90.)
LOOP_BLOCK_N = 4096
# The looped forward's block is twice that, over 16 warps: its grid is capped so that the rows in
# flight fit L2 (row_norm_fwd_programs; 114 programs at 64K with a residual), and at 4K columns
# those programs kept 16 KB of x and r in flight each, latency-bound at ~2.7 TB/s in the
# roofline; at 8K, 32 KB. (At 8 warps, 32 values a thread, the residual + gelu forward spilled
# 8 bytes in bf16 and 80 in fp32 under triton 3.6.)
FWD_LOOP_BLOCK_N = 8192
FWD_LOOP_WARPS = 16
# Narrow rows are packed several to a program (forward) or to a loop iteration (backward), so
# that each loads enough bytes to keep DRAM busy. Rows of at most WARP_ROW elements lie within a
# warp (8 values a thread), so a block of them is reduced with shuffles alone; a block of wider
# rows spreads each row over several warps and its reductions over shared memory: at 512 the
# forward compiled to 11-15 barriers for 2-8 rows against 3 for one (sm_90), and at 1K 11 for two
# rows against 3. So the forward packs rows of up to WARP_ROW elements into FWD_PACKED_ELEMENTS
# (16 rows of 256 over 16 warps: 3 barriers, 25 KB of loads) and runs wider rows one a program.
# The backward's loop packs to BWD_PACKED_ELEMENTS (its loop body has 0 barriers up to 256, 3 at
# 512 for 2 rows as for one, sm_90) and takes one row an iteration from 1K on.
WARP_ROW = 256
FWD_PACKED_ELEMENTS = 4096
BWD_PACKED_ELEMENTS = 1024
MAX_ROWS_PER_PROGRAM = 16
# The backward's persistent grid leaves the dw/db partials in L2 for the glue kernel, and the
# looped backward re-reads each row (x and dy) and read-modify-writes its program's partial rows
# from L2: these are the bytes of L2 (50 MB on an H100, 40 MB on an A100) it plans to fill.
L2_BUDGET = 30_000_000

LOOP_WARPS = 8  # for the looped kernels' LOOP_BLOCK_N columns: 16 fp32 values a thread
# The row norms' looped backward kernels hold more per value (x, dy, x_hat, the gradient, dw/db):
# at 8 warps, under the 128-register launch budget (common.launch_options), the fp32
# residual+gelu backward spilled 16 bytes (sm_90, triton 3.6); at 16 (8 values a thread), none.
BWD_LOOP_WARPS = 16


def _warps(elements, per_warp):
    """One warp per `per_warp` elements of a block, between 4 and 16 (more than 16 warps caps a
    thread at 64 registers). The row norms use 256 (8 fp32 values a thread) forward and backward:
    at 512, fp32 weights with bf16 x spilled 4 bytes at 2K on sm_80 in the forward, and under the
    128-register launch budget the fp32 residual+gelu backward 8 bytes at 4K (sm_90, triton 3.6)."""
    return max(4, min(16, elements // per_warp))


@dataclasses.dataclass(frozen=True)
class RowNormConfig:
    """Launch settings of the LayerNorm/RMSNorm kernels for one (rows, width) shape.

    block_n: columns per block (a power of two); one_pass: the row fits in one block and stays in
    registers (otherwise the kernel loops over column blocks, reading x twice); block_m: rows per
    program (forward) or per loop iteration (backward), narrow rows only; num_warps: warps per
    program.
    """
    block_n: int
    block_m: int
    num_warps: int
    one_pass: bool

    @classmethod
    def forward(cls, n):
        block_n = next_pow2(max(n, 1))
        return cls._make(block_n, FWD_ONE_PASS_MAX, FWD_PACKED_ELEMENTS if block_n <= WARP_ROW else block_n,
                         FWD_LOOP_WARPS, FWD_LOOP_BLOCK_N)

    @classmethod
    def backward(cls, n, elem_bytes=2, gated=False):
        """elem_bytes: the size of an element of x; gated: a gate is read (and dgate written)."""
        wide = elem_bytes > 2 or gated
        return cls._make(next_pow2(max(n, 1)), BWD_ONE_PASS_MAX_WIDE if wide else BWD_ONE_PASS_MAX,
                         BWD_PACKED_ELEMENTS, BWD_LOOP_WARPS)

    @classmethod
    def _make(cls, block_n, one_pass_max, packed, loop_warps, loop_block=LOOP_BLOCK_N):
        if block_n > one_pass_max:
            return cls(loop_block, 1, loop_warps, False)
        block_m = max(1, min(MAX_ROWS_PER_PROGRAM, packed // block_n))
        return cls(block_n, block_m, _warps(block_m * block_n, 256), True)


def row_norm_fwd_programs(n, elem_bytes, residual, programs):
    """The looped forward's persistent grid: at most `programs` (those that fit the device), and
    few enough that the rows in flight (x, and h with a residual: n * elem_bytes each) stay in L2
    (L2_BUDGET) for pass 2's re-read: at 64K bf16, 228 programs rather than 264, past which the
    second read of x would come from DRAM."""
    return max(1, min(programs, L2_BUDGET // (n * elem_bytes * (2 if residual else 1))))


def row_norm_bwd_programs(cfg, n, elem_bytes, n_partials, programs):
    """The backward's persistent grid, from `programs`, those that fit the device at once
    (programs_per_wave: 16 warps an SM, so 4 programs of 4 warps at 1K): each with its own fp32
    partial rows (dw, db: `n_partials` of them, 4 * n bytes each) that the glue kernel sums. The looped backward also
    needs, per program, its partial rows and the row it is on (x and dy, 2 * n * elem_bytes) to
    stay in L2 (L2_BUDGET) between pass 1 and pass 2 and from one row to the next: at 64K bf16
    with dw and db, 768 KB a program, so 38 programs rather than 132."""
    if cfg.one_pass:
        return programs
    per_program = n * (4 * n_partials + 2 * elem_bytes)
    return max(1, min(programs, L2_BUDGET // per_program))


@dataclasses.dataclass(frozen=True)
class ParamGradsConfig:
    """The row norms' glue kernel (row_norm._row_norm_param_grads_kernel): a program sums block_n
    columns of the [programs, n] partials, block_g programs' rows at a time.

    Its work is only the partials (4 to 8 MB at 1K-8K on an H100), so what decides its speed is the
    bytes it has in flight: block_n = n / 128 columns (at least 8, 32 bytes of fp32: a sector),
    which makes 128 programs or more, each loading block_g x block_n = 2K values an array per
    iteration (16 a thread at 4 warps)."""
    block_g: int
    block_n: int
    num_warps: int

    @classmethod
    def make(cls, n, programs):
        block_n = max(8, min(128, next_pow2(n) // 128))
        return cls(max(1, min(next_pow2(programs), 2048 // block_n)), block_n, 4)


# --- GroupNorm / InstanceNorm ----------------------------------------------------------------

# A program's tile is [block_g groups, block_cg channels, block_s positions] (kernels/group_norm.py).
# A whole group (or several) up to these many tile elements stays in registers: the forward reads
# x once and the backward x and dy once. Same register budget as the row norms' one-pass limits,
# except the channels_last forward: its 16K tiles took 107-128 registers and spilled 16 bytes with
# gelu (NCHW: 60-90), so it stops at 8K.
GN_FWD_ONE_PASS_MAX = 16384
GN_FWD_ONE_PASS_MAX_CHANNELS_LAST = 8192
GN_BWD_ONE_PASS_MAX = 8192
# Larger groups run one of two looped algorithms:
#  - looped: one program a group block does the group's statistics loop, then its normalize (dx)
#    loop, re-reading the group it just read from L2: one launch forward, one (+ the dw/db glue)
#    backward. Taken when the group blocks alone keep enough loads in flight
#    (GN_LOOP_MIN_BYTES_IN_FLIGHT).
#  - split: too few group blocks to fill the GPU (a VAE or video at batch 1 has 32 groups): each
#    group's positions are cut into `split` chunks, a statistics (sums) kernel writes per-chunk
#    partials, the normalize (dx) kernel combines them. Two launches forward, three backward.
# Looped programs: 8K-element tiles over 16 warps (16 values a thread, the one-pass budget), one
# program an SM (16 warps at 128 registers). The NCHW forward's loops take two fp32 tiles an
# iteration, four 16-bit ones (unroll, normalize_unroll; a 16K tile's Welford state spilled 16
# bytes): 64 KB of loads in flight a program whatever the dtype. At two bf16 tiles (32 KB, as the
# backward's x and dy tiles) the SD VAE decoder's 1x512x64x64 (32 programs, one a group) was
# latency-bound and lost to split; at four it beats split (kernels/roofline.py: 26% of peak vs 21%)
# with no spill (python -m normops.kernels.aot). No reduction inside the loops.
GN_LOOP_TILE = 8192
GN_LOOP_WARPS = 16
# Looped or split: the one the static model (kernels/roofline.py) predicts faster. Looped moves
# the op's bytes at Little's-law bandwidth (its programs' loads in flight over a ~700 ns DRAM
# latency, at most ~3 TB/s); split pays a launch more (~2 us) but fills the GPU, and re-reads x
# (and dy) from DRAM when they do not fit GN_L2_BYTES. So SD U-Net's 2x1280x16x16 (64 groups, 1
# MB in flight) runs looped; a VAE's 1x512x128x128 (32 groups of 512 KB in bf16) splits backward
# (x and dy) and in fp32, and loops in a 16-bit forward (kernels/roofline.py: 56% of peak vs 49%).
GN_DRAM_LATENCY_NS = 700
GN_PEAK_BYTES_PER_NS = 3000
GN_LAUNCH_NS = 2000
# Split programs: 4K-element tiles over 8 warps (8 values a thread), at least 4 programs an SM
# (GN_SPLIT_PROGRAMS_PER_SM) so that whatever the registers allow resident, the SMs hold 2 or
# more programs' loads in flight (the video GroupNorm's statistics at 2.2 programs an SM were
# latency-bound).
GN_SPLIT_TILE = 4096
GN_SPLIT_PROGRAMS_PER_SM = 4
# channels_last tiles are smaller: their rows are a few contiguous channels, every element with
# its own address, and ptxas held the 8-warp kernels to 80-128 registers: at 4K elements over 8
# warps the gelu backward spilled 8-24 bytes on sm_80, at 2K the sums kernels of 8x4x64 tiles 8
# bytes (sm_80 and sm_90), at 2K and 4 warps the gelu sums kernel 8 bytes. At 8 values a thread
# (1K over 4 warps) no looped channels_last kernel spilled, any variant, over the exhaustive grid
# (python -m normops.kernels.aot --exhaustive; at most 138 registers). The looped programs take 16
# values a thread (8K at 16 warps): at 8 their 64 programs of SD U-Net's 2x1280x16x16 kept 1 MB in
# flight, half the bandwidth. The channels_last looped forward takes 4K tiles (8 values a thread),
# its statistics loop two an iteration and its normalize loop four: at 8K tiles and one (its Welford
# state at 127-128 registers) 2x320x64x64's 64 programs kept 1 MB in flight and lost to split; 8K
# with two spilled 216 bytes (bf16), 8K with a normalize loop of two 8 bytes; 4K, 2 and 4: none.
GN_SPLIT_TILE_CHANNELS_LAST = 1024
GN_SPLIT_WARPS_CHANNELS_LAST = 4
GN_LOOP_TILE_CHANNELS_LAST = 4096
# The channels_last looped backward stays at 8 values a thread (4K over 16 warps): at 8K its gelu
# kernels spilled 32-96 bytes on sm_80 (triton 3.9).
GN_BWD_LOOP_TILE_CHANNELS_LAST = 4096
# A looped program re-reads its group from L2 only while the groups of all the programs in flight
# fit there: the persistent grid is capped so that programs x the group's bytes (x, and dy
# backward) stay within this (H100: 50 MB of L2, of which the bandwidth model counts ~30 MB usable;
# less, as the output's writes pass through it too).
GN_L2_BYTES = 24 << 20
# The channels_last one-pass backward stops at 4K: its 8K tiles (16 warps) spilled 8-16 bytes.
GN_BWD_ONE_PASS_MAX_CHANNELS_LAST = 4096
# A tile holds all of its groups' channels, and per-channel state (w, b, and the backward's two
# sums) grows with them: at 2048 channels a group the looped backward spilled 8-16 bytes on sm_80
# and sm_90 (python -m normops.kernels.aot). Wider groups (GroupNorm(1, C) with C > 1024) run the
# torch backend instead.
GN_MAX_GROUP_CHANNELS = 1024
# channels_last rows hold a sample's channels contiguously: a tile row spans at least this many
# channels (64 contiguous bytes at bf16), taking several groups when groups are narrow.
GN_MIN_ROW_CHANNELS = 32
# Tiny groups are packed several to a program until a tile holds this many elements.
GN_MIN_TILE = 1024
# At most this many chunks a group (past ~4 programs an SM per group block, more only adds partials).
GN_MAX_SPLIT = 256
# Every normalize program combines its groups' chunk partials, [block_g (x block_cg backward),
# split_block] at a time (at 1024 a 16x64 combine spilled 8 bytes in the channels_last forward at
# 4 warps).
GN_COMBINE_TILE = 256
# A sample of 2**31 elements or more (kernels/group_norm.py's LARGE flag: int64 row starts) takes
# the split kernels, never the looped ones: with LARGE the looped channels_last 4x8x128 forward
# spilled 8-24 bytes on sm_80 (triton 3.9), and under triton 3.6 the NCHW 1x16x512 and 1x8x1024
# fp32 forwards 8 bytes (sm_90), the channels_last 16x1x256 gelu backward 56-72 (sm_80, sm_90); the
# split kernels none (python -m normops.kernels.aot). Such a sample has few groups to a batch
# anyway, where split is the pick.


@dataclasses.dataclass(frozen=True)
class GroupNormConfig:
    """Launch settings of the GroupNorm/InstanceNorm kernels for one (N, C, S, G, layout) shape.

    block_g x block_cg x block_s: the tile (groups, channels per group padded to a power of two,
    spatial positions); one_pass: each program's groups fit in one tile and stay in registers.
    Otherwise each group's positions are cut into `split` chunks of `chunk` positions (a multiple
    of block_s): split == 1 is the looped algorithm (the whole group in one program, a persistent
    grid of `programs`), split > 1 the split one (one program a chunk); split_block: chunks
    combined at a time. num_warps: warps per program. programs: the grid (0: one program a task).
    unroll: tiles an iteration of the forward's statistics loop; normalize_unroll: of its normalize
    loop.
    """
    block_g: int
    block_cg: int
    block_s: int
    num_warps: int
    one_pass: bool
    split: int
    chunk: int
    split_block: int = 1
    programs: int = 0
    unroll: int = 1
    normalize_unroll: int = 1

    @classmethod
    def forward(cls, n, c, s, groups, channels_last, sms, elem_bytes=2, large=False, invariant=False):
        """sms: programs_per_wave(device, GN_LOOP_WARPS), one 16-warp program an SM (the SM count
        on a GPU); elem_bytes: the size of an element of x; large: a sample of 2**31 elements or
        more (not looped, see above); invariant: the batch-invariant mode's plan (see _make)."""
        one_pass_max = GN_FWD_ONE_PASS_MAX_CHANNELS_LAST if channels_last else GN_FWD_ONE_PASS_MAX
        unroll = 2 if channels_last else 8 // elem_bytes  # NCHW: two fp32 tiles, four 16-bit (see above)
        return cls._make(n, c, s, groups, channels_last, sms, one_pass_max, 256, elem_bytes, elem_bytes,
                         unroll, GN_LOOP_TILE_CHANNELS_LAST, 4 if channels_last else unroll, large, invariant)

    @classmethod
    def backward(cls, n, c, s, groups, channels_last, sms, elem_bytes=2, large=False, invariant=False):
        one_pass_max = GN_BWD_ONE_PASS_MAX_CHANNELS_LAST if channels_last else GN_BWD_ONE_PASS_MAX
        # channels_last: one warp per 256 elements (8 values a thread). At 512, under the
        # 128-register launch budget, the gelu backward with fp32 parameters spilled 8-24 bytes in
        # 10 (triton 3.9) and 33 (3.6) one-pass tiles of the exhaustive grid; at 256, none.
        # Looped: x and dy are both re-read, twice the group's bytes in L2.
        return cls._make(n, c, s, groups, channels_last, sms, one_pass_max, 256 if channels_last else 512,
                         elem_bytes, 2 * elem_bytes, 1, GN_BWD_LOOP_TILE_CHANNELS_LAST, 1, large, invariant)

    @classmethod
    def _make(cls, n, c, s, groups, channels_last, sms, one_pass_max, per_warp, elem_bytes, group_bytes, unroll,
              loop_tile_channels_last, normalize_unroll, no_loop=False, invariant=False):
        """group_bytes: the bytes of an element of the tensors the loops read (x; x and dy); unroll,
        normalize_unroll: tiles an iteration of the looped statistics and normalize (dx) loops;
        no_loop: split rather than looped. invariant: the batch-invariant mode, where a group's
        arithmetic (the tile, and whether its statistics are one program's or a merge of chunks')
        depends on (C, S, G) alone, never on N or the SM count: the one-pass tile as always, else
        looped with the widest tile (the grid, which only spreads whole groups over programs,
        still fills the device), and for a 2**31-element sample (no_loop) split into a fixed
        number of chunks, GN_MAX_SPLIT at most. Its cost: a batch of few groups (a VAE at N = 1)
        runs looped where split would fill the GPU."""
        cg = c // groups
        block_cg = next_pow2(cg)
        block_s = next_pow2(s)
        max_g = next_pow2(groups)
        block_g = min(max_g, max(1, GN_MIN_ROW_CHANNELS // block_cg)) if channels_last else 1
        if block_g * block_cg * block_s <= one_pass_max:
            while block_g < max_g and block_g * block_cg * block_s < GN_MIN_TILE:
                block_g *= 2
            tile = block_g * block_cg * block_s
            return cls(block_g, block_cg, block_s, _warps(tile, per_warp), True, 1, s)
        loop_tile = loop_tile_channels_last if channels_last else GN_LOOP_TILE

        def looped(g):  # (persistent grid, whether looped beats split) with g groups a tile
            tasks = n * -(-groups // g)
            # at most one program an SM, their groups within GN_L2_BYTES, the same work each
            cap = max(1, min(sms, GN_L2_BYTES // (g * cg * s * group_bytes)))
            grid = -(-tasks // -(-tasks // cap))
            tile_bytes = grid * min(loop_tile, g * block_cg * block_s) * group_bytes
            # the two loops take turns, each at its own rate: their harmonic mean
            in_flight = 2 / (1 / (tile_bytes * unroll) + 1 / (tile_bytes * normalize_unroll))
            reads = n * c * s * group_bytes  # x, or x and dy
            moved = reads + n * c * s * group_bytes // (2 if group_bytes > elem_bytes else 1)  # + y or dx
            reread = reads if reads > GN_L2_BYTES else 0
            loop_ns = moved / min(GN_PEAK_BYTES_PER_NS, in_flight / GN_DRAM_LATENCY_NS)
            return grid, loop_ns <= GN_LAUNCH_NS + (moved + reread) / GN_PEAK_BYTES_PER_NS

        loop_g = max(1, min(block_g, loop_tile // block_cg))
        while loop_g > 1 and not invariant and not looped(loop_g)[1]:
            loop_g //= 2  # channels_last: rows of fewer groups, for more programs
        grid, wins = looped(loop_g)
        if (wins or invariant) and not no_loop:
            if invariant and not channels_last and block_cg >= GN_MAX_GROUP_CHANNELS:
                # the mode's looped NCHW tile of a 1024-channel group (where today's plan splits it):
                # 1x1024x8 spilled 8-16 bytes at the statistics loop's unroll (sm_90); 1x1024x4 none
                loop_tile //= 2
            block_s = max(1, min(block_s, loop_tile // (loop_g * block_cg)))
            return cls(loop_g, block_cg, block_s, GN_LOOP_WARPS, False, 1, -(-s // block_s) * block_s, 1,
                       grid, unroll, normalize_unroll)
        loop_tile = GN_SPLIT_TILE_CHANNELS_LAST if channels_last else GN_SPLIT_TILE
        warps = GN_SPLIT_WARPS_CHANNELS_LAST if channels_last else LOOP_WARPS
        block_g = max(1, min(block_g, loop_tile // block_cg))
        block_s = max(1, min(block_s, loop_tile // (block_g * block_cg)))
        n_tiles = -(-s // block_s)
        tasks = n * -(-groups // block_g)
        # programs a wave: sms x GN_SPLIT_PROGRAMS_PER_SM of 8 warps (of 4 warps, twice as many)
        programs = GN_SPLIT_PROGRAMS_PER_SM * LOOP_WARPS // warps * sms
        # no_loop: two chunks at least (one would be the looped kernels, at one program a task)
        split = max(1, min(n_tiles, GN_MAX_SPLIT, max(-(-programs // tasks), 2 if no_loop else 1)))
        if invariant:
            split = min(n_tiles, GN_MAX_SPLIT)
        chunk = -(-n_tiles // split) * block_s
        split = -(-s // chunk)
        split_block = min(next_pow2(split), max(1, GN_COMBINE_TILE // (block_g * block_cg)))
        # channels_last split statistics take two tiles an iteration: at one, a 1K tile is 16 bytes a
        # thread, and the pivot's load outside the loop a quarter of it, one more latency-bound region
        # for the model (kernels/roofline.py). NCHW's 4K tiles at two spilled 8 bytes (sm_90, bf16).
        return cls(block_g, block_cg, block_s, warps, False, split, chunk, split_block, 0, 2 if channels_last else 1)


# --- BatchNorm -------------------------------------------------------------------------------

# A program's tile is [block_n samples (or rows), block_c channels, block_s positions] of the
# (N', C, S') view of kernels/batch_norm.py; it reduces over the first and last axes.
# A channel block's whole reduction up to these many tile elements stays in registers (one read of
# x forward, of x and dy backward). The forward stops at 8K, half the row norms' budget: its 16K
# tiles reached ptxas' 128-register cap at 16 warps, and with a position axis not a multiple of 16
# (no vector loads: every element has its own address) spilled 8 bytes (256x1x64, gelu, sm_90).
# Its warps: one per 1024 elements (8 at 8K, 32 values a thread): at 16 warps the 8K gelu forward
# spilled 8 bytes under triton 3.6 (sm_80, 64 registers); at 8, 128 registers and no spill.
BN_FWD_ONE_PASS_MAX = 8192
BN_FWD_ELEMENTS_PER_WARP = 1024
BN_BWD_ONE_PASS_MAX = 8192
# Positions not a multiple of 16 (2, 7x7, 14x14), or in the (N * S, C, 1) view channels not a
# multiple of 16, get no vector loads, and every element its own 64-bit address, which costs
# registers: one-pass tiles stop at 4K, one warp per 128 elements (4 values a thread, 8 at 4K and
# 16 warps). At 8K the gelu kernels spilled 8-88 bytes (4096x1x2 forward at 8 warps, sm_80, triton
# 3.9; 32x128x2 and 32x32x8, 8 and 16 warps, triton 3.6); at one warp per 256, the 8x128x2 eval
# backward still spilled 8 bytes under triton 3.6 (sm_90, 8 warps).
BN_UNALIGNED_ONE_PASS_MAX = 4096
BN_UNALIGNED_ELEMENTS_PER_WARP = 128
# The looped (split) kernels: 8 warps a program, and 16 // 8 = 2 programs an SM, the launch budget
# (common.launch_options caps the registers so that 16 warps fit), so 132 x 512 threads on an
# H100. Each thread loads this many bytes of each tensor per loop iteration, which sets the tile
# (8K bf16 or 4K fp32 values forward): 132 x 512 x 64 B = 4.3 MB of loads in flight forward (x)
# and backward (x and dy, 32 B each), twice the ~2.1 MB (3.0 TB/s x 700 ns DRAM latency) that
# saturates DRAM, which leaves room for masked (idle) lanes and the latency of a loop's tail.
# The loops keep per-lane accumulators (2 per loaded value), so the backward's two tensors take
# half the forward's bytes each: 4 live values per loaded one, as the forward's 3.
BN_LOOP_WARPS = 8
BN_FWD_LOOP_BYTES = 64
BN_BWD_LOOP_BYTES = 32
# An unaligned contiguous axis (every element its own 64-bit address, no vector loads): positions
# not a multiple of 16 (7x7), or channels in the (N * S, C, 1) view. At 64 B (32 bf16 values) a
# thread the training forward's statistics kernel spilled 120 bytes (7x7, sm_90, triton 3.9, 128
# registers), and the normalize kernel too (gelu, 104-168 bytes, 32x4x64 and 2048x4x1 tiles,
# sm_80); at 32 B none. The 7x7 loads in flight then reach ~1.7 MB (49 of every 64 lanes busy),
# below saturation. The backward on unaligned channels (gelu, 1024x4x1 tiles, sm_80) spilled
# 40-176 bytes at 32 B of x and of dy a thread: 16 B each there (7x7 positions kept 32 B: no spill).
BN_UNALIGNED_FWD_LOOP_BYTES = 32
BN_UNALIGNED_CHANNELS_BWD_LOOP_BYTES = 16
# Rows of the (N * S, C) channels_last view span this many channels: 128 contiguous bytes at bf16.
BN_ROW_CHANNELS = 64
# NCHW tiles take channels until a sample's part of the tile is at least this many contiguous
# elements (a channel's positions are contiguous, its neighbour's follow): 512 bytes at bf16.
BN_MIN_RUN = 256
# NCHW position blocks are powers of two; the largest one that pads S by at most 1/8 is taken
# (S = 12544 = 112 x 112: 1024, 13 blocks, 6% idle lanes; 4096 would leave 23% idle), none below 64.
BN_MIN_BLOCK_S = 64
# At most this many chunks a channel block: the finalize kernel combines them ([split, 3, C] partials).
BN_MAX_SPLIT = 1024
# The finalize kernel combines [BN_FINALIZE_SPLIT chunks, BN_FINALIZE_C channels] at a time.
BN_FINALIZE_SPLIT = 64
BN_FINALIZE_C = 32


def _position_block(s, cap):
    """The position block of an NCHW tile (see BN_MIN_BLOCK_S)."""
    best = top = min(next_pow2(s), cap)
    candidates = []
    while top >= min(next_pow2(s), BN_MIN_BLOCK_S):
        candidates.append(top)
        top //= 2
    padded = lambda b: -(-s // b) * b  # noqa: E731
    for b in candidates:
        if padded(b) * 8 <= s * 9:
            return b
    return min(candidates, key=padded) if candidates else best


@dataclasses.dataclass(frozen=True)
class BatchNormConfig:
    """Launch settings of the BatchNorm kernels for one (N', C, S') view (kernels/batch_norm.py).

    block_n x block_c x block_s: the tile; one_pass: a channel block's whole N' x S' is one tile
    and stays in registers (training only: eval has no reduction in the forward). Otherwise the
    tiles of each channel block are cut into `split` chunks of `chunk` tiles, so that channel blocks
    x chunks fill the GPU once: partial statistics (or gradient sums) per chunk, combined by a
    finalize kernel [finalize_split x finalize_c at a time], then a normalize (dx) pass.
    num_warps: warps per program.

    `sms`: programs of 16 warps that fill the device (its SM count; programs_per_wave(device, 16)),
    of which an SM holds 16 // num_warps programs; elem_bytes: the size of an element of x.
    """
    block_n: int
    block_c: int
    block_s: int
    num_warps: int
    one_pass: bool
    split: int
    chunk: int
    finalize_split: int = 1
    finalize_c: int = 1

    @classmethod
    def forward(cls, n, c, s, training, sms, elem_bytes):
        loop_bytes = BN_UNALIGNED_FWD_LOOP_BYTES if (s % 16 if s > 1 else c % 16) else BN_FWD_LOOP_BYTES
        return cls._make(n, c, s, sms, BN_FWD_ONE_PASS_MAX if training else 0, BN_FWD_ELEMENTS_PER_WARP,
                         loop_bytes, elem_bytes)

    @classmethod
    def backward(cls, n, c, s, training, sms, elem_bytes):
        loop_bytes = BN_UNALIGNED_CHANNELS_BWD_LOOP_BYTES if s == 1 and c % 16 else BN_BWD_LOOP_BYTES
        return cls._make(n, c, s, sms, BN_BWD_ONE_PASS_MAX, 512, loop_bytes, elem_bytes)

    @classmethod
    def _make(cls, n, c, s, sms, one_pass_max, per_warp, loop_bytes, elem_bytes):
        if (s % 16 if s > 1 else c % 16) and one_pass_max:  # the contiguous axis: positions, or channels
            one_pass_max, per_warp = BN_UNALIGNED_ONE_PASS_MAX, BN_UNALIGNED_ELEMENTS_PER_WARP
        warps = BN_LOOP_WARPS
        loop_tile = max(1, warps * 32 * loop_bytes // elem_bytes)
        if s == 1:
            block_c, block_s = min(next_pow2(c), BN_ROW_CHANNELS), 1
        else:
            block_s = _position_block(s, loop_tile)
            block_c = min(next_pow2(c), max(1, BN_MIN_RUN // block_s))
        tile = next_pow2(n) * block_c * next_pow2(s)
        if tile <= one_pass_max:
            return cls(next_pow2(n), block_c, next_pow2(s), _warps(tile, per_warp), True, 1, 1)
        block_n = max(1, min(next_pow2(n), loop_tile // (block_c * block_s)))
        block_c = max(block_c, min(next_pow2(c), loop_tile // (block_n * block_s)))  # few samples: more channels
        tiles = -(-n // block_n) * -(-s // block_s)
        c_blocks = -(-c // block_c)
        # Programs do equal work, so they are sized for one wave: past it, a second wave that is
        # partly empty would cost as much as a full one.
        programs = sms * max(1, 16 // warps)
        split = max(1, min(tiles, BN_MAX_SPLIT, programs // c_blocks))
        chunk = -(-tiles // split)
        split = -(-tiles // chunk)
        return cls(block_n, block_c, block_s, warps, False, split, chunk,
                   min(next_pow2(split), BN_FINALIZE_SPLIT), min(next_pow2(c), BN_FINALIZE_C))


# --- adaLN modulation (kernels/ada_norm.py) -----------------------------------------------------
# Whole rows in registers, forward and backward, as the row norms' one-pass kernels (same packing:
# RowNormConfig's block_m/num_warps rule). The forward holds about what the row norm's does (x, h, y
# plus per-sample scale/shift/gate rows), so the same 256 elements a warp: 32-88 registers to 8192
# (python -m normops.kernels.aot --families ada_norm, sm_90, triton 3.9). The backward holds up to
# four per-program column sums (dscale's, dshift's, dw's S and, with a gate, dgate's; dw and db come
# from per-sample sums in the glue) on top of the row norm's working set: at 4096, 76-109 registers
# whatever the flags; at 8192 (16 values a thread a row) three sums fit with 16-bit h (124 registers,
# no spills: LayerNorm with weight and bias, "torch" casting, bf16), not with fp32 h (8-16 bytes of
# spills) nor with dgate's fourth (112-288 bytes with residual + gate). So the backward runs its
# kernel to ADA_BWD_ONE_PASS_MAX, to ADA_BWD_HALF_ONE_PASS_MAX for fp16/bf16 h without a dgate
# (diffusers' adaLN twins, normops.hf, call it without a gate), the torch backend past them
# (ada_norm.supported); both past ADA_ONE_PASS_MAX.
ADA_ONE_PASS_MAX = 8192
ADA_BWD_ONE_PASS_MAX = 4096
ADA_BWD_HALF_ONE_PASS_MAX = 8192
# The backward's grid (P, B): P programs a sample, B * P about one wave (programs_per_wave), never
# more than the sample has row blocks (every program writes its partial rows).
# The glue (its one launch) sums up to four [P, block_n] arrays at once, not the row norms' two:
# tiles of 1024 (8 values a thread an array at 4 warps); ParamGradsConfig's 2048 took 128 registers
# and spilled 8 bytes at 8192 (sm_90).
ADA_GLUE_TILE = 1024


@dataclasses.dataclass(frozen=True)
class AdaNormConfig:
    """Launch settings of the adaLN kernels for rows of d: block_n = next_pow2(d) columns, block_m
    rows a program (forward) or a loop iteration (backward), num_warps. programs: the backward's
    programs a wave, None: programs_per_wave (the AOT compiler and tests may pin it)."""
    block_n: int
    block_m: int
    num_warps: int
    programs: int = None

    @staticmethod
    def fits(d, backward=False, gated=False, itemsize=4):
        """Whether rows of d fit the (backward) kernel; backward: with a dgate wanted (gated), h of itemsize bytes."""
        if not backward:
            return d <= ADA_ONE_PASS_MAX
        return d <= (ADA_BWD_HALF_ONE_PASS_MAX if itemsize <= 2 and not gated else ADA_BWD_ONE_PASS_MAX)

    @staticmethod
    def glue(d, programs):
        """The glue kernel's ParamGradsConfig: ParamGradsConfig's columns, ADA_GLUE_TILE tiles."""
        pg = ParamGradsConfig.make(d, programs)
        return ParamGradsConfig(max(1, min(pg.block_g, ADA_GLUE_TILE // pg.block_n)), pg.block_n, pg.num_warps)

    @classmethod
    def forward(cls, d):
        block_n = next_pow2(max(d, 1))
        block_m = max(1, min(MAX_ROWS_PER_PROGRAM, FWD_PACKED_ELEMENTS // block_n))
        return cls(block_n, block_m, _warps(block_m * block_n, 256))

    @classmethod
    def backward(cls, d):
        block_n = next_pow2(max(d, 1))
        block_m = max(1, min(MAX_ROWS_PER_PROGRAM, BWD_PACKED_ELEMENTS // block_n))
        return cls(block_n, block_m, _warps(block_m * block_n, 256))


def ada_norm_bwd_programs(cfg, b, t, programs):
    """P, the backward's programs a sample: about `programs` in all, at most T's row blocks."""
    blocks = max(1, -(-t // cfg.block_m))
    return max(1, min(blocks, -(-programs // max(b, 1))))


# --- Channels-first LayerNorm (ConvNeXt's, kernels/channels_first.py) ---------------------------

# A program's tile is [block_c channels, block_s positions] of one sample's (C, S) view, laid out so
# that the reduction over C stays inside a warp where it can: the kernels build it as a 4-D
# [block_c / c_lane, block_s / s_in, c_lane, s_in] tensor whose contiguous axis (s_in for NCHW,
# c_lane for channels_last) takes the 16-byte vectors and the lanes, the other lane axis next, and
# the warps go to the positions (block_s / s_in) before the channels: a warp holds whole columns,
# reduced in registers and by shuffles, no shared memory and no barrier. Only when a thread's
# share of a column would pass the budget below do warps split the channels (C > 32 x budget / v).
#
# Elements of a tile tensor a thread holds: 16 forward, 8 backward (x, dy, x_hat and g live at
# once). At 32 and 16 the NCHW tiles whose warps split the channels (C = 512, 768: a cross-warp
# reduction over a 4-D tile keeps replicated slices live) took all 128 registers and spilled
# 16-232 bytes (sm_90, triton 3.9, python -m normops.kernels.roofline); at 16 and 8 they take
# 115-128 and spill none. ConvNeXt's 96 channels fit either way (a warp holds whole columns).
CF_FWD_PER_THREAD = 16
CF_BWD_PER_THREAD = 8
# Warps a program: 8. A tile of 256 threads x the budget (4K elements forward, 8 KB of bf16 in
# flight a program) and an SM holds 2-4 such programs at the 48-128 registers these take (the
# roofline's occupancy): the backward's persistent grid (programs_per_wave: 2 an SM at 8 warps)
# keeps two resident, where 16-warp programs left one an SM. More warps only where the channels
# need them (a column wider than 8 warps' budget), up to CF_MAX_WARPS, past which the kernels loop
# over channel blocks (backward: NCHW C > 1024 at bf16, 2048 at fp32; channels_last C > 4096).
# The looped channels_last backward stays at CF_WARPS: two reads of the channels whatever the
# block, and at 16 warps (4096 channels, 8 a thread, a cap of 128 registers) bf16 with gelu spilled
# 8 bytes (C = 8192, triton 3.6, sm_90); at 8 warps (2048 channels, 8 a thread) it takes 124, none.
CF_WARPS = 8
CF_MAX_WARPS = 16
# NCHW: a lane's run of positions is at least 8 bytes (v = 4 bf16, 2 fp32), a quarter sector, the
# other three quarters read by the neighbouring lanes' warps in the same program (L1); a full
# 16-byte vector where the budget allows.
CF_MIN_RUN_BYTES = 8
# The NCHW backward's exceptions (triton 3.9, sm_90, python -m normops.kernels.aot): at C < 32 (the
# stem's 3) 4-value runs crashed the compiler (segfault in libtriton), fp32 (tile 4x256, 16 bytes)
# and bf16 (4x256, 8 bytes) alike; fp32 takes 8-byte runs (2 values, 60 registers), bf16 keeps its
# 16-byte ones (8 values), which compile. A column spread over 8 or more warps at the minimum run
# (bf16 with gelu, 2 channels x 4 positions a thread: C = 384 over 8 warps spilled 24 bytes, C = 768
# over 16 spilled 8) spills; half the run (4 bytes: C = 768 took 99 registers) spills none.
CF_BWD_SMALL_C_RUN_FP32 = 2


@dataclasses.dataclass(frozen=True)
class ChannelsFirstConfig:
    """Launch settings of the channels-first LayerNorm kernels for C channels and S positions a sample.

    block_c x block_s: the tile; c_lane x s_in: its inner [channels, positions] block, the part of
    a column a warp's lanes hold (see above); one_pass: every channel is in the tile (block_c >= C),
    so a column's statistics and dx come from one read; else the kernels loop over channel blocks
    (two reads, the second from L2). num_warps: warps per program."""
    block_c: int
    block_s: int
    c_lane: int
    s_in: int
    num_warps: int
    one_pass: bool

    @classmethod
    def forward(cls, c, s, channels_last, elem):
        return cls._make(c, s, channels_last, elem, CF_FWD_PER_THREAD, False)

    @classmethod
    def backward(cls, c, s, channels_last, elem):
        return cls._make(c, s, channels_last, elem, CF_BWD_PER_THREAD, True)

    @classmethod
    def _make(cls, c, s, channels_last, elem, budget, backward):
        block_c = next_pow2(c)
        while True:
            cfg, warps_c = cls._tile(block_c, c, s, channels_last, elem, budget, backward)
            # the looped channels_last backward: CF_WARPS across a column (see CF_WARPS)
            limit = min(CF_WARPS, CF_MAX_WARPS) if backward and channels_last and not cfg.one_pass else CF_MAX_WARPS
            if warps_c <= limit or block_c == 1:
                return cfg
            block_c //= 2  # past CF_MAX_WARPS warps across a column: loop over channel blocks

    @classmethod
    def _tile(cls, block_c, c, s, channels_last, elem, budget, backward):
        """(the config of `block_c` channels a tile, the warps it spreads a column over)."""
        vec = max(1, 16 // elem)  # elements of a 16-byte vector on the contiguous axis
        if channels_last:  # lanes x vec along the channels, the rest of the lanes along positions
            c_lane = min(block_c, 32 * vec)
            v = min(vec, c_lane)
            lanes_s = 32 // (c_lane // v)
        else:  # a channel a lane (fewer channels than lanes: the rest along positions), v positions
            c_lane = min(block_c, 32)
            v = min(vec, next_pow2(s), max(max(1, CF_MIN_RUN_BYTES // elem), budget * c_lane // block_c))
            if backward and c_lane < 32 and elem == 4:
                v = min(v, CF_BWD_SMALL_C_RUN_FP32)
            lanes_s = 32 // c_lane
        per_column = block_c // c_lane * v  # a thread's elements of a column: channels x positions
        # warps across the channels when a thread's share of a column passes the budget
        warps_c = max(1, per_column // budget)
        warps = max(CF_WARPS, warps_c)
        if backward and not channels_last and warps_c >= CF_WARPS and v > 1:
            v //= 2  # the column over the most warps: half the run (see CF_BWD_SMALL_C_RUN_FP32)
        # positions: lanes_s x (warps on positions) x (columns a thread, channels_last: to the budget)
        rows = max(1, budget // per_column) if channels_last else 1
        s_in = 1 if channels_last else v * lanes_s
        block_s = (lanes_s if channels_last else s_in) * max(1, warps // warps_c) * rows
        while block_s > max(next_pow2(s), s_in) and block_s > 1:
            block_s //= 2  # a short S: fewer positions (the spare warps go to the channels)
        return cls(block_c, block_s, c_lane, min(s_in, block_s), warps, block_c >= c), warps_c
